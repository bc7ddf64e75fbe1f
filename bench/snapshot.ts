/**
 * Snapshot benchmarks, in process through the library API, on files in a directory on a real disk
 * (not tmpfs). `bench/run.ts` runs them after the micro-benchmark and prints their table; on their
 * own: `node --import tsx bench/snapshot.ts [--quick]`.
 *
 * 1. Write throughput through `snapshot-origin` with 1 and with 3 persistent snapshots (chunk 8
 *    sectors = 4 KiB) against `linear` over the same origin file, in the same run: 4 KiB writes at
 *    queue depth 16, every chunk of the origin once per pass in a random order. "First write" is
 *    the pass right after the snapshots were taken (every write needs a copy-on-write), "rewrite"
 *    the pass after it (nothing left to copy). Targets: rewrite ≥ 0.9 × linear; first write with 3
 *    snapshots ≤ 1.7 × the time of first write with 1.
 * 2. Metadata flushes (PREFLUSH|FUA writes, counted by a wrapper around the COW device) per 1000
 *    exceptions with 16 parallel writers. Target ≤ 1000/32. With 4 KiB writes each writer has one
 *    exception in flight, so a batch holds at most 16 and 1000/16 is the floor; the target is
 *    checked with 64 KiB writes (16 chunks each), as a page-cache writeback or `dd bs=64k` makes.
 * 3. Resident bytes per exception at 10^6 exceptions: the exception table alone
 *    (bench/exception-table.ts) and a whole snapshot loaded from a COW file holding 10^6.
 * 4. Time to reactivate (construct) a persistent snapshot whose COW file holds 10^6 exceptions
 *    (made directly in the kernel format with cowImageChunks). Target ≤ 1 s.
 * 5. Merge throughput (`snapshot-merge`, MiB/s of merged data, from the resume that starts it to
 *    the event that ends it) next to a plain copy of the same size in the same run: the same
 *    copier copying the same bytes from the COW file onto the origin file in one job, then one
 *    fdatasync. Two layouts: every chunk of the origin written through the snapshot with 64 KiB
 *    writes (consecutive records: batches of up to 256 chunks = 1 MiB, one origin flush and one
 *    metadata write each), and a smaller origin written with 4 KiB writes in a random order (one
 *    chunk per batch: the worst case, two flushes per 4 KiB). No goal: a report.
 *
 * Memory figures are taken after full GCs (gc is exposed at run time if node was started without
 * --expose-gc).
 */
import { randomFillSync } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import v8 from "node:v8";
import vm from "node:vm";
import { flushBio, submitAndWait } from "../core/bio.js";
import { systemBackingDevices } from "../core/devices/shared-devices.js";
import type { DeviceHandle, DeviceMapper } from "../core/device-mapper.js";
import type { IoOptions } from "../core/devices/block-device.js";
import { Copier } from "../core/copier.js";
import { createDeviceMapper } from "../index.js";
import { cowImageChunks } from "../targets/snapshot/cow-image.js";
import { type Filesystem, filesystemOf, median, MiB, pickDataDir } from "./micro.js";
import { CountingBacking, sparseFile } from "./counting-backing.js";
import { recordResultsSection, runAsScript } from "./format.js";
import { permutation, writePass } from "./passes.js";

const CS = 8; // sectors per chunk (4 KiB)
const CHUNK_BYTES = CS * 512;

export const SNAPSHOT_GOALS = {
  /** Rewrite throughput through snapshot-origin / linear. */
  rewriteVsLinear: 0.9,
  /** First-write time with 3 snapshots / with 1. */
  threeVsOneFirstWrite: 1.7,
  /** Metadata flushes per 1000 exceptions (1 per 32). */
  flushesPer1000: 1000 / 32,
  /** Seconds to construct a snapshot holding 10^6 exceptions. */
  reactivateSeconds: 1,
};

