/**
 * Copy-on-write btrees of u64 keys (dm-btree.c, dm-btree-spine.c): lookups, walks, deleting a
 * whole tree, and what changes share (the shadow spine). Insertion is in btree-insert.ts, removal
 * in btree-remove.ts.
 *
 * A tree of `levels` levels maps `levels` keys to a value: the leaves of every level but the last
 * hold the roots of the next level's trees (thin's mapping tree: dev id → (virtual block → data
 * block)). Every modification shadows the path from the root down (a ShadowSpine), so a tree
 * changed in a transaction gets a new root and the old one stays valid until the commit.
 *
 * Values are bytes; a BtreeValueType says how big they are and how to take and drop the
 * references they hold (a data block in a space map, a subtree root in the metadata space map).
 */
import type { BlockValidator } from "./block-manager.js";
import {
  LEAF_NODE,
  btreeNodeValidator,
  calcMaxEntries,
  initNode,
  isInternal,
  isLeaf,
  keyAt,
  lowerBound,
  nrEntries,
  setValue64,
  upperBound,
  value64,
  valueAt,
} from "./btree-node.js";
import { readU64, writeU64 } from "./space-map.js";
import type { TransactionManager } from "./transaction-manager.js";

/** struct dm_btree_value_type: `inc`/`dec` take or drop whatever reference a value holds. */
export interface BtreeValueType {
  readonly size: number;
  inc?(value: Buffer): Promise<void>;
  dec?(value: Buffer): Promise<void>;
  /** Overwriting a value with an equal one does not drop its reference. */
  equal?(a: Buffer, b: Buffer): boolean;
}

/** struct dm_btree_info */
export interface BtreeInfo {
  readonly tm: TransactionManager;
  readonly levels: number;
  readonly valueType: BtreeValueType;
}

/** What a non-blocking lookup returns when a block it needs is not in memory (-EWOULDBLOCK). */
export const WOULD_BLOCK = Symbol("would block");

const V: BlockValidator = btreeNodeValidator;

export function le64(value: number): Buffer {
  const buf = Buffer.alloc(8);
  writeU64(buf, 0, value);
  return buf;
}

/**
 * init_le64_type: the values of the upper levels of a multi-level tree are block numbers
 * counted in the metadata space map (a reference, not ownership of the subtree).
 */
export function le64ValueType(tm: TransactionManager): BtreeValueType {
  return {
    size: 8,
    inc: (v) => tm.inc(readU64(v, 0)),
    dec: (v) => tm.dec(readU64(v, 0)),
    equal: (a, b) => a.equals(b),
  };
}

/** inc_children: a node that was copied from a shared one takes a reference on everything it points to. */
export async function incChildren(tm: TransactionManager, n: Buffer, vt: BtreeValueType): Promise<void> {
  const nr = nrEntries(n);
  if (isInternal(n)) {
    for (let i = 0; i < nr; i++) await tm.inc(value64(n, i));
  } else if (vt.inc) {
    for (let i = 0; i < nr; i++) await vt.inc(Buffer.from(valueAt(n, i)));
  }
}

export interface NodeRef {
  location: number;
  data: Buffer;
}

/**
 * The nodes a modification walks down through (struct shadow_spine): each step shadows the next
 * node; the caller points the parent at the shadow. `root` is the first node shadowed: the tree's
 * new root.
 */
export class ShadowSpine {
  parent: NodeRef | null = null;
  current: NodeRef | null = null;
  root = -1;

  constructor(readonly info: BtreeInfo) {}

  async step(b: number, vt: BtreeValueType): Promise<NodeRef> {
    const s = await this.info.tm.shadow(b, V);
    if (s.incChildren) await incChildren(this.info.tm, s.data, vt);
    if (this.root < 0) this.root = s.location;
    this.parent = this.current;
    this.current = { location: s.location, data: s.data };
    return this.current;
  }

  node(): Buffer {
    return this.current!.data;
  }
}

/** shadow_child: shadow the child at `index` of `parent` and point the parent at the copy. */
export async function shadowChild(
  info: BtreeInfo,
  vt: BtreeValueType,
  parent: Buffer,
  index: number,
): Promise<NodeRef> {
  const s = await info.tm.shadow(value64(parent, index), V);
  if (s.incChildren) await incChildren(info.tm, s.data, vt);
  setValue64(parent, index, s.location);
  return { location: s.location, data: s.data };
}

/** dm_btree_empty: a new tree, one empty leaf. */
export async function emptyTree(info: BtreeInfo): Promise<number> {
  const { location, data } = await info.tm.newBlock(V);
  initNode(data, LEAF_NODE, calcMaxEntries(info.valueType.size), info.valueType.size);
  return location;
}

// ---- lookups ----

/** dm_btree_lookup: the value stored under `keys` (a copy), or undefined. */
export async function lookup(info: BtreeInfo, root: number, keys: readonly number[]): Promise<Buffer | undefined> {
  for (let level = 0; level < info.levels; level++) {
    const key = keys[level]!;
    let n = await info.tm.read(root, V);
    while (!isLeaf(n)) {
      const i = lowerBound(n, key);
      if (i < 0 || i >= nrEntries(n)) return undefined;
      n = await info.tm.read(value64(n, i), V);
    }
    const i = lowerBound(n, key);
    if (i < 0 || i >= nrEntries(n) || keyAt(n, i) !== key) return undefined;
    if (level === info.levels - 1) return Buffer.from(valueAt(n, i));
    root = value64(n, i);
  }
  return undefined;
}

