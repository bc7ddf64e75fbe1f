/**
 * The crash runner's model of what the mapped devices were asked to do and what a crash at a given
 * moment may leave behind (docs/testing.md, "Crash-consistency runner").
 *
 * Every sector the workload writes carries a stamp: the write's id, the sector it was written to
 * and a filler derived from the id, so a read tells exactly which write a sector comes from (id 0
 * is the origin's initial content). Writes to one sector of one device never overlap in time (the
 * workload keeps concurrent writes of a device apart), so a sector's writes form a sequence.
 *
 * Durability, per device (the origin or one snapshot), in clock stamps: a write is durable once it
 * was acknowledged with FUA, or once a flush of the same device that was submitted after the
 * write's acknowledgement has itself been acknowledged. After a crash at moment t a sector must
 * hold the last write durable at t, or any later write submitted by t (it may or may not have
 * reached the disk); if no write is durable yet, also what the sector held before.
 */
import { SECTOR_SIZE } from "../../core/bio.js";

const MAGIC = 0x434d4455; // "UDMC"
const FILLER_BYTES = SECTOR_SIZE - 16;

/** What a sector read back decodes to, besides a write id. */
export const ZEROS = -1;
export const GARBAGE = -2;
export const MISPLACED = -3;

const fillers = new Map<number, Buffer>();

function filler(id: number): Buffer {
  let f = fillers.get(id);
  if (!f) {
    f = Buffer.alloc(FILLER_BYTES);
    const word = Buffer.alloc(4);
    word.writeUInt32LE((Math.imul(id + 1, 0x9e3779b1) ^ 0x5bd1e995) >>> 0);
    f.fill(word);
    fillers.set(id, f);
  }
  return f;
}

function check(id: number, sector: number): number {
  return (Math.imul(id ^ 0x27d4eb2f, 0x165667b1) + Math.imul(sector, 0x85ebca77)) >>> 0;
}

/** Write the stamp of write `id` for `sector` at `off` in `buf`. */
export function stampSector(buf: Buffer, off: number, id: number, sector: number): void {
  buf.writeUInt32LE(MAGIC, off);
  buf.writeUInt32LE(id, off + 4);
  buf.writeUInt32LE(sector, off + 8);
  buf.writeUInt32LE(check(id, sector), off + 12);
  filler(id).copy(buf, off + 16);
}

/** Data for a write of `sectors` sectors at `sector` by write `id`. */
export function writeData(id: number, sector: number, sectors: number): Buffer {
  const buf = Buffer.allocUnsafe(sectors * SECTOR_SIZE);
  for (let i = 0; i < sectors; i++) stampSector(buf, i * SECTOR_SIZE, id, sector + i);
  return buf;
}

const ZERO_SECTOR = Buffer.alloc(SECTOR_SIZE);

/** The write id a sector holds, or ZEROS / GARBAGE / MISPLACED (a stamp of another sector). */
export function decodeSector(buf: Buffer, off: number, sector: number): number {
  if (buf.readUInt32LE(off) !== MAGIC) {
    return ZERO_SECTOR.compare(buf, off, off + SECTOR_SIZE) === 0 ? ZEROS : GARBAGE;
  }
  const id = buf.readUInt32LE(off + 4);
  const at = buf.readUInt32LE(off + 8);
  if (buf.readUInt32LE(off + 12) !== check(id, at)) return GARBAGE;
  if (filler(id).compare(buf, off + 16, off + SECTOR_SIZE) !== 0) return GARBAGE;
  return at === sector ? id : MISPLACED;
}

export function describeValue(v: number): string {
  if (v === ZEROS) return "zeros";
  if (v === GARBAGE) return "garbage";
  if (v === MISPLACED) return "another sector's data";
  return v === 0 ? "initial data" : `write #${v}`;
}

export interface TopWrite {
  id: number;
  device: string;
  sector: number;
  sectors: number;
  fua: boolean;
  /** Clock stamps. */
  submit: number;
  ack: number;
  failed: boolean;
  /** When it became durable (Infinity: never, as far as the model can tell). */
  durableAt: number;
  /**
   * Not a write the workload issued: a merge put a snapshot's data (write `id`'s stamp) on the
   * origin; `durableAt` is set by the runner (when the merge had finished).
   */
  merged?: boolean;
  /**
   * Not a write either: the rest of a block a write provisioned without zeroing it (thin's
   * skip_block_zeroing), whose content is whatever the data device held. It may overlap writes
   * in flight in that block.
   */
  unzeroedFill?: boolean;
}

export interface TopFlush {
  device: string;
  submit: number;
  ack: number;
  failed: boolean;
}

/** What a sector may hold after a crash: these write ids, and the previous content if `base`. */
export interface Allowed {
  ids: number[];
  base: boolean;
  /** The last durable write, if any (for messages). */
  durable: TopWrite | null;
}

