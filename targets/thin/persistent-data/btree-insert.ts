/**
 * Inserting into a btree (dm-btree.c: dm_btree_insert_notify and the splitting it needs). Every
 * full node on the way down gets room first (a split, or entries moved to a sibling), so the leaf
 * always has a free slot when the walk reaches it.
 */
import {
  INTERNAL_NODE,
  NODE_HEADER_SIZE,
  btreeNodeValidator,
  calcMaxEntries,
  initLike,
  initNode,
  insertAt,
  isLeaf,
  keyAt,
  lowerBound,
  maxEntries,
  moveEntries,
  nrEntries,
  redistribute2,
  setKey,
  setNrEntries,
  setValue64,
  value64,
  valueAt,
  valueOffset,
} from "./btree-node.js";
import {
  type BtreeInfo,
  type BtreeValueType,
  ShadowSpine,
  emptyTree,
  le64,
  le64ValueType,
  shadowChild,
} from "./btree.js";

const V = btreeNodeValidator;

/** Does the leaf need a new entry at `index` for `key` (or is it an overwrite)? */
function needInsert(n: Buffer, key: number, index: number): boolean {
  return index >= nrEntries(n) || keyAt(n, index) !== key;
}

/** has_space_for_insert: a full leaf can still take an overwrite. */
function hasSpaceForInsert(n: Buffer, key: number): boolean {
  if (nrEntries(n) < maxEntries(n)) return true;
  if (!isLeaf(n)) return false;
  const i = lowerBound(n, key);
  return i >= 0 && keyAt(n, i) === key;
}

/**
 * btree_split_beneath: the full root keeps its block and becomes an internal node over two new
 * children holding its entries.
 */
async function splitBeneath(s: ShadowSpine): Promise<void> {
  const tm = s.info.tm;
  const pn = s.node();
  const nr = nrEntries(pn);
  const nrLeft = Math.floor(nr / 2);
  const left = await tm.newBlock(V);
  initLike(left.data, pn);
  moveEntries(left.data, 0, pn, 0, nrLeft);
  setNrEntries(left.data, nrLeft);
  const right = await tm.newBlock(V);
  initLike(right.data, pn);
  moveEntries(right.data, 0, pn, nrLeft, nr - nrLeft);
  setNrEntries(right.data, nr - nrLeft);

  pn.fill(0, NODE_HEADER_SIZE);
  initNode(pn, INTERNAL_NODE, calcMaxEntries(8), 8);
  setKey(pn, 0, keyAt(left.data, 0));
  setValue64(pn, 0, left.location);
  setKey(pn, 1, keyAt(right.data, 0));
  setValue64(pn, 1, right.location);
  setNrEntries(pn, 2);
}

/** split_one_into_two: a new right sibling takes half the entries; the parent has room for it. */
async function splitOneIntoTwo(s: ShadowSpine, parentIndex: number, key: number): Promise<void> {
  const left = s.current!;
  const right = await s.info.tm.newBlock(V);
  initLike(right.data, left.data);
  redistribute2(left.data, right.data);
  insertAt(s.parent!.data, parentIndex + 1, keyAt(right.data, 0), le64(right.location));
  if (key >= keyAt(right.data, 0)) s.current = right;
}

/** Free entries in a node (get_node_free_space). */
async function freeSpace(info: BtreeInfo, b: number): Promise<number> {
  const n = await info.tm.read(b, V);
  return maxEntries(n) - nrEntries(n);
}

/** A sibling with at least this many free entries takes some of a full node's entries instead of a split. */
const SPACE_THRESHOLD = 8;

/**
 * rebalance_or_split: make room in the full current node by moving entries to an unshared
 * sibling that has space, or else by splitting it. (The kernel also splits two nodes into three
 * in the middle of a node; a split into two keeps every node at least half full just as well.)
 */
