/**
 * Memory and lookup speed of the snapshot's complete-exception table (targets/snapshot/exception-table.ts)
 * against a plain `Map<number, number>` holding the same exceptions, in the same process.
 *
 *   node --expose-gc --import tsx bench/exception-table.ts [n]
 *
 * Memory is the growth of `arrayBuffers + heapUsed` (process.memoryUsage) while the structure is
 * built and still referenced. With --expose-gc each reading is taken after a full GC, so garbage
 * (e.g. the arrays left behind by the table's growth) is not counted; without it the figures can
 * be off by whatever the GC has not collected yet (`gcExposed` says which). The table also
 * reports its own storage size exactly (`tableBytesPerException`), which needs no GC.
 *
 * The exceptions are "random": old chunks i·φ mod 2^31 (distinct, scattered, never consecutive),
 * new chunks 0, 1, 2, ... in insertion order, as a COW device allocates them. This is the table's
 * worst case; sequential COW compresses 256 chunks into one entry (`sequentialEntriesPerChunk`).
 */
import path from "node:path";
import { pathToFileURL } from "node:url";
import { ExceptionTable } from "../targets/snapshot/exception-table.js";

export interface ExceptionTableBenchResult {
  n: number;
  /** Resident growth per exception for n random exceptions (table). */
  bytesPerException: number;
  /** The table's typed-array bytes per exception (exact, independent of the GC). */
  tableBytesPerException: number;
  /** Lookups of mapped chunks per second, in an order unrelated to the slots (random access). */
  lookupsPerSecond: number;
  /** Lookups of unmapped chunks per second (what origin writes mostly do). */
  missLookupsPerSecond: number;
  /** Resident growth per exception for the same exceptions in a Map<number, number>. */
  mapBytesPerException: number;
  mapLookupsPerSecond: number;
  /** Table bytes per chunk for n sequentially copied chunks (mostly the hint-sized initial slots). */
  sequentialBytesPerChunk: number;
  /** Stored entries per chunk for n sequentially copied chunks (≈ 1/256). */
  sequentialEntriesPerChunk: number;
  /** Whether global.gc() was available (node --expose-gc): the memory figures are precise then. */
  gcExposed: boolean;
}

const gc = (globalThis as { gc?: () => void }).gc;

function reading(): number {
  const m = process.memoryUsage();
  return m.arrayBuffers + m.heapUsed;
}

/**
 * arrayBuffers + heapUsed once memory has settled. V8 frees large objects and ArrayBuffer backing
 * stores from sweeper threads, so right after gc() the previous structure may still be counted:
 * collect and wait until two readings agree (within 64 KiB), at most 20 rounds.
 */
async function resident(): Promise<number> {
  if (!gc) return reading();
  let last = Infinity;
  for (let round = 0; round < 20; round++) {
    gc();
    await new Promise<void>((resolve) => setTimeout(resolve, 10));
    const now = reading();
    if (Math.abs(now - last) < 65536) return now;
    last = now;
  }
  return last;
}

/** Old chunk of the i-th random exception: i ↦ i·φ mod 2^31 is a bijection, so no repeats. */
const scattered = (i: number) => Math.imul(i, 0x9e3779b1) & 0x7fffffff;

const REPS = 3;

/** Best of REPS passes over `keys`, in lookups per second. */
function bestRate(keys: Float64Array, pass: (keys: Float64Array) => number): number {
  let best = Infinity;
  let sink = 0;
  for (let r = 0; r < REPS; r++) {
    const t0 = performance.now();
    sink += pass(keys);
    best = Math.min(best, performance.now() - t0);
  }
  if (sink === 0.5) console.log(sink); // keeps the passes observable; never true
  return keys.length / (Math.max(best, 1e-3) / 1000);
}

function tablePass(table: ExceptionTable) {
  return (keys: Float64Array) => {
    let sum = 0;
    for (let i = 0; i < keys.length; i++) sum += table.lookup(keys[i]!);
    return sum;
  };
}