export interface SnapshotBenchOptions {
  /** Origin size for the throughput passes (bytes, a multiple of 1 MiB). */
  originBytes: number;
  /** Repetitions of each throughput configuration (median reported). */
  repetitions: number;
  /** The rewrite pass writes every chunk this many times (rewrites are fast: a longer pass is steadier). */
  rewriteRounds: number;
  /** Origin size for the 64 KiB metadata-flush run. */
  flushOriginBytes: number;
  /** Exceptions in the reactivation / memory measurements. */
  exceptions: number;
  /** Repetitions of the reactivation (median reported). */
  reactivations: number;
  /** Origin size merged with consecutive records (default: originBytes). */
  mergeBytes?: number;
  /** Origin size merged with scattered records, one chunk per batch (default: originBytes / 16, at least 1 MiB). */
  mergeScatteredBytes?: number;
  /** Repetitions of each merge layout (default 1; median reported). */
  mergeRepetitions?: number;
  /** Directory for the files (default: pickDataDir). */
  dir?: string;
  /** udm's I/O options (A/B measurements: write plug off). */
  io?: IoOptions;
  log?: (message: string) => void;
}

export const FULL_OPTIONS: SnapshotBenchOptions = {
  originBytes: 64 * MiB,
  repetitions: 5,
  rewriteRounds: 8,
  flushOriginBytes: 16 * MiB,
  exceptions: 1_000_000,
  reactivations: 3,
  mergeBytes: 64 * MiB,
  mergeScatteredBytes: 4 * MiB,
  mergeRepetitions: 3,
};

export const QUICK_OPTIONS: SnapshotBenchOptions = {
  originBytes: 16 * MiB,
  repetitions: 3,
  rewriteRounds: 8,
  flushOriginBytes: 4 * MiB,
  exceptions: 1_000_000,
  reactivations: 1,
  mergeBytes: 16 * MiB,
  mergeScatteredBytes: 1 * MiB,
  mergeRepetitions: 1,
};

export interface PassResult {
  /** Medians over the repetitions. */
  mibps: number;
  seconds: number;
  /** Seconds of each repetition, in repetition order. */
  reps: number[];
}

export interface ThroughputResult {
  config: "linear" | "1 snapshot" | "3 snapshots";
  first: PassResult;
  rewrite: PassResult;
  /** PREFLUSH|FUA writes per COW device during the first pass (snapshot configs). */
  metaWrites: number;
  exceptions: number;
}

export interface SnapshotBenchResult {
  dataDir: string;
  filesystem: Filesystem;
  options: SnapshotBenchOptions;
  throughput: ThroughputResult[];
  flushes: { writeKiB: number; writers: number; exceptions: number; metaWrites: number; per1000: number }[];
  tableBytesPerException: number;
  tableStorageBytesPerException: number;
  snapshotBytesPerException: number;
  reactivateSeconds: number;
  removeSeconds: number;
  cowBytes: number;
  merge: MergeResult[];
}

export interface MergeResult {
  layout: "runs" | "scattered";
  /** Bytes of merged data (= exceptions × chunk size). */
  bytes: number;
  exceptions: number;
  /** Merge batches (copies, each with an origin flush and a metadata write). */
  batches: number;
  /** Medians over the repetitions. */
  mergeSeconds: number;
  mergeMibps: number;
  copySeconds: number;
  copyMibps: number;
  /** Per repetition: plain copy time / merge time. */
  ratios: number[];
}

// ---- GC and memory ----

type Gc = () => void;

/** global.gc, exposing it at run time when node was started without --expose-gc. */
export function ensureGc(): Gc {
  const g = globalThis as { gc?: Gc };
  if (!g.gc) {
    v8.setFlagsFromString("--expose-gc");
    g.gc = vm.runInNewContext("gc") as Gc;
  }
  return g.gc;
}

/** heapUsed + arrayBuffers once memory has settled after full GCs (see bench/exception-table.ts). */
async function resident(gc: Gc): Promise<number> {
  let last = Infinity;
  for (let round = 0; round < 20; round++) {
    gc();
    await new Promise<void>((resolve) => setTimeout(resolve, 10));
    const m = process.memoryUsage();
    const now = m.heapUsed + m.arrayBuffers;
    if (Math.abs(now - last) < 65536) return now;
    last = now;
  }
  return last;
}

