/**
 * The block layer's plug, for a file: small buffered writes submitted during one event-loop turn
 * are held until the end of the turn, then runs of them that touch end to end go to the file as
 * one pwritev(2) instead of one pool job each.
 *
 * Why: every fs.write is a libuv pool job: a thread wake-up and a completion wake-up, which on a
 * small VM cost more CPU than the 4 KiB copy itself. The snapshot target makes many such runs:
 * COW chunks are allocated in order, so the chunks copied for the writes of one NBD burst land
 * next to each other in the COW file (measured: 4 of 5 COW writes in a first-write pass touch the
 * write before them in the same turn).
 *
 * Ordering is what a block device gives: writes in flight together have no order among them
 * (the kernel and the NBD protocol promise none), a write's completion means its data is in the
 * file, and a flush only covers writes completed before it was issued. A held write has not
 * completed, so no flush has to wait for it.
 */
type Done = (err: NodeJS.ErrnoException | null) => void;

/** Writes up to this size are held for merging; larger ones gain nothing from it. */
export const PLUG_WRITE_MAX = 128 * 1024;
/** A merged run stops growing at this many bytes... */
const RUN_BYTES_MAX = 1024 * 1024;
/** ...or buffers (IOV_MAX on Linux is 1024). */
const RUN_BUFFERS_MAX = 256;

interface HeldWrite {
  fd: number;
  pos: number;
  buf: Buffer;
  done: Done;
}

export class WritePlug {
  private held: HeldWrite[] = [];
  private scheduled = false;
  /** Pool jobs issued for held writes, and how many held writes they carried (for tests and stats). */
  jobs = 0;
  merged = 0;

  constructor(
    /** Writes one buffer fully (looping over short writes); used for a run of one. */
    private readonly writeOne: (fd: number, buf: Buffer, pos: number, done: Done) => void,
    /** Writes buffers back to back from `pos` in one call, looping over short writes. */
    private readonly writeMany: (fd: number, bufs: Buffer[], pos: number, done: Done) => void,
  ) {}

  /** Hold a write until the end of this turn. */
  add(fd: number, buf: Buffer, pos: number, done: Done): void {
    this.held.push({ fd, pos, buf, done });
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => this.unplug());
  }

  /** Issue everything held now (the device is closing, or the turn ended). */
  unplug(): void {
    this.scheduled = false;
    const held = this.held;
    if (held.length === 0) return;
    this.held = [];
    // By file and position (stable: same-place writes stay in submission order, though the pool
    // runs separate jobs in any order, as it always did).
    held.sort((a, b) => a.fd - b.fd || a.pos - b.pos);
    let start = 0;
    let end = held[0]!.pos + held[0]!.buf.length;
    let bytes = held[0]!.buf.length;
    for (let i = 1; i < held.length; i++) {
      const w = held[i]!;
      const joins =
        w.fd === held[start]!.fd &&
        w.pos === end &&
        bytes + w.buf.length <= RUN_BYTES_MAX &&
        i - start < RUN_BUFFERS_MAX;
      if (!joins) {
        this.issue(held, start, i);
        start = i;
        bytes = 0;
      }
      end = w.pos + w.buf.length;
      bytes += w.buf.length;
    }
    this.issue(held, start, held.length);
  }

  private issue(held: HeldWrite[], start: number, end: number): void {
    this.jobs++;
    const first = held[start]!;
    if (end - start === 1) return this.writeOne(first.fd, first.buf, first.pos, first.done);
    const run = held.slice(start, end);
    this.merged += run.length;
    this.writeMany(
      first.fd,
      run.map((w) => w.buf),
      first.pos,
      (err) => {
        // One request in the kernel's terms: its status is every bio's status.
        for (const w of run) w.done(err);
      },
    );
  }
}
