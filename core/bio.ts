/**
 * Bio: one block I/O request, the unit everything in udm moves around.
 *
 * Offsets and lengths are always in 512-byte sectors, whatever the logical block size of any
 * device, as the kernel's bi_sector. A bio carries its own completion target (`endIo`), an object with a
 * `bioDone` method rather than a closure, so the hot path allocates nothing per request beyond the
 * bio itself (the random-access-storage "request object" style).
 */

import type { FileRangeRead } from "./file-ranges.js";

export const SECTOR_SHIFT = 9;
export const SECTOR_SIZE = 1 << SECTOR_SHIFT;

export type BioOp = "read" | "write" | "flush" | "discard" | "write-zeroes";

/** Request flags, as in the kernel's REQ_* bits that matter to device-mapper. */
export const BioFlags = {
  NONE: 0,
  /** Force unit access: the data is on stable storage when the bio completes. */
  FUA: 1 << 0,
  /** Flush the device's volatile cache before this bio's data is written. */
  PREFLUSH: 1 << 1,
  /** Readahead: may be failed instead of queued (the kernel fails it with EIO while suspended). */
  RAHEAD: 1 << 2,
  /** Caller cannot wait: fail with EAGAIN instead of queuing behind a suspend. */
  NOWAIT: 1 << 3,
  /** write-zeroes must allocate (NBD_CMD_FLAG_NO_HOLE): never punch a hole. */
  NOUNMAP: 1 << 4,
} as const;

/**
 * Completion status. `ok` or an errno name; `DM_REQUEUE` is the core's private "push back"
 * status (BLK_STS_DM_REQUEUE) and never reaches a submitter.
 */
export type BioStatus = "ok" | "EIO" | "EOPNOTSUPP" | "ENOSPC" | "EAGAIN" | "EPERM" | "EINVAL" | "ENXIO" | "DM_REQUEUE";

/** Whoever submits a bio receives its completion here. */
export interface BioEndIo {
  bioDone(bio: Bio): void;
}

/** Anything bios can be submitted to: a backing device, a mapped device. */
export interface BioSink {
  submit(bio: Bio): void;
}

export class BioError extends Error {
  constructor(
    readonly status: BioStatus,
    message?: string,
  ) {
    super(message ?? `I/O failed: ${status}`);
    this.name = "BioError";
  }
}

export class Bio {
  /** For read/write: `sectors * 512` bytes; empty for flush/discard/write-zeroes. */
  data: Buffer;
  status: BioStatus = "ok";
  /**
   * Where a remapped clone goes next. Set by a target's `map`; the core submits the clone there
   * when `map` returns REMAPPED.
   */
  device: BioSink | null = null;
  /** Per-bio map context of the target that owns this clone (kernel: dm_per_bio_data). */
  mapContext: unknown = undefined;
  /** Index of this duplicate among a flush/discard fan-out (kernel: dm_bio_get_target_bio_nr). */
  targetBioNr = 0;
  /**
   * Reads only: the submitter takes file ranges instead of bytes where the bottom device can give
   * them (zero-copy, core/file-ranges.ts). The core keeps it only on clones of targets that
   * declare `zeroCopyReads`; whatever no file device took is in `data` as usual.
   */
  fileRanges: FileRangeRead | null = null;
  /** Private to whoever set `endIo`: lets one completion object tell its bios apart. */
  owner: unknown = undefined;
  private inFlight = false;

  constructor(
    public op: BioOp,
    public sector: number,
    public sectors: number,
    data: Buffer | null,
    public flags: number,
    public endIo: BioEndIo | null,
  ) {
    this.data = data ?? EMPTY;
  }

  get bytes(): number {
    return this.sectors * SECTOR_SIZE; // not <<: discards can exceed 2 GiB
  }

  /** True for writes that must survive a crash once completed. */
  get isFua(): boolean {
    return (this.flags & BioFlags.FUA) !== 0;
  }

  get isPreflush(): boolean {
    return (this.flags & BioFlags.PREFLUSH) !== 0;
  }

  get isWrite(): boolean {
    return this.op !== "read";
  }

  /** Issued and not completed yet. */
  get isInFlight(): boolean {
    return this.inFlight;
  }

  /** Mark the bio as issued to a device; completing it clears the mark. */
  markInFlight(): void {
    if (this.inFlight) throw new Error(`bio ${describeBio(this)} submitted twice without completing`);
    this.inFlight = true;
  }

  /** Drop a bio that will never be issued or completed (a clone the core discards after map). */
  abandon(): void {
    this.inFlight = false;
  }

  /**
   * Complete this bio. Completion is single-shot per submission: most historical dm bugs are
   * double completions, so a second completion throws instead of corrupting accounting.
   */
  complete(status: BioStatus = "ok"): void {
    if (!this.inFlight) throw new Error(`bio ${describeBio(this)} completed twice (or never submitted)`);
    this.inFlight = false;
    if (status !== "ok") this.status = status;
    this.endIo?.bioDone(this);
  }

  /** Submit to a sink after marking in flight (the one way bios should be issued). */
  submitTo(sink: BioSink): void {
    this.markInFlight();
    sink.submit(this);
  }
}

const EMPTY = Buffer.alloc(0);

export function describeBio(bio: Bio): string {
  return `${bio.op}@${bio.sector}+${bio.sectors}${bio.isFua ? " FUA" : ""}${bio.isPreflush ? " PREFLUSH" : ""}`;
}

/** Promise completion for callers that want `await`. */
class PromiseEndIo implements BioEndIo {
  resolve!: (bio: Bio) => void;
  reject!: (err: BioError) => void;
  readonly promise: Promise<Bio>;
  constructor() {
    this.promise = new Promise<Bio>((res, rej) => {
      this.resolve = res;
      this.reject = rej;
    });
  }
  bioDone(bio: Bio): void {
    if (bio.status === "ok") this.resolve(bio);
    else this.reject(new BioError(bio.status, `${describeBio(bio)} failed: ${bio.status}`));
  }
}

/** Submit a bio to `sink` and resolve when it completes; rejects with BioError on failure. */
export function submitAndWait(sink: BioSink, bio: Bio): Promise<Bio> {
  const done = new PromiseEndIo();
  bio.endIo = done;
  bio.submitTo(sink);
  return done.promise;
}

/** Convenience bio builders for tests and library callers. */
export function readBio(sector: number, buf: Buffer, flags = 0): Bio {
  return new Bio("read", sector, buf.length >> SECTOR_SHIFT, buf, flags, null);
}
export function writeBio(sector: number, buf: Buffer, flags = 0): Bio {
  return new Bio("write", sector, buf.length >> SECTOR_SHIFT, buf, flags, null);
}
export function flushBio(): Bio {
  return new Bio("flush", 0, 0, null, BioFlags.PREFLUSH, null);
}
export function discardBio(sector: number, sectors: number): Bio {
  return new Bio("discard", sector, sectors, null, 0, null);
}
export function writeZeroesBio(sector: number, sectors: number, flags = 0): Bio {
  return new Bio("write-zeroes", sector, sectors, null, flags, null);
}