async function rebalanceOrSplit(s: ShadowSpine, vt: BtreeValueType, parentIndex: number, key: number): Promise<void> {
  const info = s.info;
  const parent = s.parent!.data;
  const nrParent = nrEntries(parent);
  if (parentIndex > 0) {
    const b = value64(parent, parentIndex - 1);
    if (!(await info.tm.isShared(b)) && (await freeSpace(info, b)) >= SPACE_THRESHOLD) {
      const sib = await shadowChild(info, vt, parent, parentIndex - 1);
      const cur = s.current!;
      redistribute2(sib.data, cur.data);
      setKey(parent, parentIndex, keyAt(cur.data, 0));
      if (key < keyAt(cur.data, 0)) s.current = sib;
      return;
    }
  }
  if (parentIndex < nrParent - 1) {
    const b = value64(parent, parentIndex + 1);
    if (!(await info.tm.isShared(b)) && (await freeSpace(info, b)) >= SPACE_THRESHOLD) {
      const sib = await shadowChild(info, vt, parent, parentIndex + 1);
      redistribute2(s.current!.data, sib.data);
      setKey(parent, parentIndex + 1, keyAt(sib.data, 0));
      if (key >= keyAt(sib.data, 0)) s.current = sib;
      return;
    }
  }
  await splitOneIntoTwo(s, parentIndex, key);
}

/**
 * btree_insert_raw: shadow the path to the leaf where `key` belongs, making room in every full
 * node on the way, and return the index of `key` in that leaf (where it is, or where it goes).
 * `parentIndex` is where the first node hangs in the spine's current node (upper level), or -1.
 */
async function insertRaw(
  s: ShadowSpine,
  root: number,
  vt: BtreeValueType,
  key: number,
  parentIndex: number,
): Promise<number> {
  let i = parentIndex;
  let top = true;
  let node: Buffer;
  for (;;) {
    await s.step(root, vt);
    if (s.parent && i >= 0) setValue64(s.parent.data, i, s.current!.location);
    if (!hasSpaceForInsert(s.node(), key)) {
      if (top) await splitBeneath(s);
      else await rebalanceOrSplit(s, vt, i, key);
    }
    node = s.node();
    i = lowerBound(node, key);
    if (isLeaf(node)) break;
    if (i < 0) {
      // The key is below everything: the leftmost child's bound moves down to it.
      setKey(node, 0, key);
      i = 0;
    }
    root = value64(node, i);
    top = false;
  }
  if (i < 0 || keyAt(node, i) !== key) i++;
  return i;
}

/**
 * dm_btree_insert_notify: store `value` under `keys`; `inserted` is false for an overwrite (the
 * old value's reference is dropped unless it equals the new one). The value's own reference is
 * the caller's to take.
 */
export async function insert(
  info: BtreeInfo,
  root: number,
  keys: readonly number[],
  value: Buffer,
): Promise<{ root: number; inserted: boolean }> {
  const s = new ShadowSpine(info);
  const upper = le64ValueType(info.tm);
  const last = info.levels - 1;
  let block = root;
  let index = -1;
  for (let level = 0; level < last; level++) {
    index = await insertRaw(s, block, upper, keys[level]!, index);
    const n = s.node();
    if (needInsert(n, keys[level]!, index)) {
      // A missing key in an upper level gets a new, empty tree of the level below.
      const below = level + 1 === last ? info : { ...info, valueType: upper };
      insertAt(n, index, keys[level]!, le64(await emptyTree(below)));
    }
    block = value64(n, index);
  }
  index = await insertRaw(s, block, info.valueType, keys[last]!, index);
  const n = s.node();
  const vt = info.valueType;
  if (needInsert(n, keys[last]!, index)) {
    insertAt(n, index, keys[last]!, value);
    return { root: s.root, inserted: true };
  }
  const old = Buffer.from(valueAt(n, index));
  if (vt.dec && !vt.equal?.(old, value)) await vt.dec(old);
  value.copy(n, valueOffset(n, index), 0, vt.size);
  return { root: s.root, inserted: false };
}