function mapPass(map: Map<number, number>) {
  return (keys: Float64Array) => {
    let sum = 0;
    for (let i = 0; i < keys.length; i++) sum += map.get(keys[i]!) ?? -1;
    return sum;
  };
}

export async function benchExceptionTable(n = 1_000_000): Promise<ExceptionTableBenchResult> {
  // Inputs first, so that they are part of every baseline.
  const hits = new Float64Array(n);
  const misses = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    hits[i] = scattered(i);
    misses[i] = scattered(n + i);
  }
  // Look up in a different order than inserted (a fixed shuffle).
  const shuffled = hits.slice();
  let seed = 12345;
  for (let i = n - 1; i > 0; i--) {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    const j = seed % (i + 1);
    const x = shuffled[i]!;
    shuffled[i] = shuffled[j]!;
    shuffled[j] = x;
  }

  // The Map first: freeing it is plain heap, which a full GC releases at once, whereas the
  // backing stores of freed typed arrays may still be counted in arrayBuffers right after a GC.
  let before = await resident();
  let map: Map<number, number> | null = new Map();
  for (let i = 0; i < n; i++) map.set(hits[i]!, i);
  const mapBytesPerException = ((await resident()) - before) / n;
  const mapLookupsPerSecond = bestRate(shuffled, mapPass(map));
  map = null;

  before = await resident();
  let table: ExceptionTable | null = new ExceptionTable({ cowChunks: n });
  for (let i = 0; i < n; i++) table.insert(hits[i]!, i);
  const bytesPerException = ((await resident()) - before) / n;
  const tableBytesPerException = table.memoryBytes / n;
  const lookupsPerSecond = bestRate(shuffled, tablePass(table));
  const missLookupsPerSecond = bestRate(misses, tablePass(table));
  await table.clear();
  table = null;

  const sequential = new ExceptionTable({ cowChunks: n });
  for (let c = 0; c < n; c++) sequential.insert(c, c + 2);
  const sequentialBytesPerChunk = sequential.memoryBytes / n;
  const sequentialEntriesPerChunk = sequential.entryCount / n;
  // A use of the inputs after every measurement: V8 keeps only live locals across an await, so an
  // input dropped early would be freed mid-measurement and offset one of the figures.
  if (hits.length + misses.length + shuffled.length !== 3 * n) throw new Error("unreachable");

  return {
    n,
    bytesPerException,
    tableBytesPerException,
    lookupsPerSecond,
    missLookupsPerSecond,
    mapBytesPerException,
    mapLookupsPerSecond,
    sequentialBytesPerChunk,
    sequentialEntriesPerChunk,
    gcExposed: gc !== undefined,
  };
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  const n = process.argv[2] ? Number(process.argv[2]) : undefined;
  benchExceptionTable(n).then(
    (r) => {
      const f = (x: number, d = 1) => x.toLocaleString("en-US", { maximumFractionDigits: d });
      console.log(
        `exception table, ${f(r.n, 0)} random exceptions${r.gcExposed ? "" : " (no --expose-gc: memory figures approximate)"}`,
      );
      console.log(
        `  table: ${f(r.bytesPerException)} B/exception resident (${f(r.tableBytesPerException)} B storage), ${f(r.lookupsPerSecond / 1e6)} M hit lookups/s, ${f(r.missLookupsPerSecond / 1e6)} M miss lookups/s`,
      );
      console.log(
        `  Map:   ${f(r.mapBytesPerException)} B/exception resident, ${f(r.mapLookupsPerSecond / 1e6)} M hit lookups/s`,
      );
      console.log(
        `  sequential COW: ${f(r.sequentialBytesPerChunk, 3)} B/chunk, 1 entry per ${f(1 / r.sequentialEntriesPerChunk)} chunks`,
      );
    },
    (err: unknown) => {
      console.error(err instanceof Error ? (err.stack ?? err.message) : err);
      process.exitCode = 1;
    },
  );
}