/**
 * The same lookup using only blocks already in memory (dm-thin's non-blocking lookup from the map
 * path): WOULD_BLOCK, with the missing block being read in, when one is not.
 */
export function tryLookup(
  info: BtreeInfo,
  root: number,
  keys: readonly number[],
): Buffer | undefined | typeof WOULD_BLOCK {
  const tm = info.tm;
  const get = (b: number): Buffer | undefined => {
    const n = tm.peek(b, V);
    if (!n) tm.prefetch(b);
    return n;
  };
  for (let level = 0; level < info.levels; level++) {
    const key = keys[level]!;
    let n = get(root);
    if (!n) return WOULD_BLOCK;
    while (!isLeaf(n)) {
      const i = lowerBound(n, key);
      if (i < 0 || i >= nrEntries(n)) return undefined;
      n = get(value64(n, i));
      if (!n) return WOULD_BLOCK;
    }
    const i = lowerBound(n, key);
    if (i < 0 || i >= nrEntries(n) || keyAt(n, i) !== key) return undefined;
    if (level === info.levels - 1) return Buffer.from(valueAt(n, i));
    root = value64(n, i);
  }
  return undefined;
}

export interface KeyValue {
  key: number;
  value: Buffer;
}

/** dm_btree_lookup_next: the entry with the lowest last-level key ≥ keys[last] (upper keys exact). */
export async function lookupNext(
  info: BtreeInfo,
  root: number,
  keys: readonly number[],
): Promise<KeyValue | undefined> {
  const last = info.levels - 1;
  for (let level = 0; level < last; level++) {
    const sub = await lookup({ ...info, levels: 1, valueType: { size: 8 } }, root, [keys[level]!]);
    if (!sub) return undefined;
    root = readU64(sub, 0);
  }
  return lookupNextSingle(info, root, keys[last]!);
}

async function lookupNextSingle(info: BtreeInfo, b: number, key: number): Promise<KeyValue | undefined> {
  const n = await info.tm.read(b, V);
  const nr = nrEntries(n);
  if (isInternal(n)) {
    const i = Math.max(lowerBound(n, key), 0);
    if (i >= nr) return undefined;
    const found = await lookupNextSingle(info, value64(n, i), key);
    if (found || i >= nr - 1) return found;
    return lookupNextSingle(info, value64(n, i + 1), key);
  }
  const i = upperBound(n, key);
  if (i >= nr) return undefined;
  return { key: keyAt(n, i), value: Buffer.from(valueAt(n, i)) };
}

/** dm_btree_find_highest_key of a one-level tree: undefined when it is empty. */
export async function findHighestKey(info: BtreeInfo, root: number): Promise<number | undefined> {
  return findEdgeKey(info, root, true);
}

export async function findLowestKey(info: BtreeInfo, root: number): Promise<number | undefined> {
  return findEdgeKey(info, root, false);
}

async function findEdgeKey(info: BtreeInfo, root: number, highest: boolean): Promise<number | undefined> {
  let n = await info.tm.read(root, V);
  for (;;) {
    const nr = nrEntries(n);
    if (nr === 0) return undefined;
    const i = highest ? nr - 1 : 0;
    if (isLeaf(n)) return keyAt(n, i);
    n = await info.tm.read(value64(n, i), V);
  }
}

/**
 * Every entry in key order, `keys` holding one key per level. The value is a view of the node:
 * copy it to keep it. `visit` must not modify any tree.
 */
export async function walk(
  info: BtreeInfo,
  root: number,
  visit: (keys: readonly number[], value: Buffer) => void | Promise<void>,
): Promise<void> {
  const keys: number[] = [];
  const walkNode = async (b: number, level: number): Promise<void> => {
    const n = await info.tm.read(b, V);
    const nr = nrEntries(n);
    for (let i = 0; i < nr; i++) {
      if (isInternal(n)) {
        await walkNode(value64(n, i), level);
        continue;
      }
      keys[level] = keyAt(n, i);
      if (level < info.levels - 1) await walkNode(value64(n, i), level + 1);
      else await visit(keys.slice(0, level + 1), valueAt(n, i));
    }
  };
  await walkNode(root, 0);
}

// ---- delete a whole tree ----

/**
 * dm_btree_del: drop the tree's reference on its root. A node still shared with another tree only
 * loses that reference; one that was ours alone drops what it points to (children, subtrees, the
 * values' references) and is freed.
 */
export async function deleteTree(info: BtreeInfo, root: number): Promise<void> {
  const tm = info.tm;
  const del = async (b: number, level: number): Promise<void> => {
    if ((await tm.refCount(b)) > 1) {
      await tm.dec(b);
      return;
    }
    const n = await tm.read(b, V);
    const nr = nrEntries(n);
    if (isInternal(n)) {
      for (let i = 0; i < nr; i++) await del(value64(n, i), level);
    } else if (level < info.levels - 1) {
      for (let i = 0; i < nr; i++) await del(value64(n, i), level + 1);
    } else if (info.valueType.dec) {
      for (let i = 0; i < nr; i++) await info.valueType.dec(Buffer.from(valueAt(n, i)));
    }
    await tm.dec(b);
  };
  await del(root, 0);
}
