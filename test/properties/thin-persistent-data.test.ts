/**
 * Properties of the btree and the space maps under the thin pool, each against a plain Map:
 *
 * - btree: random inserts, overwrites and removals (with commits, reopens from disk and a shared
 *   copy of the tree that must not change) read back as the model, in order, with every node valid
 *   and at least a third full, and every node's reference count equal to the trees pointing at it;
 * - data space map: counts (across 2, where they move to the ref-count tree), allocation (never a
 *   block in use now or at the last commit; ENOSPC exactly when there is none), extension, commits
 *   and reopens;
 * - metadata space map: the same for blocks taken from it, while its own structures (index,
 *   bitmaps, ref-count tree), which live in the blocks it counts, stay counted exactly once.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { type BlockValidator, BlockManager } from "../../targets/thin/persistent-data/block-manager.js";
import {
  type BtreeInfo,
  deleteTree,
  emptyTree,
  findHighestKey,
  lookup,
  lookupNext,
  walk,
} from "../../targets/thin/persistent-data/btree.js";
import { insert } from "../../targets/thin/persistent-data/btree-insert.js";
import { remove } from "../../targets/thin/persistent-data/btree-remove.js";
import {
  btreeNodeValidator,
  isInternal,
  keyAt,
  maxEntries,
  nrEntries,
  value64,
} from "../../targets/thin/persistent-data/btree-node.js";
import { PersistentDataError } from "../../targets/thin/persistent-data/errors.js";
import { type SpaceMap, decodeSmRoot, readU64, writeU64 } from "../../targets/thin/persistent-data/space-map.js";
import { ENTRIES_PER_BLOCK, decodeIndexEntry } from "../../targets/thin/persistent-data/space-map-bitmap.js";
import { DiskSpaceMap } from "../../targets/thin/persistent-data/space-map-disk.js";
import { MetadataSpaceMap, indexValidator } from "../../targets/thin/persistent-data/space-map-metadata.js";
import { TransactionManager } from "../../targets/thin/persistent-data/transaction-manager.js";

/** Block 0 of these tests: the metadata space map root, then up to 8 u64 roots; no checksum. */
const ROOT_BLOCK: BlockValidator = { name: "test root", prepareForWrite() {}, check() {} };

/** A metadata device with its space map and transaction manager, committed and reopened like a pool's. */
class Store {
  private constructor(
    readonly dev: BlockDevice,
    readonly bm: BlockManager,
    readonly tm: TransactionManager,
    readonly sm: MetadataSpaceMap,
  ) {}

  /** A device of `blocks` blocks whose space map covers the first `smBlocks` (room to extend it). */
  static async format(blocks: number, smBlocks = blocks): Promise<Store> {
    const dev = new MemoryDevice(blocks * 8);
    const bm = new BlockManager(dev);
    const tm = new TransactionManager(bm);
    return new Store(dev, bm, tm, await MetadataSpaceMap.create(tm, smBlocks, 0));
  }

  /** Commit with `roots` (and `extra`, a 32-byte space map root) recorded in block 0. */
  async commit(roots: number[], extra?: () => Buffer): Promise<void> {
    await this.tm.preCommit();
    const sb = this.bm.writeLockZero(0, ROOT_BLOCK);
    this.sm.root().copy(sb, 0);
    roots.forEach((r, i) => writeU64(sb, 32 + 8 * i, r));
    extra?.().copy(sb, 128);
    await this.tm.commit(0);
  }

  async reopen(nroots: number): Promise<{ store: Store; roots: number[]; extra: Buffer }> {
    const bm = new BlockManager(this.dev);
    const tm = new TransactionManager(bm);
    const sb = Buffer.from(await bm.read(0, ROOT_BLOCK));
    const sm = await MetadataSpaceMap.open(tm, sb.subarray(0, 32));
    const roots = Array.from({ length: nroots }, (_, i) => readU64(sb, 32 + 8 * i));
    return { store: new Store(this.dev, bm, tm, sm), roots, extra: sb.subarray(128, 160) };
  }
}

const u64 = (v: number): Buffer => {
  const b = Buffer.alloc(8);
  writeU64(b, 0, v);
  return b;
};

/**
 * Walk `roots` checking node invariants (every non-root node a third full, keys ordered and within
 * their parent's bounds); adds one reference per pointer to `refs`.
 */
