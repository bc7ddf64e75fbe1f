/**
 * The space maps' bitmap blocks and index entries (dm-space-map-common.[ch]).
 *
 * A bitmap block is a 16-byte header (csum, unused, blocknr) and then two bits per block of the
 * device, four entries to a byte from the low bits up: within each pair the first bit is the high
 * one. 0, 1 and 2 are the reference count; 3 means "more than 2", the count then being in the
 * ref-count btree. An index entry says where a bitmap block is, how many of its entries are free,
 * and that none is free below `noneFreeBefore`.
 */
import type { BlockValidator } from "./block-manager.js";
import { BITMAP_CSUM_XOR, dmChecksum } from "./checksum.js";
import { pdError } from "./errors.js";
import { readU64, writeU64 } from "./space-map.js";

export const BITMAP_HEADER_SIZE = 16;
/** Entries per 4 KiB bitmap block: (4096 − 16) × 4. */
export const ENTRIES_PER_BLOCK = (4096 - BITMAP_HEADER_SIZE) * 4;
export const INDEX_ENTRY_SIZE = 16;

export const bitmapValidator: BlockValidator = {
  name: "sm_bitmap",
  prepareForWrite(data, location) {
    writeU64(data, 8, location);
    data.writeUInt32LE(dmChecksum(data.subarray(4), BITMAP_CSUM_XOR), 0);
  },
  check(data, location) {
    if (readU64(data, 8) !== location) {
      throw pdError("ENOTBLK", `bitmap check failed: blocknr ${readU64(data, 8)} != wanted ${location}`);
    }
    const csum = dmChecksum(data.subarray(4), BITMAP_CSUM_XOR);
    if (csum !== data.readUInt32LE(0)) {
      throw pdError("EILSEQ", `bitmap check failed: csum ${csum} != wanted ${data.readUInt32LE(0)}`);
    }
  },
};

/** sm_lookup_bitmap: the 2-bit entry of block `i` of this bitmap. */
export function bitmapLookup(data: Buffer, i: number): number {
  const byte = data[BITMAP_HEADER_SIZE + (i >> 2)]!;
  const shift = (i & 3) * 2;
  return (((byte >> shift) & 1) << 1) | ((byte >> (shift + 1)) & 1);
}

/** sm_set_bitmap */
export function bitmapSet(data: Buffer, i: number, value: number): void {
  const at = BITMAP_HEADER_SIZE + (i >> 2);
  const shift = (i & 3) * 2;
  const bits = ((value >> 1) & 1) | ((value & 1) << 1);
  data[at] = (data[at]! & ~(3 << shift)) | (bits << shift);
}

/** For each byte value, the first of its four entries that is 0 (free), or 4. */
const FIRST_FREE_IN_BYTE = Uint8Array.from({ length: 256 }, (_, b) => {
  for (let k = 0; k < 4; k++) if (((b >> (2 * k)) & 3) === 0) return k;
  return 4;
});

/** sm_find_free: the first free entry in [begin, end), or -1. */
export function bitmapFindFree(data: Buffer, begin: number, end: number): number {
  let i = begin;
  while (i < end) {
    if ((i & 3) === 0 && i + 4 <= end) {
      const k = FIRST_FREE_IN_BYTE[data[BITMAP_HEADER_SIZE + (i >> 2)]!]!;
      if (k === 4) {
        i += 4;
        continue;
      }
      return i + k;
    }
    if (bitmapLookup(data, i) === 0) return i;
    i++;
  }
  return -1;
}

/** struct disk_index_entry */
export interface IndexEntry {
  blocknr: number;
  nrFree: number;
  noneFreeBefore: number;
}

export function decodeIndexEntry(buf: Buffer, offset = 0): IndexEntry {
  return {
    blocknr: readU64(buf, offset),
    nrFree: buf.readUInt32LE(offset + 8),
    noneFreeBefore: buf.readUInt32LE(offset + 12),
  };
}

export function encodeIndexEntry(ie: IndexEntry, buf: Buffer = Buffer.alloc(INDEX_ENTRY_SIZE), offset = 0): Buffer {
  writeU64(buf, offset, ie.blocknr);
  buf.writeUInt32LE(ie.nrFree, offset + 8);
  buf.writeUInt32LE(ie.noneFreeBefore, offset + 12);
  return buf;
}
