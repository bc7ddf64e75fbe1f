/**
 * ExceptionTable (targets/snapshot/exception-table.ts): the complete-exception table, checked
 * against a plain Map model (runs and the middle-removal rule recomputed chunk by chunk), plus
 * wide chunk numbers, 10^6 entries, sizing (B2), merge order (dm-snap-persistent.c:
 * persistent_prepare_merge) and clear() yielding (R22). B and R numbers: docs/snapshot.md, "Race
 * and bug tests".
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { benchExceptionTable } from "../../bench/exception-table.js";
import { ExceptionTable } from "../../targets/snapshot/exception-table.js";

// ---- the model: one Map entry per chunk, no cleverness; arithmetic (not bitwise) groups --------

const group = (c: number) => Math.floor(c / 256);

/** Does `c` continue `c - 1` (same 256-chunk group, new chunks consecutive)? */
function linkedToPrevious(model: Map<number, number>, c: number): boolean {
  const m = model.get(c);
  return m !== undefined && c % 256 !== 0 && model.get(c - 1) === m - 1;
}

function modelRun(model: Map<number, number>, c: number): [number, number] {
  let a = c;
  while (linkedToPrevious(model, a)) a--;
  let b = c;
  while (linkedToPrevious(model, b + 1)) b++;
  return [a, b];
}

/** What remove(c) must do: throw this message, or succeed (null). */
function modelRemoveError(model: Map<number, number>, c: number): string | null {
  if (!model.has(c)) return `Corruption detected: exception for block ${c} is on disk but not in memory`;
  if (linkedToPrevious(model, c) && linkedToPrevious(model, c + 1)) {
    const [a, b] = modelRun(model, c);
    return `Attempt to merge block ${c} from the middle of a chunk range [${a} - ${b}]`;
  }
  return null;
}

/** Maximal runs inside 256-chunk groups, sorted by old chunk. */
function modelRuns(model: Map<number, number>): [number, number, number][] {
  const runs: [number, number, number][] = [];
  for (const c of [...model.keys()].sort((x, y) => x - y)) {
    if (linkedToPrevious(model, c)) runs[runs.length - 1]![2]++;
    else runs.push([c, model.get(c)!, 1]);
  }
  return runs;
}

/** Entries of the canonical aligned-block decomposition: what the compression should cost. */
function modelBlockCount(model: Map<number, number>): number {
  const groups = new Set([...model.keys()].map(group));
  const count = (start: number, len: number): number => {
    const first = model.get(start);
    let whole = first !== undefined;
    for (let k = 1; whole && k < len; k++) whole = model.get(start + k) === first! + k;
    if (whole) return 1;
    if (len === 1) return 0;
    return count(start, len / 2) + count(start + len / 2, len / 2);
  };
  let total = 0;
  for (const g of groups) total += count(g * 256, 256);
  return total;
}

function tableRuns(table: ExceptionTable): [number, number, number][] {
  const runs: [number, number, number][] = [];
  table.forEach((o, n, count) => runs.push([o, n, count]));
  return runs.sort((x, y) => x[0] - y[0]);
}

function errorOf(fn: () => void): string | null {
  try {
    fn();
    return null;
  } catch (err) {
    return (err as Error).message;
  }
}

/** Random old chunks without repeats or accidental runs: i ↦ i·φ mod 2^31 is a bijection. */
const scattered = (i: number) => Math.imul(i, 0x9e3779b1) & 0x7fffffff;

// ---- examples -------------------------------------------------------------------------------