async function checkTrees(info: BtreeInfo, roots: number[], refs: Map<number, number>): Promise<void> {
  const seen = new Set<number>();
  const errors: string[] = [];
  const visit = async (b: number, lo: number, hi: number, isRoot: boolean): Promise<void> => {
    refs.set(b, (refs.get(b) ?? 0) + 1);
    if (seen.has(b)) return;
    seen.add(b);
    const n = await info.tm.read(b, btreeNodeValidator);
    const nr = nrEntries(n);
    if (!isRoot && nr < Math.floor(maxEntries(n) / 3)) errors.push(`node ${b}: ${nr} entries`);
    for (let i = 0; i < nr; i++) {
      const k = keyAt(n, i);
      if (k < lo || k >= hi || (i > 0 && k <= keyAt(n, i - 1))) errors.push(`node ${b}: key ${i} = ${k}`);
    }
    if (isInternal(n)) {
      for (let i = 0; i < nr; i++) {
        await visit(value64(n, i), i === 0 ? lo : keyAt(n, i), i + 1 < nr ? keyAt(n, i + 1) : hi, false);
      }
    }
  };
  for (const r of roots) await visit(r, 0, Number.MAX_SAFE_INTEGER, true);
  expect(errors).toEqual([]);
}

/** Blocks whose count is not what `expected` says (absent: 0), as [block, count, expected]. */
async function countMismatches(sm: SpaceMap, blocks: Iterable<number>, expected: Map<number, number>) {
  const bad: [number, number, number][] = [];
  for (const b of blocks) {
    const count = await sm.getCount(b);
    if (count !== (expected.get(b) ?? 0)) bad.push([b, count, expected.get(b) ?? 0]);
  }
  return bad;
}

async function entries(info: BtreeInfo, root: number): Promise<[number, number][]> {
  const out: [number, number][] = [];
  await walk(info, root, (keys, v) => void out.push([keys[0]!, readU64(v, 0)]));
  return out;
}

function sorted(model: Map<number, number>): [number, number][] {
  return [...model].sort((a, b) => a[0] - b[0]);
}

/** The first place two lists of entries differ (cheaper than a deep equality on 60000 of them). */
function firstDifference(actual: [number, number][], expected: [number, number][]): string | undefined {
  const n = Math.max(actual.length, expected.length);
  for (let i = 0; i < n; i++) {
    const a = actual[i];
    const e = expected[i];
    if (a?.[0] !== e?.[0] || a?.[1] !== e?.[1])
      return `entry ${i}: ${JSON.stringify(a)} instead of ${JSON.stringify(e)}`;
  }
  return undefined;
}

type TreeOp =
  | { op: "insert"; key: number; value: number }
  | { op: "remove"; key: number }
  | { op: "commit" }
  | { op: "reopen" }
  | { op: "share" };

const key = fc.oneof(fc.integer({ min: 0, max: 3000 }), fc.integer({ min: 0, max: 2 ** 52 }));
const treeOp: fc.Arbitrary<TreeOp> = fc.oneof(
  { weight: 12, arbitrary: fc.record({ op: fc.constant("insert" as const), key, value: fc.nat() }) },
  { weight: 6, arbitrary: fc.record({ op: fc.constant("remove" as const), key }) },
  { weight: 1, arbitrary: fc.constant({ op: "commit" as const }) },
  { weight: 1, arbitrary: fc.constant({ op: "reopen" as const }) },
  { weight: 1, arbitrary: fc.constant({ op: "share" as const }) },
);

