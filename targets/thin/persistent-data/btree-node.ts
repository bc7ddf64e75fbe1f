/**
 * One btree node in a 4 KiB block (dm-btree-internal.h: struct node_header, struct btree_node):
 *
 *   0  csum        u32   dm_bm_checksum of bytes 4..4095, salt BTREE_CSUM_XOR
 *   4  flags       u32   INTERNAL_NODE (1) or LEAF_NODE (2)
 *   8  blocknr     u64   the block the node lives in
 *  16  nr_entries  u32
 *  20  max_entries u32   a multiple of 3 that fits the block (calcMaxEntries)
 *  24  value_size  u32   8 in internal nodes (child block numbers)
 *  28  padding     u32
 *  32  keys        u64[max_entries], sorted ascending
 *      values      value_size × max_entries, right after the keys
 *
 * Helpers work on the block's Buffer in place; nothing here does I/O.
 */
import type { BlockValidator } from "./block-manager.js";
import { BTREE_CSUM_XOR, dmChecksum } from "./checksum.js";
import { pdError } from "./errors.js";
import { readU64, writeU64 } from "./space-map.js";

export const INTERNAL_NODE = 1;
export const LEAF_NODE = 2;
export const NODE_HEADER_SIZE = 32;

/** calc_max_entries: as many key/value pairs as fit, rounded down to a multiple of 3. */
export function calcMaxEntries(valueSize: number, blockSize = 4096): number {
  const total = Math.floor((blockSize - NODE_HEADER_SIZE) / (8 + valueSize));
  return 3 * Math.floor(total / 3);
}

export const btreeNodeValidator: BlockValidator = {
  name: "btree_node",
  prepareForWrite(data, location) {
    writeU64(data, 8, location);
    data.writeUInt32LE(dmChecksum(data.subarray(4), BTREE_CSUM_XOR), 0);
  },
  check(data, location) {
    if (readU64(data, 8) !== location) {
      throw pdError("ENOTBLK", `node_check failed: blocknr ${readU64(data, 8)} != wanted ${location}`);
    }
    const csum = dmChecksum(data.subarray(4), BTREE_CSUM_XOR);
    if (csum !== data.readUInt32LE(0)) {
      throw pdError("EILSEQ", `node_check failed: csum ${csum} != wanted ${data.readUInt32LE(0)}`);
    }
    if (NODE_HEADER_SIZE + (8 + valueSize(data)) * maxEntries(data) > data.length) {
      throw pdError("EILSEQ", "node_check failed: max_entries too large");
    }
    if (nrEntries(data) > maxEntries(data)) throw pdError("EILSEQ", "node_check failed: too many entries");
    if (!(flags(data) & (INTERNAL_NODE | LEAF_NODE))) {
      throw pdError("EILSEQ", "node_check failed: node is neither INTERNAL or LEAF");
    }
  },
};

export function flags(n: Buffer): number {
  return n.readUInt32LE(4);
}

export function isLeaf(n: Buffer): boolean {
  return (flags(n) & LEAF_NODE) !== 0;
}

export function isInternal(n: Buffer): boolean {
  return (flags(n) & INTERNAL_NODE) !== 0;
}

export function nrEntries(n: Buffer): number {
  return n.readUInt32LE(16);
}

export function setNrEntries(n: Buffer, count: number): void {
  n.writeUInt32LE(count, 16);
}

export function maxEntries(n: Buffer): number {
  return n.readUInt32LE(20);
}

export function valueSize(n: Buffer): number {
  return n.readUInt32LE(24);
}

/** Set up an empty node (the block must be zeroed). */
export function initNode(n: Buffer, nodeFlags: number, max: number, size: number): void {
  n.writeUInt32LE(nodeFlags, 4);
  setNrEntries(n, 0);
  n.writeUInt32LE(max, 20);
  n.writeUInt32LE(size, 24);
}

/** Copy the header fields (flags, max_entries, value_size) of `src`, with no entries. */
export function initLike(n: Buffer, src: Buffer): void {
  initNode(n, flags(src), maxEntries(src), valueSize(src));
}