describe("ExceptionTable basics", () => {
  it("maps, refuses a second exception for a chunk (R5) and reports misses", () => {
    const t = new ExceptionTable();
    expect(t.lookup(5)).toBe(-1);
    t.insert(5, 40);
    expect(t.lookup(5)).toBe(40);
    expect(t.lookup(4)).toBe(-1);
    expect(t.lookup(6)).toBe(-1);
    expect(t.size).toBe(1);
    expect(() => t.insert(5, 41)).toThrow(/chunk 5 already has an exception/);
    expect(t.lookup(5)).toBe(40);
    expect(() => t.insert(-1, 0)).toThrow(RangeError);
    expect(() => t.insert(1.5, 0)).toThrow(RangeError);
    expect(() => t.insert(1, -2)).toThrow(RangeError);
    expect(t.lookup(-1)).toBe(-1);
    expect(t.lookup(5.5)).toBe(-1);
  });

  it("compresses sequential COW: 256 aligned chunks are one entry, runs stop at 256-aligned boundaries", () => {
    const t = new ExceptionTable();
    for (let c = 0; c < 256; c++) t.insert(c, 1000 + c);
    expect(t.size).toBe(256);
    expect(t.entryCount).toBe(1);
    expect(tableRuns(t)).toEqual([[0, 1000, 256]]);
    // Continuing across the boundary starts a new run, as in the kernel.
    for (let c = 256; c < 300; c++) t.insert(c, 1000 + c);
    expect(tableRuns(t)).toEqual([
      [0, 1000, 256],
      [256, 1256, 44],
    ]);
    for (let c = 0; c < 300; c++) expect(t.lookup(c)).toBe(1000 + c);
    expect(t.lookup(300)).toBe(-1);
    // Descending insertion compresses too.
    const d = new ExceptionTable();
    for (let c = 511; c >= 0; c--) d.insert(c, 7 + c);
    expect(d.entryCount).toBe(2);
  });

  it("removes only run ends, with the kernel's error for the middle", () => {
    const t = new ExceptionTable();
    for (let c = 10; c <= 20; c++) t.insert(c, 100 + c - 10);
    expect(() => t.remove(15)).toThrow("Attempt to merge block 15 from the middle of a chunk range [10 - 20]");
    expect(() => t.remove(21)).toThrow("Corruption detected: exception for block 21 is on disk but not in memory");
    t.remove(20);
    t.remove(10);
    expect(tableRuns(t)).toEqual([[11, 101, 9]]);
    expect(t.lookup(10)).toBe(-1);
    expect(t.lookup(20)).toBe(-1);
    expect(t.lookup(19)).toBe(109);

    // 255 and 256 are consecutive on both sides but in different groups: both are run ends.
    const b = new ExceptionTable();
    for (let c = 250; c <= 260; c++) b.insert(c, 1000 + c);
    expect(tableRuns(b)).toEqual([
      [250, 1250, 6],
      [256, 1256, 5],
    ]);
    b.remove(255);
    b.remove(256);
    expect(b.size).toBe(9);
  });

  it("a run is maximal: filling a gap joins two runs", () => {
    const t = new ExceptionTable();
    t.insert(1, 11);
    t.insert(3, 13);
    t.insert(2, 12);
    expect(tableRuns(t)).toEqual([[1, 11, 3]]);
    expect(() => t.remove(2)).toThrow("from the middle of a chunk range [1 - 3]");
  });

  it("removing in merge order (highest new chunk first) never hits the middle check", () => {
    fc.assert(
      fc.property(fc.uniqueArray(fc.nat(2000), { minLength: 1, maxLength: 400 }), (olds) => {
        const t = new ExceptionTable();
        olds.forEach((o, i) => t.insert(o, 2 + i)); // the COW allocates new chunks in order
        for (let i = olds.length - 1; i >= 0; i--) t.remove(olds[i]!);
        expect(t.size).toBe(0);
        expect(t.entryCount).toBe(0);
      }),
      { numRuns: 100 },
    );
  });

  it("refuses changes from inside forEach", () => {
    const t = new ExceptionTable();
    t.insert(1, 1);
    t.insert(9, 9);
    expect(() => t.forEach((o) => t.insert(o + 100, 0))).toThrow("ExceptionTable changed during forEach");
  });
});

// ---- the model comparison --------------------------------------------------------------------

type Op =
  | { op: "insert"; old: number; link: "next" | "prev" | "none"; newChunk: number }
  | { op: "run"; start: number; len: number; newChunk: number; descending: boolean }
  | { op: "remove"; old: number }
  | { op: "removeMapped"; pick: number }
  | { op: "removeRunEnd"; pick: number; last: boolean }
  | { op: "lookup"; old: number };

const SPAN = 1100; // a little over four groups, so runs meet 256-aligned boundaries
const oldArb = fc.nat(SPAN - 1);
const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({
      op: fc.constant("insert" as const),
      old: oldArb,
      link: fc.constantFrom("next" as const, "prev" as const, "none" as const),
      newChunk: fc.nat(3000),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      op: fc.constant("run" as const),
      start: oldArb,
      len: fc.integer({ min: 1, max: 300 }),
      newChunk: fc.nat(3000),
      descending: fc.boolean(),
    }),
  },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("remove" as const), old: oldArb }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant("removeMapped" as const), pick: fc.nat() }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant("removeRunEnd" as const), pick: fc.nat(), last: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("lookup" as const), old: oldArb }) },
);

/**
 * Old chunks are base + [0, SPAN) and new chunks newBase + small: around 0, across 2^31 (the switch
 * to wide slots happens mid-sequence), above 2^32 and just below the 2^52 limit.
 */
const baseArb = fc.constantFrom(0, 2 ** 31 - 640, 2 ** 32 + 7 * 256, 2 ** 52 - 4096);
const newBaseArb = fc.constantFrom(0, 2 ** 32 - 1500, 2 ** 40);