describe("btree against a Map", () => {
  it("reads back as the model, keeps its invariants, and a shared copy never changes", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(treeOp, { minLength: 1, maxLength: 1500, size: "max" }), async (ops) => {
        let store = await Store.format(1024);
        const infoOf = (s: Store): BtreeInfo => ({ tm: s.tm, levels: 1, valueType: { size: 8 } });
        let info = infoOf(store);
        let root = await emptyTree(info);
        const model = new Map<number, number>();
        let shared: { root: number; model: Map<number, number> } | null = null;
        for (const o of ops) {
          if (o.op === "insert") {
            const r = await insert(info, root, [o.key], u64(o.value));
            expect(r.inserted).toBe(!model.has(o.key));
            root = r.root;
            model.set(o.key, o.value);
          } else if (o.op === "remove") {
            const r = await remove(info, root, [o.key]);
            expect(r.removed).toBe(model.delete(o.key));
            root = r.root;
          } else if (o.op === "share" && !shared) {
            // The tree gets a second owner: what one changes from now on, the other must not see.
            await store.tm.inc(root);
            shared = { root, model: new Map(model) };
          } else {
            await store.commit([root, shared?.root ?? 0]);
            if (o.op === "reopen") {
              const reopened = await store.reopen(2);
              store = reopened.store;
              info = infoOf(store);
              [root] = reopened.roots as [number];
            }
          }
        }
        expect(await entries(info, root)).toEqual(sorted(model));
        for (const k of [...model.keys()].slice(0, 50))
          expect(readU64((await lookup(info, root, [k]))!, 0)).toBe(model.get(k));
        expect(await lookup(info, root, [2 ** 52 + 1])).toBeUndefined();
        const keys = [...model.keys()].sort((a, b) => a - b);
        expect(await findHighestKey(info, root)).toBe(keys.at(-1));
        for (const probe of [0, 1500, 2999, 2 ** 40]) {
          const want = keys.find((k) => k >= probe);
          expect((await lookupNext(info, root, [probe]))?.key).toBe(want);
        }
        if (shared) expect(await entries(info, shared.root)).toEqual(sorted(shared.model));

        // Every node is referenced exactly as many times as its count says.
        const refs = new Map<number, number>();
        await checkTrees(info, shared ? [root, shared.root] : [root], refs);
        expect(await countMismatches(store.sm, refs.keys(), refs)).toEqual([]);

        // Deleting both trees gives back every block they held.
        await store.commit([root, shared?.root ?? 0]);
        const baseline = store.sm.nrFree() + refs.size;
        await deleteTree(info, root);
        if (shared) await deleteTree(info, shared.root);
        await store.commit([]);
        expect(store.sm.nrFree()).toBe(baseline);
      }),
      { numRuns: 40 },
    );
  });

  it("holds 60000 keys in three levels, then empties back to a single leaf", async () => {
    const store = await Store.format(4096);
    const info: BtreeInfo = { tm: store.tm, levels: 1, valueType: { size: 8 } };
    let root = await emptyTree(info);
    const model = new Map<number, number>();
    let x = 12345;
    const next = () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0);
    for (let i = 0; i < 60000; i++) {
      const k = i % 2 === 0 ? i : next() % 1_000_000;
      root = (await insert(info, root, [k], u64(i))).root;
      model.set(k, i);
      if (i % 10000 === 9999) await store.commit([root]);
    }
    const rootNode = await store.tm.read(root, btreeNodeValidator);
    expect(isInternal(rootNode)).toBe(true);
    expect(isInternal(await store.tm.read(value64(rootNode, 0), btreeNodeValidator))).toBe(true);
    expect(firstDifference(await entries(info, root), sorted(model))).toBeUndefined();
    await checkTrees(info, [root], new Map());
    for (const k of [...model.keys()]) {
      root = (await remove(info, root, [k])).root;
      model.delete(k);
      if (model.size % 20011 === 0) {
        await checkTrees(info, [root], new Map());
        expect(firstDifference(await entries(info, root), sorted(model))).toBeUndefined();
      }
    }
    const n = await store.tm.read(root, btreeNodeValidator);
    expect([isInternal(n), nrEntries(n)]).toEqual([false, 0]);
  });
});

type SmOp =
  | { op: "new" }
  | { op: "inc"; pick: number }
  | { op: "dec"; pick: number }
  | { op: "set"; pick: number; count: number }
  | { op: "commit" }
  | { op: "reopen" }
  | { op: "extend"; by: number };

const smOp = (extend: boolean): fc.Arbitrary<SmOp> =>
  fc.oneof(
    { weight: 8, arbitrary: fc.constant({ op: "new" as const }) },
    { weight: 6, arbitrary: fc.record({ op: fc.constant("inc" as const), pick: fc.nat() }) },
    { weight: 6, arbitrary: fc.record({ op: fc.constant("dec" as const), pick: fc.nat() }) },
    {
      weight: 2,
      arbitrary: fc.record({ op: fc.constant("set" as const), pick: fc.nat(), count: fc.integer({ min: 0, max: 6 }) }),
    },
    { weight: 1, arbitrary: fc.constant({ op: "commit" as const }) },
    { weight: 1, arbitrary: fc.constant({ op: "reopen" as const }) },
    {
      weight: extend ? 1 : 0,
      arbitrary: fc.record({ op: fc.constant("extend" as const), by: fc.integer({ min: 16, max: 20000 }) }),
    },
  );

async function enospc(p: Promise<number>): Promise<number | "ENOSPC"> {
  try {
    return await p;
  } catch (err) {
    if (err instanceof PersistentDataError && err.errno === "ENOSPC") return "ENOSPC";
    throw err;
  }
}

/** Metadata blocks the metadata space map's own structures use, each counted once. */
async function spaceMapOwnBlocks(store: Store, root: Buffer): Promise<Map<number, number>> {
  const refs = new Map<number, number>([[0, 1]]);
  const r = decodeSmRoot(root);
  refs.set(r.bitmapRoot, 1);
  const index = await store.tm.read(r.bitmapRoot, indexValidator);
  for (let i = 0; i < Math.ceil(r.nrBlocks / ENTRIES_PER_BLOCK); i++) {
    refs.set(decodeIndexEntry(index, 16 + 16 * i).blocknr, 1);
  }
  await checkTrees({ tm: store.tm, levels: 1, valueType: { size: 4 } }, [r.refCountRoot], refs);
  return refs;
}

