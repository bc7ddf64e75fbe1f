/**
 * The values of the pool's trees (dm-thin-metadata.c): a mapping is a data block and the pool
 * "time" it was written at, packed as block << 24 | time in a u64; the top level of the mapping
 * tree holds the root of each thin device's own tree.
 */
import { type BtreeInfo, type BtreeValueType, deleteTree } from "../persistent-data/btree.js";
import { readU64 } from "../persistent-data/space-map.js";
import type { SpaceMap } from "../persistent-data/space-map.js";
import type { TransactionManager } from "../persistent-data/transaction-manager.js";

export const TIME_BITS = 24;
const TIME_MASK = (1 << TIME_BITS) - 1;
/** Data block numbers have 40 bits. */
export const MAX_DATA_BLOCK = 2 ** 40 - 1;

export interface BlockTime {
  block: number;
  time: number;
}

/** pack_block_time */
export function packBlockTime(block: number, time: number): Buffer {
  const buf = Buffer.alloc(8);
  buf.writeUInt32LE((((block % 256) << TIME_BITS) | (time & TIME_MASK)) >>> 0, 0);
  buf.writeUInt32LE(Math.floor(block / 256), 4);
  return buf;
}

/** unpack_block_time */
export function unpackBlockTime(v: Buffer): BlockTime {
  const lo = v.readUInt32LE(0);
  return { block: v.readUInt32LE(4) * 256 + (lo >>> TIME_BITS), time: lo & TIME_MASK };
}

/** data_block_inc/dec/equal: a mapping holds a reference on its data block. */
export function dataBlockValueType(dataSm: SpaceMap): BtreeValueType {
  return {
    size: 8,
    inc: (v) => dataSm.inc(unpackBlockTime(v).block),
    dec: (v) => dataSm.dec(unpackBlockTime(v).block),
    equal: (a, b) => unpackBlockTime(a).block === unpackBlockTime(b).block,
  };
}

/** subtree_inc/dec/equal: a device's entry in the top level owns a reference on its tree; dropping it deletes the tree. */
export function subtreeValueType(tm: TransactionManager, bottom: () => BtreeInfo): BtreeValueType {
  return {
    size: 8,
    inc: (v) => tm.inc(readU64(v, 0)),
    dec: (v) => deleteTree(bottom(), readU64(v, 0)),
    equal: (a, b) => a.equals(b),
  };
}