export function keyAt(n: Buffer, i: number): number {
  return readU64(n, NODE_HEADER_SIZE + 8 * i);
}

export function setKey(n: Buffer, i: number, key: number): void {
  writeU64(n, NODE_HEADER_SIZE + 8 * i, key);
}

export function valueOffset(n: Buffer, i: number): number {
  return NODE_HEADER_SIZE + 8 * maxEntries(n) + valueSize(n) * i;
}

/** A view of value i (changes to it change the node). */
export function valueAt(n: Buffer, i: number): Buffer {
  const off = valueOffset(n, i);
  return n.subarray(off, off + valueSize(n));
}

/** Value i read as a u64: a child's block in an internal node, a subtree root in an upper level. */
export function value64(n: Buffer, i: number): number {
  return readU64(n, valueOffset(n, i));
}

export function setValue64(n: Buffer, i: number, v: number): void {
  writeU64(n, valueOffset(n, i), v);
}

/**
 * bsearch: the index of `key`, or else the last index whose key is below it (-1 if none) for
 * lower_bound, the first whose key is above it (nr_entries if none) for upper_bound.
 */
function bsearch(n: Buffer, key: number, wantHi: boolean): number {
  let lo = -1;
  let hi = nrEntries(n);
  while (hi - lo > 1) {
    const mid = lo + ((hi - lo) >> 1);
    const k = keyAt(n, mid);
    if (k === key) return mid;
    if (k < key) lo = mid;
    else hi = mid;
  }
  return wantHi ? hi : lo;
}

export function lowerBound(n: Buffer, key: number): number {
  return bsearch(n, key, false);
}

export function upperBound(n: Buffer, key: number): number {
  return bsearch(n, key, true);
}

/** insert_at: make room at `index` and store the pair there. The node must have room. */
export function insertAt(n: Buffer, index: number, key: number, value: Buffer): void {
  const nr = nrEntries(n);
  if (index > nr || nr >= maxEntries(n)) throw pdError("ENOMEM", "too many entries in btree node for insert");
  moveEntries(n, index + 1, n, index, nr - index);
  setKey(n, index, key);
  value.copy(n, valueOffset(n, index), 0, valueSize(n));
  setNrEntries(n, nr + 1);
}

/** delete_at: remove entry `index`, closing the gap. */
export function deleteAt(n: Buffer, index: number): void {
  const nr = nrEntries(n);
  moveEntries(n, index, n, index + 1, nr - index - 1);
  setNrEntries(n, nr - 1);
}

/** Copy `count` entries from src[srcOff..] to dest[destOff..]; the regions may overlap (memmove). */
export function moveEntries(dest: Buffer, destOff: number, src: Buffer, srcOff: number, count: number): void {
  if (count <= 0) return;
  const ks = NODE_HEADER_SIZE + 8 * srcOff;
  src.copy(dest, NODE_HEADER_SIZE + 8 * destOff, ks, ks + 8 * count);
  const size = valueSize(src);
  const vs = valueOffset(src, srcOff);
  src.copy(dest, valueOffset(dest, destOff), vs, vs + size * count);
}

/**
 * redistribute2: share the entries of two siblings evenly (the left one gets the smaller half),
 * keeping their order.
 */
export function redistribute2(left: Buffer, right: Buffer): void {
  const nrLeft = nrEntries(left);
  const nrRight = nrEntries(right);
  const total = nrLeft + nrRight;
  const targetLeft = Math.floor(total / 2);
  if (nrLeft < targetLeft) {
    const delta = targetLeft - nrLeft;
    moveEntries(left, nrLeft, right, 0, delta);
    moveEntries(right, 0, right, delta, nrRight - delta);
  } else if (nrLeft > targetLeft) {
    const delta = nrLeft - targetLeft;
    moveEntries(right, delta, right, 0, nrRight);
    moveEntries(right, 0, left, targetLeft, delta);
  }
  setNrEntries(left, targetLeft);
  setNrEntries(right, total - targetLeft);
}
