/**
 * The space map contract (dm-space-map.h): a reference count per block of a device, and an
 * allocator that never hands out a block freed in the running transaction (its old contents may
 * still be what the last committed transaction points to). Two implementations: the data space
 * map (space-map-disk.ts) and the metadata space map, which lives in the blocks it counts
 * (space-map-metadata.ts).
 */

export interface SpaceMap {
  /** Blocks the map covers. */
  readonly nrBlocks: number;
  /** Blocks that can still be allocated in this transaction. */
  nrFree(): number;
  getCount(b: number): Promise<number>;
  countIsMoreThanOne(b: number): Promise<boolean>;
  setCount(b: number, count: number): Promise<void>;
  inc(b: number): Promise<void>;
  dec(b: number): Promise<void>;
  /** A free block, its count set to 1; throws ENOSPC when there is none. */
  newBlock(): Promise<number>;
  /** Make the counts of this transaction the base of the next one (blocks freed now become allocatable). */
  commit(): Promise<void>;
  extend(extraBlocks: number): Promise<void>;
  /** The 32-byte root (struct disk_sm_root) the superblock stores. */
  root(): Buffer;
}

/** struct disk_sm_root (dm-space-map-common.h). */
export interface SmRoot {
  nrBlocks: number;
  nrAllocated: number;
  /** The index: a btree root (data) or the index block (metadata). */
  bitmapRoot: number;
  refCountRoot: number;
}

export const SM_ROOT_SIZE = 32;

export function encodeSmRoot(root: SmRoot): Buffer {
  const buf = Buffer.alloc(SM_ROOT_SIZE);
  writeU64(buf, 0, root.nrBlocks);
  writeU64(buf, 8, root.nrAllocated);
  writeU64(buf, 16, root.bitmapRoot);
  writeU64(buf, 24, root.refCountRoot);
  return buf;
}

export function decodeSmRoot(buf: Buffer): SmRoot {
  return {
    nrBlocks: readU64(buf, 0),
    nrAllocated: readU64(buf, 8),
    bitmapRoot: readU64(buf, 16),
    refCountRoot: readU64(buf, 24),
  };
}

const TWO_32 = 0x1_0000_0000;

/** A little-endian u64 as a number; throws beyond 2^53 (no block or key here gets that far). */
export function readU64(buf: Buffer, offset: number): number {
  const hi = buf.readUInt32LE(offset + 4);
  if (hi >= 0x20_0000) throw new RangeError(`u64 at offset ${offset} is beyond 2^53`);
  return hi * TWO_32 + buf.readUInt32LE(offset);
}

export function writeU64(buf: Buffer, offset: number, value: number): void {
  buf.writeUInt32LE(value % TWO_32, offset);
  buf.writeUInt32LE(Math.floor(value / TWO_32), offset + 4);
}