// ---- helpers ----

function syncFiles(files: string[]): void {
  for (const f of files) {
    const fd = fs.openSync(f, "r+");
    try {
      fs.fdatasyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }
}

function fillRandom(file: string, bytes: number): void {
  const buf = Buffer.allocUnsafe(MiB);
  const fd = fs.openSync(file, "w");
  try {
    for (let done = 0; done < bytes; done += MiB) fs.writeSync(fd, randomFillSync(buf), 0, MiB, done);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** COW bytes that can never overflow for an origin of `chunks` chunks (docs/snapshot.md, Sizing). */
function cowBytesFor(chunks: number): number {
  const epa = CHUNK_BYTES / 16;
  return (1 + Math.ceil((chunks + 1) / epa) + chunks) * CHUNK_BYTES;
}

interface Stack {
  dm: DeviceMapper;
  backing: CountingBacking;
  handle: DeviceHandle;
  files: string[];
}

/** linear, or snapshot-origin with `snapshots` fresh persistent snapshots taken the documented way. */
async function buildStack(
  dir: string,
  origin: string,
  originBytes: number,
  snapshots: number,
  io?: IoOptions,
): Promise<Stack> {
  const backing = new CountingBacking("cow");
  const dm = createDeviceMapper({ backing, io });
  const sectors = originBytes / 512;
  const files = [origin];
  if (snapshots === 0) {
    await dm.create("vol", { table: `0 ${sectors} linear ${origin} 0` });
  } else {
    await dm.create("vol", { table: `0 ${sectors} snapshot-origin ${origin}` });
    await dm.suspend("vol");
    for (let i = 0; i < snapshots; i++) {
      const cow = path.join(dir, `cow${i}.img`);
      sparseFile(cow, cowBytesFor(originBytes / CHUNK_BYTES)); // a fresh, zeroed COW device
      files.push(cow);
      await dm.create(`snap${i}`, { table: `0 ${sectors} snapshot ${origin} ${cow} P ${CS}` });
    }
    await dm.resume("vol");
  }
  return { dm, backing, handle: dm.open("vol"), files };
}

async function teardown(s: Stack): Promise<void> {
  await s.handle.close();
  await s.dm.close();
  for (const f of s.files.slice(1)) fs.rmSync(f, { force: true });
}

const CONFIGS = [
  { config: "linear", snapshots: 0 },
  { config: "1 snapshot", snapshots: 1 },
  { config: "3 snapshots", snapshots: 3 },
] as const;

async function throughput(
  dir: string,
  opts: SnapshotBenchOptions,
  log: (m: string) => void,
): Promise<ThroughputResult[]> {
  const origin = path.join(dir, "origin.img");
  fillRandom(origin, opts.originBytes);
  const chunks = opts.originBytes / CHUNK_BYTES;
  const runs = CONFIGS.map(() => ({
    first: [] as number[],
    rewrite: [] as number[],
    metaWrites: [] as number[],
    exceptions: 0,
  }));
  // Warm-up (JIT, page cache): one small untimed round of each configuration.
  for (const c of CONFIGS) {
    const s = await buildStack(dir, origin, opts.originBytes, c.snapshots, opts.io);
    await writePass(s.handle, permutation(Math.min(chunks, 512), 99), CHUNK_BYTES, 16);
    await teardown(s);
  }
  for (let rep = 0; rep < opts.repetitions; rep++) {
    // Rotate the order of the configurations between repetitions.
    for (let k = 0; k < CONFIGS.length; k++) {
      const i = (k + rep) % CONFIGS.length;
      const c = CONFIGS[i]!;
      syncFiles([origin]);
      const s = await buildStack(dir, origin, opts.originBytes, c.snapshots, opts.io);
      const first = await writePass(s.handle, permutation(chunks, 1 + rep), CHUNK_BYTES, 16);
      const metaWrites = s.backing.counted.reduce((n, d) => n + d.metaWrites, 0) / Math.max(1, c.snapshots);
      syncFiles(s.files);
      const again = permutation(chunks, 101 + rep);
      const rounds = new Uint32Array(chunks * opts.rewriteRounds);
      for (let r = 0; r < opts.rewriteRounds; r++) rounds.set(again, r * chunks);
      const rewrite = (await writePass(s.handle, rounds, CHUNK_BYTES, 16)) / opts.rewriteRounds;
      syncFiles(s.files);
      if (c.snapshots > 0) {
        const status = s.dm.status("snap0")[0]!.params;
        const allocated = Number(status.split("/")[0]) / CS;
        const epa = CHUNK_BYTES / 16;
        // allocated chunks = header + data + metadata areas in between
        runs[i]!.exceptions = allocated - 1 - Math.ceil((allocated - 1) / (epa + 1));
      }
      await teardown(s);
      runs[i]!.first.push(first);
      runs[i]!.rewrite.push(rewrite);
      runs[i]!.metaWrites.push(metaWrites);
      log(
        `snapshot bench: ${c.config}, repetition ${rep + 1}/${opts.repetitions}: first write ${(opts.originBytes / MiB / first).toFixed(1)} MiB/s, rewrite ${(opts.originBytes / MiB / rewrite).toFixed(1)} MiB/s`,
      );
    }
  }
  fs.rmSync(origin, { force: true });
  const pass = (secs: number[]): PassResult => {
    const seconds = median(secs);
    return { seconds, mibps: opts.originBytes / MiB / seconds, reps: secs };
  };
  return CONFIGS.map((c, i) => ({
    config: c.config,
    first: pass(runs[i]!.first),
    rewrite: pass(runs[i]!.rewrite),
    metaWrites: median(runs[i]!.metaWrites),
    exceptions: c.snapshots > 0 ? runs[i]!.exceptions : 0,
  }));
}

/** Metadata writes for one first-write pass of `blockKiB` writes by 16 writers over a fresh snapshot. */
async function flushCount(dir: string, originBytes: number, blockKiB: number, io?: IoOptions) {
  const origin = path.join(dir, "origin-flush.img");
  fillRandom(origin, originBytes);
  const s = await buildStack(dir, origin, originBytes, 1, io);
  const blockBytes = blockKiB * 1024;
  await writePass(s.handle, permutation(originBytes / blockBytes, 7), blockBytes, 16);
  const exceptions = originBytes / CHUNK_BYTES;
  const metaWrites = s.backing.counted[0]!.metaWrites;
  await teardown(s);
  fs.rmSync(origin, { force: true });
  return { writeKiB: blockKiB, writers: 16, exceptions, metaWrites, per1000: (metaWrites / exceptions) * 1000 };
}

/**
 * A COW file holding `n` exceptions with scattered origin chunks (no runs: the table's worst
 * case), plus a sparse origin big enough for them. Returns the table line.
 */
function buildImage(dir: string, n: number): { table: string; originTable: string; files: string[]; cowBytes: number } {
  const originChunks = 2 ** Math.ceil(Math.log2(Math.max(n, 2)));
  const mask = originChunks - 1;
  const image = cowImageChunks({ chunkSize: CS, exceptions: n, oldChunk: (i) => Math.imul(i, 0x9e3779b1) & mask });
  const cow = path.join(dir, "cow-big.img");
  const origin = path.join(dir, "origin-big.img");
  fs.rmSync(cow, { force: true });
  const fd = fs.openSync(cow, "w");
  let next = image.next();
  try {
    for (; !next.done; next = image.next())
      fs.writeSync(fd, next.value.data, 0, next.value.data.length, next.value.chunk * CHUNK_BYTES);
  } finally {
    fs.closeSync(fd);
  }
  const cowBytes = next.value.minSectors * 512;
  fs.truncateSync(cow, cowBytes);
  sparseFile(origin, originChunks * CHUNK_BYTES);
  const sectors = originChunks * CS;
  return {
    originTable: `0 ${sectors} snapshot-origin ${origin}`,
    table: `0 ${sectors} snapshot ${origin} ${cow} P ${CS}`,
    files: [cow, origin],
    cowBytes,
  };
}

async function reactivation(dir: string, opts: SnapshotBenchOptions, gc: Gc, log: (m: string) => void) {
  const img = buildImage(dir, opts.exceptions);
  const dm = createDeviceMapper({ io: opts.io });
  const times: number[] = [];
  const removes: number[] = [];
  const perException: number[] = [];
  try {
    await dm.create("base", { table: img.originTable });
    for (let rep = 0; rep < Math.max(1, opts.reactivations); rep++) {
      await dm.suspend("base");
      const before = await resident(gc);
      const t0 = performance.now();
      await dm.create("snap", { table: img.table });
      times.push((performance.now() - t0) / 1000);
      await dm.resume("base");
      perException.push(((await resident(gc)) - before) / opts.exceptions);
      const status = dm.status("snap")[0]!.params;
      if (status === "Invalid") throw new Error("reactivated snapshot is invalid");
      const t1 = performance.now();
      await dm.remove("snap");
      removes.push((performance.now() - t1) / 1000);
      log(
        `snapshot bench: reactivation ${rep + 1}: ${times.at(-1)!.toFixed(3)} s, ${perException.at(-1)!.toFixed(1)} B/exception, remove ${removes.at(-1)!.toFixed(3)} s`,
      );
    }
  } finally {
    await dm.close();
    for (const f of img.files) fs.rmSync(f, { force: true });
  }
  return {
    reactivateSeconds: median(times),
    removeSeconds: median(removes),
    snapshotBytesPerException: median(perException),
    cowBytes: img.cowBytes,
  };
}

// ---- merge ----

/** A plain copy: `bytes` from `srcFile` at `srcSector` onto `destFile` at sector 0 with the copier, then one flush. */
async function plainCopy(srcFile: string, srcSector: number, destFile: string, bytes: number): Promise<number> {
  const src = await systemBackingDevices.open(srcFile, { mode: "r" });
  const dest = await systemBackingDevices.open(destFile, { mode: "rw" });
  const client = new Copier().client("bench plain copy");
  try {
    const t0 = performance.now();
    await new Promise<void>((resolve, reject) => {
      client.copy(
        { device: src, sector: srcSector, sectors: bytes / 512 },
        [{ device: dest, sector: 0 }],
        (readErr, writeErr) => (readErr || writeErr ? reject(new Error("plain copy failed")) : resolve()),
      );
    });
    await submitAndWait(dest, flushBio());
    return (performance.now() - t0) / 1000;
  } finally {
    await client.destroy();
    await src.close();
    await dest.close();
  }
}

/**
 * One merge of `layout`: a fresh snapshot of a random origin of `bytes`, every chunk written
 * through the snapshot (64 KiB writes in order for "runs", 4 KiB in a random order for
 * "scattered"), files synced; then the plain copy of the same bytes, then the merge (load the
 * snapshot-merge table on the origin's device, suspend the snapshot, resume; until the event).
 */
async function mergeOnce(dir: string, bytes: number, layout: MergeResult["layout"], seed: number, io?: IoOptions) {
  const origin = path.join(dir, "origin-merge.img");
  const cow = path.join(dir, "cow-merge.img");
  fillRandom(origin, bytes);
  const chunks = bytes / CHUNK_BYTES;
  sparseFile(cow, cowBytesFor(chunks));
  const sectors = bytes / 512;
  const dm = createDeviceMapper({ io });
  try {
    await dm.create("base", { table: `0 ${sectors} snapshot-origin ${origin}` });
    await dm.suspend("base");
    await dm.create("snap", { table: `0 ${sectors} snapshot ${origin} ${cow} P ${CS}` });
    await dm.resume("base");
    const snap = dm.open("snap");
    if (layout === "runs") await writePass(snap, permutation(bytes / (64 * 1024), 1).sort(), 64 * 1024, 16);
    else await writePass(snap, permutation(chunks, seed), CHUNK_BYTES, 16);
    await snap.close();
    syncFiles([origin, cow]);
    const copySeconds = await plainCopy(cow, 2 * CS, origin, bytes);
    const md = dm.device("base");
    await dm.load("base", `0 ${sectors} snapshot-merge ${origin} ${cow} P ${CS}`);
    await dm.suspend("snap");
    const from = md.eventNr;
    const t0 = performance.now();
    await dm.resume("base");
    await md.waitEvent(from);
    const mergeSeconds = (performance.now() - t0) / 1000;
    const status = dm.status("base")[0]!.params;
    const m = /^(\d+)\/\d+ (\d+)$/.exec(status);
    if (!m || m[1] !== m[2]) throw new Error(`merge did not finish: status '${status}'`);
    const batches = (md.live!.targets[0] as unknown as { mergedBatches: number }).mergedBatches;
    return { copySeconds, mergeSeconds, batches, exceptions: chunks };
  } finally {
    await dm.close();
    fs.rmSync(origin, { force: true });
    fs.rmSync(cow, { force: true });
  }
}

export async function mergeThroughput(
  dir: string,
  opts: SnapshotBenchOptions,
  log: (m: string) => void,
): Promise<MergeResult[]> {
  const layouts: [MergeResult["layout"], number][] = [
    ["runs", opts.mergeBytes ?? opts.originBytes],
    ["scattered", opts.mergeScatteredBytes ?? Math.max(MiB, opts.originBytes / 16)],
  ];
  const results: MergeResult[] = [];
  for (const [layout, bytes] of layouts) {
    const reps: Awaited<ReturnType<typeof mergeOnce>>[] = [];
    for (let rep = 0; rep < Math.max(1, opts.mergeRepetitions ?? 1); rep++) {
      const r = await mergeOnce(dir, bytes, layout, 11 + rep, opts.io);
      reps.push(r);
      log(
        `snapshot bench: merge (${layout}), repetition ${rep + 1}: ${(bytes / MiB / r.mergeSeconds).toFixed(1)} MiB/s in ${r.batches} batches; plain copy ${(bytes / MiB / r.copySeconds).toFixed(1)} MiB/s`,
      );
    }
    const mergeSeconds = median(reps.map((r) => r.mergeSeconds));
    const copySeconds = median(reps.map((r) => r.copySeconds));
    results.push({
      layout,
      bytes,
      exceptions: reps[0]!.exceptions,
      batches: reps[0]!.batches,
      mergeSeconds,
      mergeMibps: bytes / MiB / mergeSeconds,
      copySeconds,
      copyMibps: bytes / MiB / copySeconds,
      ratios: reps.map((r) => r.copySeconds / r.mergeSeconds),
    });
  }
  return results;
}

export async function runSnapshotBenchmark(opts: SnapshotBenchOptions): Promise<SnapshotBenchResult> {
  const log = opts.log ?? (() => undefined);
  const gc = ensureGc();
  const dataDir = opts.dir ?? pickDataDir(4 * opts.originBytes + 64 * MiB);
  const dir = fs.mkdtempSync(path.join(dataDir, "udm-snapbench-"));
  try {
    const tp = await throughput(dir, opts, log);
    const flushes = [
      await flushCount(dir, opts.flushOriginBytes, 4, opts.io),
      await flushCount(dir, opts.flushOriginBytes, 64, opts.io),
    ];
    for (const f of flushes)
      log(`snapshot bench: ${f.writeKiB} KiB writes: ${f.metaWrites} metadata writes for ${f.exceptions} exceptions`);
    // The table alone: bench/exception-table.ts reads global.gc when it loads, so load it now.
    const { benchExceptionTable } = await import("./exception-table.js");
    const table = await benchExceptionTable(opts.exceptions);
    const react = await reactivation(dir, opts, gc, log);
    const merge = await mergeThroughput(dir, opts, log);
    return {
      merge,
      dataDir,
      filesystem: filesystemOf(dataDir),
      options: opts,
      throughput: tp,
      flushes,
      tableBytesPerException: table.bytesPerException,
      tableStorageBytesPerException: table.tableBytesPerException,
      ...react,
    };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ---- reporting ----

const fmt = (x: number, digits = 1) =>
  x.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });

export interface SnapshotRow {
  measure: string;
  value: string;
  goal: string;
  result: "PASS" | "MISS" | "";
}

export function snapshotRows(r: SnapshotBenchResult): SnapshotRow[] {
  const g = SNAPSHOT_GOALS;
  const by = (c: ThroughputResult["config"]) => r.throughput.find((t) => t.config === c)!;
  const lin = by("linear");
  const one = by("1 snapshot");
  const three = by("3 snapshots");
  const rows: SnapshotRow[] = [];
  const verdict = (ok: boolean): "PASS" | "MISS" => (ok ? "PASS" : "MISS");
  // Ratios are medians of per-repetition ratios: each repetition measures every configuration
  // back to back, so a pair shares the machine's state of the moment.
  const paired = (a: PassResult, b: PassResult) => median(a.reps.map((x, i) => x / b.reps[i]!));
  const perRep = (a: PassResult, b: PassResult) => a.reps.map((x, i) => fmt(x / b.reps[i]!, 2)).join(" ");
  rows.push({
    measure: "linear: 4 KiB random writes, QD16, first pass / second pass",
    value: `${fmt(lin.first.mibps)} / ${fmt(lin.rewrite.mibps)} MiB/s`,
    goal: "(reference)",
    result: "",
  });
  for (const t of [one, three]) {
    rows.push({
      measure: `${t.config}: first write (every write copies), vs linear first pass`,
      value: `${fmt(t.first.mibps)} MiB/s (${fmt(paired(lin.first, t.first), 3)}×)`,
      goal: "",
      result: "",
    });
    const ratio = paired(lin.rewrite, t.rewrite); // throughput ratio = inverse time ratio
    rows.push({
      measure: `${t.config}: rewrite, vs linear second pass`,
      value: `${fmt(t.rewrite.mibps)} MiB/s (${fmt(ratio, 3)}×; per rep ${perRep(lin.rewrite, t.rewrite)})`,
      goal: `>= ${g.rewriteVsLinear}×`,
      result: verdict(ratio >= g.rewriteVsLinear),
    });
  }
  const cost = paired(three.first, one.first);
  rows.push({
    measure: "first-write time, 3 snapshots / 1 snapshot",
    value: `${fmt(cost, 2)}× (per rep ${perRep(three.first, one.first)})`,
    goal: `<= ${g.threeVsOneFirstWrite}×`,
    result: verdict(cost <= g.threeVsOneFirstWrite),
  });
  for (const f of r.flushes) {
    const target = f.writeKiB > 4;
    rows.push({
      measure: `metadata flushes per 1000 exceptions, ${f.writers} writers × ${f.writeKiB} KiB${target ? "" : " (floor 1000/16: one exception per writer in flight)"}`,
      value: `${fmt(f.per1000)} (${f.metaWrites} for ${f.exceptions})`,
      goal: target ? `<= ${fmt(g.flushesPer1000, 2)}` : "",
      result: target ? verdict(f.per1000 <= g.flushesPer1000) : "",
    });
  }
  const n = r.options.exceptions.toLocaleString("en-US");
  rows.push({
    measure: `resident bytes per exception, exception table, ${n} random`,
    value: `${fmt(r.tableBytesPerException)} B (storage ${fmt(r.tableStorageBytesPerException)} B)`,
    goal: "",
    result: "",
  });
  rows.push({
    measure: `resident bytes per exception, whole snapshot loaded with ${n}`,
    value: `${fmt(r.snapshotBytesPerException)} B`,
    goal: "",
    result: "",
  });
  rows.push({
    measure: `reactivate (ctr + resume) a snapshot holding ${n} exceptions (${fmt(r.cowBytes / MiB, 0)} MiB COW file)`,
    value: `${fmt(r.reactivateSeconds, 3)} s (remove: ${fmt(r.removeSeconds, 3)} s)`,
    goal: `<= ${g.reactivateSeconds} s`,
    result: verdict(r.reactivateSeconds <= g.reactivateSeconds),
  });
  for (const m of r.merge) {
    const what = m.layout === "runs" ? "64 KiB snapshot writes in order" : "4 KiB snapshot writes in a random order";
    rows.push({
      measure: `merge ${fmt(m.bytes / MiB, 0)} MiB (${m.exceptions.toLocaleString("en-US")} exceptions from ${what}; ${m.batches.toLocaleString("en-US")} batches) vs a plain copy of the same size`,
      value: `${fmt(m.mergeMibps)} MiB/s vs ${fmt(m.copyMibps)} MiB/s (${fmt(median(m.ratios), median(m.ratios) < 0.1 ? 4 : 2)}×; ${fmt((1000 * m.mergeSeconds) / m.batches, 2)} ms per batch)`,
      goal: "",
      result: "",
    });
  }
  return rows;
}

export function snapshotTable(r: SnapshotBenchResult): string {
  const rows = snapshotRows(r).map((x) => [x.measure, x.value, x.goal, x.result]);
  const header = ["Snapshot measure", "value", "goal", "result"];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const line = (cells: string[]) => "| " + cells.map((c, i) => c.padEnd(widths[i]!)).join(" | ") + " |";
  const rule = "|" + widths.map((w) => "-".repeat(w + 2)).join("|") + "|";
  return [line(header), rule, ...rows.map(line)].join("\n");
}

export function describeSnapshotRun(r: SnapshotBenchResult, quick: boolean): string[] {
  const o = r.options;
  const fsys = r.filesystem;
  return [
    `udm snapshot benchmark (${quick ? "quick" : "full"} run), in process through the library API, buffered file I/O${o.io?.writePlug === false ? ", write plug off" : ""}${o.io?.inlineReads === false ? ", inline reads off" : ""}`,
    `files in ${r.dataDir}, on ${fsys.type} (${fsys.source}, mounted at ${fsys.mountPoint}); chunk size ${CS} sectors; persistent (P) stores`,
    `throughput: ${o.originBytes / MiB} MiB origin of random bytes; the first pass writes every chunk once in a random order, the second (rewrite) every chunk ${o.rewriteRounds} times; MiB/s: median of ${o.repetitions} repetition(s); ratios: median of the per-repetition ratios (each repetition runs all three configurations back to back, order rotated); files fdatasynced between passes (untimed)`,
    `metadata flushes: first-write pass over a fresh snapshot of a ${o.flushOriginBytes / MiB} MiB origin; PREFLUSH|FUA writes counted on the COW device`,
    `memory and reactivation: ${o.exceptions.toLocaleString("en-US")} exceptions with scattered origin chunks; resident = heapUsed + arrayBuffers after full GCs; reactivation median of ${o.reactivations}, COW file in the page cache`,
    `merge: MiB/s of merged data from the resume of the snapshot-merge table to its completion event (each batch: copy, origin fdatasync, metadata write with PREFLUSH+FUA); plain copy: the same bytes from the COW file onto the origin file in one copier job, then one fdatasync; median of ${Math.max(1, o.mergeRepetitions ?? 1)} repetition(s), ratio = plain-copy time / merge time`,
  ];
}

/** Replace the snapshot section of results.md (other sections are kept). */
export function recordSnapshotResults(file: string, description: string[], table: string, command: string): void {
  recordResultsSection(file, "snapshot", "Snapshots", description, table, command);
}

runAsScript(
  import.meta.url,
  () => runSnapshotBenchmark({ ...(quick() ? QUICK_OPTIONS : FULL_OPTIONS), log: (m) => console.error(m) }),
  (r) => [...describeSnapshotRun(r, quick()), "", snapshotTable(r)],
);

function quick(): boolean {
  return process.argv.includes("--quick");
}
