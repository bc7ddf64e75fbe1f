/**
 * Verified I/O over NBD for the fuzz, soak and crash tests.
 *
 * Every sector a test writes is stamped: magic, the write's id, the absolute sector number, and a
 * fill derived from both. A read is compared with a model of the device (the bytes the test
 * believes are there); on a mismatch the stamps say which write each sector came from.
 *
 * Workers (`runWorker`) own disjoint 64 KiB blocks of a device and keep at most one request in
 * flight per block, so the model is exact at every completion: a read of an own block (no write
 * to it in flight) or of a block that nobody writes through this device must equal the model.
 */
import { CmdFlags } from "../../nbd/protocol.js";
import type { WireClient } from "./nbd-client.js";
import type { Rng } from "../../testing/rng.js";

export const SECTOR = 512;
export const BLOCK = 64 * 1024;
const MAGIC = 0x57_4d_44_55; // "UDMW" little-endian

/** `sectors` stamped sectors of write `writeId`, the first being absolute sector `firstSector`. */
export function stamp(writeId: number, firstSector: number, sectors: number): Buffer {
  const buf = Buffer.allocUnsafe(sectors * SECTOR);
  for (let s = 0; s < sectors; s++) {
    const at = s * SECTOR;
    const sector = firstSector + s;
    buf.fill((writeId * 31 + sector * 7) & 0xff, at + 16, at + SECTOR);
    buf.writeUInt32LE(MAGIC, at);
    buf.writeUInt32LE(writeId >>> 0, at + 4);
    buf.writeUInt32LE(sector % 0x1_0000_0000, at + 8);
    buf.writeUInt32LE(Math.floor(sector / 0x1_0000_0000), at + 12);
  }
  return buf;
}

export interface SectorStamp {
  writeId: number;
  sector: number;
  /** The rest of the sector is the fill this stamp implies (no torn or foreign bytes). */
  intact: boolean;
}

/** Decode one 512-byte sector; null when it carries no stamp at all. */
export function decodeStamp(sector: Buffer): SectorStamp | null {
  if (sector.length < SECTOR || sector.readUInt32LE(0) !== MAGIC) return null;
  const writeId = sector.readUInt32LE(4);
  const abs = sector.readUInt32LE(8) + sector.readUInt32LE(12) * 0x1_0000_0000;
  const fill = (writeId * 31 + abs * 7) & 0xff;
  let intact = true;
  for (let i = 16; i < SECTOR; i++) {
    if (sector[i] !== fill) {
      intact = false;
      break;
    }
  }
  return { writeId, sector: abs, intact };
}

/** Human-readable first difference between `expected` and `actual` (both starting at byte `offset`). */
export function describeMismatch(device: string, offset: number, expected: Buffer, actual: Buffer): string {
  for (let at = 0; at < expected.length; at += SECTOR) {
    const e = expected.subarray(at, at + SECTOR);
    const a = actual.subarray(at, at + SECTOR);
    if (e.equals(a)) continue;
    const show = (b: Buffer) => {
      const s = decodeStamp(b);
      return s
        ? `write #${s.writeId} of sector ${s.sector}${s.intact ? "" : " (torn)"}`
        : `unstamped ${b.subarray(0, 16).toString("hex")}`;
    };
    return `${device}: sector ${(offset + at) / SECTOR} holds ${show(a)}, expected ${show(e)}`;
  }
  return `${device}: lengths differ (${expected.length} vs ${actual.length})`;
}

/** The bytes a test believes a device holds. */
export interface DeviceModel {
  name: string;
  expected: Buffer;
}

export interface WorkerSpec {
  client: WireClient;
  model: DeviceModel;
  /** Blocks (index × BLOCK) this worker alone writes. */
  own: number[];
  /** Blocks nobody writes through this device: readable and checkable at any time. */
  still: number[];
  queueDepth: number;
  rng: Rng;
  /** Largest request in sectors (default a whole block). */
  maxSectors?: number;
}

export class IoStats {
  writes = 0;
  reads = 0;
  flushes = 0;
  verifiedReads = 0;
  verifiedBytes = 0;
  mismatchCount = 0;
  errorCount = 0;
  /** The first few of each, for the failure message. */
  readonly mismatches: string[] = [];
  readonly errors: string[] = [];

  mismatch(what: string): void {
    if (this.mismatchCount++ < 20) this.mismatches.push(what);
  }

  error(what: string): void {
    if (this.errorCount++ < 20) this.errors.push(what);
  }
}

/** Global write ids (never 0: 0 marks a device's initial content). */
let nextWriteId = 1;
export function newWriteId(): number {
  return nextWriteId++;
}

/**
 * Random verified I/O until `stop()` says so: writes (some with FUA) to own blocks, reads of own
 * and still blocks checked against the model, and the odd flush. `queueDepth` loops run side by
 * side, each over its own share of the blocks.
 */
export async function runWorker(spec: WorkerSpec, stats: IoStats, stop: () => boolean): Promise<void> {
  const { client, model, rng } = spec;
  const maxSectors = spec.maxSectors ?? BLOCK / SECTOR;
  const lanes = Array.from({ length: Math.min(spec.queueDepth, spec.own.length) }, (_, j) =>
    spec.own.filter((_, i) => i % spec.queueDepth === j),
  );
  const lane = async (blocks: number[], r: Rng) => {
    while (!stop()) {
      const roll = r.float();
      const sectors = r.range(1, maxSectors);
      const within = r.int(BLOCK / SECTOR - sectors + 1) * SECTOR;
      try {
        if (roll < 0.5) {
          const offset = r.pick(blocks) * BLOCK + within;
          const data = stamp(newWriteId(), offset / SECTOR, sectors);
          const rep = await client.write(offset, data, r.chance(0.1) ? CmdFlags.FUA : 0);
          stats.writes++;
          if (rep.error !== 0)
            stats.error(`${model.name}: write ${offset}+${data.length} failed: ${rep.error} ${rep.message ?? ""}`);
          else data.copy(model.expected, offset);
        } else if (roll < 0.97) {
          const fromStill = spec.still.length > 0 && roll > 0.85;
          const block = fromStill ? r.pick(spec.still) : r.pick(blocks);
          const offset = block * BLOCK + within;
          const length = sectors * SECTOR;
          const rep = await client.read(offset, length);
          stats.reads++;
          if (rep.error !== 0) {
            stats.error(`${model.name}: read ${offset}+${length} failed: ${rep.error} ${rep.message ?? ""}`);
            continue;
          }
          const expected = model.expected.subarray(offset, offset + length);
          if (!rep.data!.equals(expected)) stats.mismatch(describeMismatch(model.name, offset, expected, rep.data!));
          else {
            stats.verifiedReads++;
            stats.verifiedBytes += length;
          }
        } else {
          const rep = await client.flush();
          stats.flushes++;
          if (rep.error !== 0) stats.error(`${model.name}: flush failed: ${rep.error} ${rep.message ?? ""}`);
        }
      } catch (err) {
        stats.error(`${model.name}: ${(err as Error).message}`);
        return; // the connection is gone
      }
    }
  };
  await Promise.all(lanes.map((blocks) => lane(blocks, rng.fork())));
}