function runModelCheck(base: number, newBase: number, ops: Op[]): void {
  const t = new ExceptionTable({ cowChunks: 64 });
  const model = new Map<number, number>();
  const insert = (old: number, newChunk: number) => {
    const expected = model.has(old) ? `chunk ${old} already has an exception` : null;
    const got = errorOf(() => t.insert(old, newChunk));
    if (expected === null) expect(got).toBeNull();
    else expect(got).toContain(expected);
    if (expected === null) model.set(old, newChunk);
  };
  const remove = (old: number) => {
    expect(errorOf(() => t.remove(old))).toBe(modelRemoveError(model, old));
    if (modelRemoveError(model, old) === null) model.delete(old);
  };
  const mapped = () => [...model.keys()].sort((x, y) => x - y);
  for (const o of ops) {
    let touched = -1;
    switch (o.op) {
      case "insert": {
        const old = base + o.old;
        let newChunk = newBase + o.newChunk;
        const prev = model.get(old - 1);
        const next = model.get(old + 1);
        if (o.link === "next" && prev !== undefined) newChunk = prev + 1;
        if (o.link === "prev" && next !== undefined && next > 0) newChunk = next - 1;
        insert(old, newChunk);
        touched = old;
        break;
      }
      case "run": {
        for (let k = 0; k < o.len; k++) {
          const i = o.descending ? o.len - 1 - k : k;
          const old = base + o.start + i;
          if (!model.has(old)) insert(old, newBase + o.newChunk + i);
        }
        touched = base + o.start;
        break;
      }
      case "remove":
        touched = base + o.old;
        remove(touched);
        break;
      case "removeMapped": {
        const keys = mapped();
        if (keys.length > 0) remove((touched = keys[o.pick % keys.length]!));
        break;
      }
      case "removeRunEnd": {
        const runs = modelRuns(model);
        if (runs.length > 0) {
          const [a, , count] = runs[o.pick % runs.length]!;
          remove((touched = o.last ? a + count - 1 : a));
        }
        break;
      }
      case "lookup":
        touched = base + o.old;
        break;
    }
    if (touched >= 0) for (const c of [touched - 1, touched, touched + 1]) expect(t.lookup(c)).toBe(model.get(c) ?? -1);
    expect(t.size).toBe(model.size);
  }
  for (let c = base - 2; c < base + SPAN + 300; c++) expect(t.lookup(c)).toBe(model.get(c) ?? -1);
  expect(tableRuns(t)).toEqual(modelRuns(model));
  expect(t.entryCount).toBe(modelBlockCount(model));
}

describe("ExceptionTable against a Map model", () => {
  it("agrees on random insert / remove / lookup sequences with runs, boundaries and wide chunk numbers", () => {
    fc.assert(
      fc.property(baseArb, newBaseArb, fc.array(opArb, { maxLength: 60 }), (base, newBase, ops) =>
        runModelCheck(base, newBase, ops),
      ),
      { numRuns: 300 },
    );
  });

  it("agrees on a long dense sequence (many levels in use at once)", () => {
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 300, maxLength: 600 }), (ops) => runModelCheck(0, 0, ops)),
      { numRuns: 10 },
    );
  });
});

// ---- wide chunk numbers ------------------------------------------------------------------------

describe("ExceptionTable chunk numbers beyond 32 bits", () => {
  it("does not alias chunks 2^32 apart and keeps narrow entries when it widens", () => {
    const t = new ExceptionTable();
    for (let c = 0; c < 10000; c++) t.insert(scattered(c) % 2 ** 31, c);
    expect(t.memoryBytes).toBe(8 * t.capacity); // narrow slots so far
    t.insert(2 ** 32 + scattered(1), 7); // same low 32 bits as scattered(1), which is mapped
    expect(t.memoryBytes).toBe(16 * t.capacity);
    expect(t.lookup(2 ** 32 + scattered(1))).toBe(7);
    expect(t.lookup(scattered(1))).toBe(1);
    for (let c = 0; c < 10000; c++) expect(t.lookup(scattered(c))).toBe(c);
    expect(t.lookup(2 ** 32 + scattered(2))).toBe(-1);
  });

  it("maps new chunks >= 2^32, runs above 2^32 and the extreme values", () => {
    const t = new ExceptionTable();
    t.insert(3, 2 ** 40);
    expect(t.lookup(3)).toBe(2 ** 40);
    const base = 2 ** 33 + 256;
    for (let k = 0; k < 256; k++) t.insert(base + k, 2 ** 45 + k);
    expect(t.entryCount).toBe(2);
    expect(t.lookup(base + 200)).toBe(2 ** 45 + 200);
    expect(() => t.remove(base + 100)).toThrow(
      `Attempt to merge block ${base + 100} from the middle of a chunk range [${base} - ${base + 255}]`,
    );
    t.insert(2 ** 52 - 1, Number.MAX_SAFE_INTEGER);
    expect(t.lookup(2 ** 52 - 1)).toBe(Number.MAX_SAFE_INTEGER);
    expect(t.lookup(2 ** 52 - 2)).toBe(-1);
    expect(t.lookup(2 ** 53)).toBe(-1);
    expect(() => t.insert(2 ** 52, 0)).toThrow(RangeError);
    expect(() => t.insert(0, 2 ** 53)).toThrow(RangeError);
  });
});

