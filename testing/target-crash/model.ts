/**
 * What a crash may and may not lose, seen through a mapped device: the writes to each sector in
 * order, which were acknowledged, and which are durable (acknowledged with FUA, or acknowledged
 * before a flush that was itself acknowledged was submitted). After a crash, a sector holds its
 * last durable write or any later acknowledged one; a sector no durable write covers may also
 * still hold what it held at the start. Each written sector carries a stamp naming its write, so a
 * sector read back says which write it holds.
 */
import { SECTOR_SIZE } from "../../core/bio.js";

const MAGIC = 0x75646d57; // "udmW"

export interface ModelWrite {
  id: number;
  sector: number;
  sectors: number;
  fua: boolean;
  /** The batch it was submitted in: a flush acknowledged in a later batch covers it. */
  batch: number;
  acked: boolean;
}

/** 512 bytes that name write `id` and `sector`, and fill the rest from both. */
export function stampSector(id: number, sector: number): Buffer {
  const buf = Buffer.alloc(SECTOR_SIZE);
  buf.writeUInt32LE(MAGIC, 0);
  buf.writeUInt32LE(id, 4);
  buf.writeUInt32LE(sector, 8);
  let x = (id * 2654435761 + sector * 40503) >>> 0 || 1;
  for (let i = 12; i < SECTOR_SIZE; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf.writeUInt32LE(x >>> 0, i);
  }
  return buf;
}

export function stampedData(id: number, sector: number, sectors: number): Buffer {
  return Buffer.concat(Array.from({ length: sectors }, (_, i) => stampSector(id, sector + i)));
}

/** The write whose intact stamp `data` (one sector at `sector`) holds, or null. */
export function readStamp(data: Buffer, sector: number): number | null {
  if (data.readUInt32LE(0) !== MAGIC || data.readUInt32LE(8) !== sector) return null;
  const id = data.readUInt32LE(4);
  return stampSector(id, sector).equals(data) ? id : null;
}

export class DurabilityModel {
  private readonly perSector = new Map<number, ModelWrite[]>();
  /** Writes submitted in batches before this one are covered by an acknowledged flush. */
  private flushedBefore = 0;
  private nextId = 1;

  issue(sector: number, sectors: number, fua: boolean, batch: number): ModelWrite {
    const w: ModelWrite = { id: this.nextId++, sector, sectors, fua, batch, acked: false };
    for (let s = sector; s < sector + sectors; s++) {
      let list = this.perSector.get(s);
      if (!list) this.perSector.set(s, (list = []));
      list.push(w);
    }
    return w;
  }

  /** A flush submitted in `batch` was acknowledged. */
  flushed(batch: number): void {
    this.flushedBefore = Math.max(this.flushedBefore, batch);
  }

  durable(w: ModelWrite): boolean {
    return w.acked && (w.fua || w.batch < this.flushedBefore);
  }

  /** The write the device must return for `sector` now (null: never written). */
  current(sector: number): ModelWrite | null {
    const acked = (this.perSector.get(sector) ?? []).filter((w) => w.acked);
    return acked.at(-1) ?? null;
  }

  /** After a crash with nothing in flight: the writes `sector` may hold, and whether its old content may remain. */
  allowedAfterCrash(sector: number): { writes: ModelWrite[]; old: boolean } {
    const acked = (this.perSector.get(sector) ?? []).filter((w) => w.acked);
    const last = acked.findLastIndex((w) => this.durable(w));
    return { writes: acked.slice(Math.max(0, last)), old: last < 0 };
  }
}