describe("space maps against a Map", () => {
  it("data space map: counts, allocation of blocks free now and at the last commit, ENOSPC, extension", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 40000 }),
        fc.array(smOp(true), { minLength: 1, maxLength: 400, size: "max" }),
        async (nrBlocks, ops) => {
          let store = await Store.format(2048);
          let sm: SpaceMap = await DiskSpaceMap.create(store.tm, nrBlocks);
          const counts = new Map<number, number>();
          let committed = new Map<number, number>();
          let size = nrBlocks;
          const used = () => [...counts.keys()].filter((b) => counts.get(b)! > 0);
          const pickBlock = (pick: number) => pick % size;
          for (const o of ops) {
            if (o.op === "new") {
              const free = size - new Set([...used(), ...[...committed].filter(([, c]) => c > 0).map(([b]) => b)]).size;
              const b = await enospc(sm.newBlock());
              if (free === 0) {
                expect(b).toBe("ENOSPC");
                continue;
              }
              expect(b).not.toBe("ENOSPC");
              const n = b as number;
              expect(counts.get(n) ?? 0).toBe(0);
              expect(committed.get(n) ?? 0).toBe(0);
              counts.set(n, 1);
            } else if (o.op === "inc") {
              const b = pickBlock(o.pick);
              await sm.inc(b);
              counts.set(b, (counts.get(b) ?? 0) + 1);
            } else if (o.op === "dec") {
              const u = used();
              if (u.length === 0) continue;
              const b = u[o.pick % u.length]!;
              await sm.dec(b);
              counts.set(b, counts.get(b)! - 1);
            } else if (o.op === "set") {
              const b = pickBlock(o.pick);
              await sm.setCount(b, o.count);
              counts.set(b, o.count);
            } else if (o.op === "extend") {
              await sm.extend(o.by);
              size += o.by;
            } else {
              await sm.commit();
              await store.commit([], () => sm.root());
              committed = new Map(counts);
              if (o.op === "reopen") {
                const reopened = await store.reopen(0);
                store = reopened.store;
                sm = DiskSpaceMap.open(store.tm, Buffer.from(reopened.extra));
              }
            }
            expect(sm.nrBlocks).toBe(size);
          }
          expect(await countMismatches(sm, counts.keys(), counts)).toEqual([]);
          expect(sm.nrFree()).toBe(size - used().length);
          expect(decodeSmRoot(sm.root()).nrAllocated).toBe(used().length);
        },
      ),
      { numRuns: 60 },
    );
  });

  it("metadata space map: blocks taken from it keep their counts while its own blocks stay counted once", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(smOp(true), { minLength: 1, maxLength: 400, size: "max" }), async (ops) => {
        const deviceBlocks = 3 * ENTRIES_PER_BLOCK;
        let store = await Store.format(deviceBlocks, 1000);
        const counts = new Map<number, number>();
        let committed = new Map<number, number>();
        const ours = () => [...counts.keys()].filter((b) => counts.get(b)! > 0);
        for (const o of ops) {
          const sm = store.sm;
          if (o.op === "new") {
            const b = await enospc(sm.newBlock());
            if (b === "ENOSPC") {
              // The free count never overstates what can be allocated.
              expect(sm.nrFree()).toBe(0);
              continue;
            }
            expect(counts.get(b) ?? 0).toBe(0);
            expect(committed.get(b) ?? 0).toBe(0);
            counts.set(b, 1);
          } else if (o.op === "inc" || o.op === "dec" || o.op === "set") {
            const u = ours();
            if (u.length === 0) continue;
            const b = u[o.pick % u.length]!;
            if (o.op === "inc") {
              await sm.inc(b);
              counts.set(b, counts.get(b)! + 1);
            } else if (o.op === "dec") {
              await sm.dec(b);
              counts.set(b, counts.get(b)! - 1);
            } else {
              const c = Math.max(1, o.count);
              await sm.setCount(b, c);
              counts.set(b, c);
            }
          } else if (o.op === "extend") {
            if (sm.nrBlocks + o.by <= deviceBlocks) await sm.extend(o.by);
          } else {
            await store.commit([]);
            committed = new Map([...counts].filter(([, c]) => c > 0));
            if (o.op === "reopen") store = (await store.reopen(0)).store;
          }
        }
        await store.commit([]);
        const expected = await spaceMapOwnBlocks(store, store.sm.root());
        for (const [b, c] of counts) expected.set(b, (expected.get(b) ?? 0) + c);
        const all = Array.from({ length: store.sm.nrBlocks }, (_, b) => b);
        expect(await countMismatches(store.sm, all, expected)).toEqual([]);
      }),
      { numRuns: 40 },
    );
  });
});