// ---- size ----------------------------------------------------------------------------------------

describe("ExceptionTable at 10^6 exceptions", () => {
  const N = 1_000_000;

  it("holds 10^6 random exceptions in <= 16 bytes each and looks them all up", () => {
    const t = new ExceptionTable({ cowChunks: N + 1000 });
    for (let i = 0; i < N; i++) t.insert(scattered(i), i);
    expect(t.size).toBe(N);
    expect(t.entryCount).toBe(N);
    expect(t.memoryBytes / N).toBeLessThanOrEqual(16);
    expect(t.entryCount / t.capacity).toBeLessThanOrEqual(0.85);
    for (let i = 0; i < N; i++) if (t.lookup(scattered(i)) !== i) expect(t.lookup(scattered(i))).toBe(i);
    for (let i = N; i < N + 100_000; i++) if (t.lookup(scattered(i)) !== -1) expect(t.lookup(scattered(i))).toBe(-1);
  });

  it("holds 10^6 sequential exceptions in about one entry per 256 chunks", () => {
    const t = new ExceptionTable();
    for (let c = 0; c < N; c++) t.insert(c + 5000, c + 3);
    expect(t.entryCount).toBeLessThanOrEqual(Math.ceil(N / 256) + 16);
    for (let c = 0; c < N; c += 97) expect(t.lookup(c + 5000)).toBe(c + 3);
  });
});

describe("ExceptionTable sizing (B2)", () => {
  it("starts at a size set by the COW size alone, clamped like the kernel's bucket count", () => {
    expect(new ExceptionTable().capacity).toBe(64);
    expect(new ExceptionTable({ cowChunks: 10 }).capacity).toBe(64);
    expect(new ExceptionTable({ cowChunks: 5000 }).capacity).toBe(5000);
    expect(new ExceptionTable({ cowChunks: 2 ** 30 }).capacity).toBe(262144);
    expect(ExceptionTable.initialCapacity(5000)).toBe(5000);
  });

  it("grows past the hint and keeps the load bounded", () => {
    const t = new ExceptionTable({ cowChunks: 64 });
    for (let i = 0; i < 100_000; i++) t.insert(scattered(i), i);
    expect(t.capacity).toBeGreaterThan(100_000);
    expect(t.entryCount / t.capacity).toBeLessThanOrEqual(0.85);
    for (let i = 0; i < 100_000; i += 13) expect(t.lookup(scattered(i))).toBe(i);
  });
});

describe("ExceptionTable.clear (R22)", () => {
  it("empties at once and gives the event loop a turn when freeing 10^6 entries", async () => {
    const t = new ExceptionTable();
    for (let i = 0; i < 1_000_000; i++) t.insert(scattered(i), i);
    let ticks = 0;
    let running = true;
    const tick = () => {
      ticks++;
      if (running) setImmediate(tick);
    };
    setImmediate(tick);
    const done = t.clear();
    expect(t.size).toBe(0); // already empty before the promise settles
    expect(t.lookup(scattered(5))).toBe(-1);
    await done;
    running = false;
    expect(ticks).toBeGreaterThan(0);
    expect(t.entryCount).toBe(0);
    expect(t.capacity).toBe(64);
    t.insert(scattered(5), 9); // usable again
    expect(t.lookup(scattered(5))).toBe(9);
  });

  it("resets a widened table to narrow slots", async () => {
    const t = new ExceptionTable();
    t.insert(2 ** 40, 1);
    await t.clear();
    t.insert(1, 1);
    expect(t.memoryBytes).toBe(8 * t.capacity);
    expect(t.lookup(2 ** 40)).toBe(-1);
  });
});

describe("exception-table benchmark smoke", () => {
  it("reports positive figures on a small table; says nothing about speed", async () => {
    const r = await benchExceptionTable(20_000);
    // Without --expose-gc (as under vitest) resident deltas are noise at this size: only finite.
    expect(Number.isFinite(r.bytesPerException)).toBe(true);
    expect(Number.isFinite(r.mapBytesPerException)).toBe(true);
    expect(r.lookupsPerSecond).toBeGreaterThan(0);
    expect(r.tableBytesPerException).toBeLessThanOrEqual(16);
  });
});