/** The writes and flushes one mapped device was given. */
export class DeviceHistory {
  readonly writes: TopWrite[] = [];
  readonly flushes: TopFlush[] = [];
  /** Per sector: the writes covering it, in issue order. */
  private readonly perSector: (TopWrite[] | undefined)[];
  /** Live view: the id each sector holds now (last acknowledged write), -1 when never written. */
  readonly current: Int32Array;

  constructor(
    readonly name: string,
    readonly sectors: number,
  ) {
    this.perSector = new Array<TopWrite[] | undefined>(sectors);
    this.current = new Int32Array(sectors).fill(-1);
  }

  addWrite(write: TopWrite): void {
    this.writes.push(write);
    for (let sector = write.sector; sector < write.sector + write.sectors; sector++) {
      (this.perSector[sector] ??= []).push(write);
    }
  }

  acked(write: TopWrite): void {
    for (let sector = write.sector; sector < write.sector + write.sectors; sector++) {
      this.current[sector] = write.id;
    }
  }

  /** Compute every write's durableAt (after the workload). */
  finalize(): void {
    const flushes = this.flushes
      .filter((flush) => !flush.failed && Number.isFinite(flush.ack))
      .sort((a, b) => a.submit - b.submit);
    // firstAck[i]: the earliest acknowledgement among the flushes submitted i-th or later.
    const firstAck = new Array<number>(flushes.length + 1).fill(Infinity);
    for (let i = flushes.length - 1; i >= 0; i--) firstAck[i] = Math.min(firstAck[i + 1]!, flushes[i]!.ack);
    for (const write of this.writes) {
      if (write.merged) continue;
      if (write.failed || !Number.isFinite(write.ack)) {
        write.durableAt = Infinity;
        continue;
      }
      // First flush submitted after the acknowledgement.
      let lo = 0;
      let hi = flushes.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (flushes[mid]!.submit > write.ack) hi = mid;
        else lo = mid + 1;
      }
      write.durableAt = Math.min(write.fua ? write.ack : Infinity, firstAck[lo]!);
    }
  }

  writesAt(sector: number): readonly TopWrite[] {
    return this.perSector[sector] ?? [];
  }

  /**
   * Writes to one sector must not overlap in time, or their order is unknown: returns the first
   * sector where a write was submitted before the previous one was acknowledged (a runner bug).
   */
  overlapping(): string | null {
    for (let s = 0; s < this.sectors; s++) {
      const list = this.perSector[s];
      if (!list) continue;
      for (let j = 1; j < list.length; j++) {
        const previous = list[j - 1]!;
        const write = list[j]!;
        const modelled = (w: TopWrite) => w.merged || w.unzeroedFill;
        if (!modelled(previous) && !modelled(write) && write.submit < previous.ack) {
          return `${this.name} sector ${s}: write #${write.id} submitted before #${previous.id} was acknowledged`;
        }
      }
    }
    return null;
  }

  /**
   * What sector `sector` may hold after a crash at t. Only writes submitted after `after` and
   * before `before` count (e.g. the origin as a snapshot taken at `before` must see it).
   */
  allowedAt(sector: number, t: number, range: { after?: number; before?: number } = {}): Allowed {
    const list = this.perSector[sector];
    if (!list) return { ids: [], base: true, durable: null };
    // A sector's writes are in submission order; later ones cannot be durable (or there) by t.
    const lo = firstSubmittedAfter(list, range.after ?? -Infinity);
    const hi = firstSubmittedAfter(list, Math.min(t, (range.before ?? Infinity) - 0.5));
    let lastDurable = -1;
    for (let j = hi - 1; j >= lo; j--) {
      if (list[j]!.durableAt <= t) {
        lastDurable = j;
        break;
      }
    }
    const ids: number[] = [];
    for (let j = Math.max(lastDurable, lo); j < hi; j++) ids.push(list[j]!.id);
    return { ids, base: lastDurable < 0, durable: lastDurable >= 0 ? list[lastDurable]! : null };
  }
}

/** Index of the first write submitted after `at` (binary search: the list is in submission order). */
function firstSubmittedAfter(list: readonly TopWrite[], at: number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (list[mid]!.submit > at) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

/** A snapshot as the workload made it. */
export interface SnapshotModel {
  /** Index k: device names snap<k>, lw-cow<k>, cow<k>-data, cow<k>-log. */
  index: number;
  name: string;
  chunkSize: number;
  cowSectors: number;
  /** Clock stamp just before the snapshot was created, and before its removal started (Infinity: never removed). */
  createdAt: number;
  removedAt: number;
  /** The origin's content (write ids) when the snapshot was taken. */
  pointInTime: Int32Array;
  history: DeviceHistory;
  /** When a merge of this snapshot into the origin started, and when it had finished (Infinity: never). */
  mergeStartedAt: number;
  mergeDoneAt: number;
  /** The chunks the snapshot had recorded when its merge started (they are merged; the rest is the origin's). */
  recordedAtMerge: Set<number> | null;
}
