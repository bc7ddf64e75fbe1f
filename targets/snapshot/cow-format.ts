/**
 * The persistent snapshot's on-disk format (dm-snap-persistent.c: `struct disk_header`, `struct disk_exception`), byte-compatible with the kernel's
 * dm-snap-persistent: a header chunk, then metadata areas of 16-byte little-endian records at
 * chunks 1 + k·(E+1), each followed by the E data chunks it describes. Pure helpers, no I/O: the
 * store and the COW image reader share them.
 */
import { SECTOR_SIZE } from "../../core/bio.js";

/** "SnAp" read as a little-endian u32. */
export const SNAP_MAGIC = 0x70416e53;
export const SNAPSHOT_DISK_VERSION = 1;
/** Chunks before metadata area 0 (the header). */
export const NUM_SNAPSHOT_HDR_CHUNKS = 1;
export const HEADER_BYTES = 16;
export const RECORD_BYTES = 16;
/** Default chunk size (sectors) of a new persistent store when the table says 0. */
export const DEFAULT_CHUNK_SECTORS = 32;
/** `INT_MAX >> SECTOR_SHIFT`: the largest chunk size the kernel accepts. */
export const MAX_CHUNK_SECTORS = 0x7fffffff >> 9;

const TWO_32 = 0x1_0000_0000;

export interface DiskHeader {
  magic: number;
  valid: number;
  version: number;
  chunkSize: number;
}

export function chunkBytes(chunkSize: number): number {
  return chunkSize * SECTOR_SIZE;
}

/** E: records per metadata area. */
export function exceptionsPerArea(chunkSize: number): number {
  return chunkBytes(chunkSize) / RECORD_BYTES;
}

/** Chunk number of metadata area `area`. */
export function areaLocation(epa: number, area: number): number {
  return NUM_SNAPSHOT_HDR_CHUNKS + (epa + 1) * area;
}

/** True for the chunks that hold metadata areas (c ≥ 1 and c mod (E+1) == 1). */
export function isMetadataChunk(epa: number, chunk: number): boolean {
  return chunk >= 1 && chunk % (epa + 1) === 1;
}

/** skip_metadata: never let next_free point at a metadata chunk. */
export function skipMetadata(epa: number, nextFree: number): number {
  return nextFree % (epa + 1) === 1 ? nextFree + 1 : nextFree;
}

export function decodeHeader(buf: Buffer): DiskHeader {
  return {
    magic: buf.readUInt32LE(0),
    valid: buf.readUInt32LE(4),
    version: buf.readUInt32LE(8),
    chunkSize: buf.readUInt32LE(12),
  };
}

/** A whole header chunk: the 16 header bytes, then zeros. */
export function encodeHeader(chunkSize: number, valid: boolean): Buffer {
  const buf = Buffer.alloc(chunkBytes(chunkSize));
  buf.writeUInt32LE(SNAP_MAGIC, 0);
  buf.writeUInt32LE(valid ? 1 : 0, 4);
  buf.writeUInt32LE(SNAPSHOT_DISK_VERSION, 8);
  buf.writeUInt32LE(chunkSize, 12);
  return buf;
}

/** le64 as a number (exact up to 2^53; larger values, only seen in garbage, round). */
export function readLe64(buf: Buffer, offset: number): number {
  return buf.readUInt32LE(offset + 4) * TWO_32 + buf.readUInt32LE(offset);
}

export function writeLe64(buf: Buffer, offset: number, value: number): void {
  buf.writeUInt32LE(value % TWO_32, offset);
  buf.writeUInt32LE(Math.floor(value / TWO_32), offset + 4);
}

export function readRecord(area: Buffer, slot: number): { oldChunk: number; newChunk: number } {
  const at = slot * RECORD_BYTES;
  return { oldChunk: readLe64(area, at), newChunk: readLe64(area, at + 8) };
}

export function writeRecord(area: Buffer, slot: number, oldChunk: number, newChunk: number): void {
  const at = slot * RECORD_BYTES;
  writeLe64(area, at, oldChunk);
  writeLe64(area, at + 8, newChunk);
}

export function isPowerOfTwo(n: number): boolean {
  if (!Number.isInteger(n) || n <= 0) return false;
  while (n % 2 === 0) n /= 2;
  return n === 1;
}

/**
 * dm_exception_store_set_chunk_size's checks: the kernel's message for a bad size, or null.
 * `blockSizes` are logical block sizes in bytes (the COW device's, and the origin's if known).
 */
export function chunkSizeError(chunkSize: number, blockSizes: readonly number[]): string | null {
  if (!isPowerOfTwo(chunkSize)) return "Chunk size is not a power of 2";
  if (blockSizes.some((bs) => chunkSize % Math.max(1, bs / SECTOR_SIZE) !== 0)) {
    return "Chunk size is not a multiple of device blocksize";
  }
  if (chunkSize > MAX_CHUNK_SECTORS) return "Chunk size is too high";
  return null;
}
