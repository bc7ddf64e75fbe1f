/**
 * Removing a key from a btree (dm-btree-remove.c).
 *
 * Every node but a tree's root must keep at least a third of its capacity (max_entries / 3, what
 * thin_check demands). Removal walks down once, top to bottom: before stepping into a child, a
 * child at that minimum is merged with a sibling or takes entries from it, so it can lose one
 * entry (or one child) on the way back without going below the minimum. A root left with a single
 * child takes that child's place.
 *
 * The kernel merges only below 2 × min + 1 entries, so a redistributed child can end at min and,
 * after the removal, at min − 1; merging up to 2 × min + 1 keeps both halves of a redistribution
 * above the minimum.
 */
import {
  btreeNodeValidator,
  deleteAt,
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
} from "./btree-node.js";
import { type BtreeInfo, type BtreeValueType, ShadowSpine, incChildren, le64ValueType, shadowChild } from "./btree.js";

const V = btreeNodeValidator;

function minEntries(n: Buffer): number {
  return Math.floor(maxEntries(n) / 3);
}

/**
 * The root `n` has a single child: copy the child over it (a shared child's children get one more
 * reference, from the root's copy) and drop the child.
 */
async function collapseRoot(info: BtreeInfo, vt: BtreeValueType, n: Buffer): Promise<void> {
  const child = value64(n, 0);
  const shared = await info.tm.isShared(child);
  (await info.tm.read(child, V)).copy(n);
  if (shared) await incChildren(info.tm, n, vt);
  await info.tm.dec(child);
}

/**
 * Make child `i` of `parent` hold more than the minimum, using its right sibling (or its left one
 * when it is the last). Returns whether anything moved.
 */
async function rebalanceChild(info: BtreeInfo, vt: BtreeValueType, parent: Buffer, i: number): Promise<boolean> {
  const child = await info.tm.read(value64(parent, i), V);
  const min = minEntries(child);
  if (nrEntries(child) > min || nrEntries(parent) < 2) return false;
  const li = i + 1 < nrEntries(parent) ? i : i - 1;
  const left = await shadowChild(info, vt, parent, li);
  const right = await shadowChild(info, vt, parent, li + 1);
  const nrLeft = nrEntries(left.data);
  const nrRight = nrEntries(right.data);
  if (nrLeft + nrRight < 2 * min + 2) {
    moveEntries(left.data, nrLeft, right.data, 0, nrRight);
    setNrEntries(left.data, nrLeft + nrRight);
    deleteAt(parent, li + 1);
    // Only the right node goes: its children now hang under the left one.
    await info.tm.dec(right.location);
  } else {
    redistribute2(left.data, right.data);
    setKey(parent, li + 1, keyAt(right.data, 0));
  }
  return true;
}

/**
 * remove_raw: shadow the path to the leaf holding `key` in one level, rebalancing on the way.
 * Returns the key's index in the spine's current leaf, or -1 when it is not there.
 */
async function removeRaw(
  s: ShadowSpine,
  vt: BtreeValueType,
  root: number,
  key: number,
  parentIndex: number,
): Promise<number> {
  const info = s.info;
  let i = parentIndex;
  let levelRoot = true;
  for (;;) {
    await s.step(root, vt);
    if (s.parent && i >= 0) setValue64(s.parent.data, i, s.current!.location);
    const n = s.node();
    for (;;) {
      if (isLeaf(n)) {
        const j = lowerBound(n, key);
        return j >= 0 && j < nrEntries(n) && keyAt(n, j) === key ? j : -1;
      }
      if (levelRoot && nrEntries(n) === 1) {
        await collapseRoot(info, vt, n);
        continue;
      }
      i = lowerBound(n, key);
      if (i < 0) return -1;
      if (await rebalanceChild(info, vt, n, i)) continue;
      break;
    }
    root = value64(n, i);
    levelRoot = false;
  }
}

/**
 * dm_btree_remove: drop the entry under `keys` (its value's reference too). The tree's root
 * changes even when the key is absent (`removed` false): the path was shadowed on the way down.
 */
export async function remove(
  info: BtreeInfo,
  root: number,
  keys: readonly number[],
): Promise<{ root: number; removed: boolean }> {
  const s = new ShadowSpine(info);
  const upper = le64ValueType(info.tm);
  const last = info.levels - 1;
  let index = -1;
  for (let level = 0; level <= last; level++) {
    const vt = level === last ? info.valueType : upper;
    index = await removeRaw(s, vt, root, keys[level]!, index);
    if (index < 0) return { root: s.root, removed: false };
    const n = s.node();
    if (level < last) {
      root = value64(n, index);
      continue;
    }
    if (vt.dec) await vt.dec(Buffer.from(valueAt(n, index)));
    deleteAt(n, index);
  }
  return { root: s.root, removed: true };
}
