/**
 * Thin-provisioning benchmarks (udm issue 19, "Performance"), in process through the library API,
 * on files in a directory on a real disk (not tmpfs). `npm run bench -- --thin` runs them alone; a
 * full `npm run bench` runs them after the snapshot benchmarks. On their own:
 * `node --import tsx bench/thin.ts [--quick]`.
 *
 * 1. First write with 1, 4 and 16 snapshots: a thin volume (64 KiB blocks) fully written, then N
 *    snapshots of it taken (suspend, `create_snap`, resume), then the timed pass: 64 KiB writes at
 *    queue depth 16, every block once in a random order (every write breaks sharing: a new block
 *    is provisioned and mapped; the old one stays with the snapshots), then a flush (the commit).
 *    The same pass through `snapshot-origin` with N persistent snapshots of 64 KiB chunks (every
 *    write copies its chunk into each of the N COW devices), in the same run. Target: thin with
 *    16 snapshots ≤ 1.1 × the time with 1 (the cost does not grow with snapshots).
 * 2. Metadata flushes (flush bios, and FUA superblock writes = commits, counted by a wrapper
 *    around the metadata device) per provisioned block with 16 parallel writers over a fresh thin
 *    volume: FUA writes of 64 KiB (one block each: a writer has one block in flight, so 1/16 is
 *    the floor) and of 1 MiB (16 blocks each), and plain 64 KiB writes with one flush at the end.
 *    Target ≤ 1 per 32 provisioned blocks.
 * 3. Activation of 10^6 mappings: pool metadata holding one thin device with 10^6 mapped blocks,
 *    written by thin_restore from a generated XML; timed from `create` of the pool to the end of
 *    the first read through the thin device. Target ≤ 1 s. Resident bytes per mapping: heapUsed +
 *    arrayBuffers after full GCs, before the pool's creation and after that first read.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import type { DeviceHandle, DeviceMapper } from "../core/device-mapper.js";
import { createDeviceMapper } from "../index.js";
import { fmt, markdownTable, MiB, recordResultsSection, runAsScript } from "./format.js";
import { type Filesystem, filesystemOf, median, pickDataDir } from "./micro.js";
import { ensureGc } from "./snapshot.js";
import { CountingBacking, sparseFile } from "./counting-backing.js";
import { permutation, writePass } from "./passes.js";

/** Thin data block size and snapshot chunk size: 64 KiB. */
const BLOCK_SECTORS = 128;
const BLOCK_BYTES = BLOCK_SECTORS * 512;
const META_BYTES = 64 * MiB;

export const THIN_GOALS = {
  /** First-write time with 16 snapshots / with 1. */
  sixteenVsOne: 1.1,
  /** Metadata flushes per provisioned block (1 per 32). */
  flushesPerBlock: 1 / 32,
  /** Seconds from the pool's create to the first I/O over 10^6 mappings. */
  activateSeconds: 1,
};

export const SNAPSHOT_COUNTS = [1, 4, 16] as const;

export interface ThinBenchOptions {
  /** Volume size of the first-write passes (a multiple of 1 MiB). */
  volumeBytes: number;
  /** Repetitions of each first-write configuration (medians and per-repetition ratios). */
  repetitions: number;
  /** Volume size of the metadata-flush runs. */
  flushVolumeBytes: number;
  /** Mappings in the activation measurement. */
  mappings: number;
  /** Repetitions of the activation. */
  activations: number;
  /** 4 KiB reads at random mapped blocks after the activation (QD16). */
  touchReads: number;
  dir?: string;
  log?: (message: string) => void;
}

export const FULL_THIN_OPTIONS: ThinBenchOptions = {
  volumeBytes: 64 * MiB,
  repetitions: 5,
  flushVolumeBytes: 64 * MiB,
  mappings: 1_000_000,
  activations: 3,
  touchReads: 65536,
};

export const QUICK_THIN_OPTIONS: ThinBenchOptions = {
  volumeBytes: 8 * MiB,
  repetitions: 3,
  flushVolumeBytes: 16 * MiB,
  mappings: 1_000_000,
  activations: 1,
  touchReads: 16384,
};

export interface FirstWriteResult {
  kind: "thin" | "snapshot-origin";
  snapshots: number;
  /** Seconds of the write pass of each repetition, in repetition order (the flush after it not included). */
  reps: number[];
  seconds: number;
  /** Seconds of the write pass and the flush after it, per repetition. */
  withFlush: number[];
}

export interface FlushResult {
  what: string;
  writeBytes: number;
  fua: boolean;
  blocks: number;
  flushes: number;
  commits: number;
  /** The pass and its final flush. */
  seconds: number;
}

export interface ActivationResult {
  mappings: number;
  seconds: number[];
  bytesPerMapping: number[];
  /** The reads all over the volume after activation, and resident bytes per mapping after them. */
  touchSeconds: number[];
  touchedBytesPerMapping: number[];
  metadataBytes: number;
}

export interface ThinBenchResult {
  dataDir: string;
  filesystem: Filesystem;
  options: ThinBenchOptions;
  firstWrite: FirstWriteResult[];
  flushes: FlushResult[];
  activation: ActivationResult | { skipped: string };
}

// ---- helpers ----

/** A 4 KiB read at the start of every block of `blocks`, 16 in flight. */
async function readPass(handle: DeviceHandle, blocks: Uint32Array): Promise<void> {
  let next = 0;
  const worker = async () => {
    const buf = Buffer.alloc(4096);
    while (next < blocks.length) await handle.readInto(blocks[next++]! * BLOCK_SECTORS, buf);
  };
  await Promise.all(Array.from({ length: 16 }, worker));
}

/** Write the whole device once, in 1 MiB writes, then flush. */
async function fill(handle: DeviceHandle, bytes: number): Promise<void> {
  await writePass(handle, permutation(bytes / MiB, 3).sort(), MiB, 4);
  await handle.flush();
}

interface Stack {
  dm: DeviceMapper;
  backing: CountingBacking;
  handle: DeviceHandle;
}

/** A pool over fresh meta/data files and thin volume 1 in it (name "vol"). */
async function thinStack(dir: string, volumeBytes: number, dataBytes: number): Promise<Stack> {
  const meta = path.join(dir, "meta.img");
  const data = path.join(dir, "data.img");
  sparseFile(meta, META_BYTES);
  sparseFile(data, dataBytes);
  const backing = new CountingBacking("meta");
  const dm = createDeviceMapper({ backing });
  await dm.create("pool", { table: `0 ${dataBytes / 512} thin-pool ${meta} ${data} ${BLOCK_SECTORS} 0` });
  await dm.message("pool", 0, "create_thin 1");
  await dm.create("vol", { table: `0 ${volumeBytes / 512} thin /dev/mapper/pool 1` });
  return { dm, backing, handle: dm.open("vol") };
}

/** A thin volume fully written, then `snapshots` snapshots of it, taken as the kernel wants (origin suspended). */
async function thinWithSnapshots(dir: string, volumeBytes: number, snapshots: number): Promise<Stack> {
  const s = await thinStack(dir, volumeBytes, 2 * volumeBytes + 16 * MiB);
  await fill(s.handle, volumeBytes);
  await s.dm.suspend("vol");
  for (let i = 0; i < snapshots; i++) await s.dm.message("pool", 0, `create_snap ${2 + i} 1`);
  await s.dm.resume("vol");
  return s;
}

/** snapshot-origin over a random origin file with `snapshots` fresh persistent snapshots (64 KiB chunks). */
async function originWithSnapshots(dir: string, volumeBytes: number, snapshots: number): Promise<Stack> {
  const origin = path.join(dir, "origin.img");
  sparseFile(origin, volumeBytes);
  const backing = new CountingBacking("meta");
  const dm = createDeviceMapper({ backing });
  const sectors = volumeBytes / 512;
  // Fill the origin through a linear device, as the thin volume is filled.
  await dm.create("fill", { table: `0 ${sectors} linear ${origin} 0` });
  const f = dm.open("fill");
  await fill(f, volumeBytes);
  await f.close();
  await dm.remove("fill");
  await dm.create("vol", { table: `0 ${sectors} snapshot-origin ${origin}` });
  await dm.suspend("vol");
  const chunks = volumeBytes / BLOCK_BYTES;
  const epa = BLOCK_BYTES / 16;
  const cowBytes = (1 + Math.ceil((chunks + 1) / epa) + chunks) * BLOCK_BYTES; // docs/snapshot.md, Sizing
  for (let i = 0; i < snapshots; i++) {
    const cow = path.join(dir, `cow${i}.img`);
    sparseFile(cow, cowBytes);
    await dm.create(`snap${i}`, { table: `0 ${sectors} snapshot ${origin} ${cow} P ${BLOCK_SECTORS}` });
  }
  await dm.resume("vol");
  return { dm, backing, handle: dm.open("vol") };
}

async function teardown(dir: string, s: Stack): Promise<void> {
  await s.handle.close();
  await s.dm.close();
  for (const f of fs.readdirSync(dir)) fs.rmSync(path.join(dir, f), { force: true });
}

/** Drop the page cache's dirty pages of the files before a timed pass (untimed). */
function syncDir(dir: string): void {
  for (const f of fs.readdirSync(dir)) {
    const fd = fs.openSync(path.join(dir, f), "r+");
    try {
      fs.fdatasyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }
}

/** The timed pass: every block once, 64 KiB writes, QD16, random order; then a flush, timed apart. */
async function timedPass(s: Stack, volumeBytes: number, seed: number): Promise<{ writes: number; flush: number }> {
  const t0 = performance.now();
  await writePass(s.handle, permutation(volumeBytes / BLOCK_BYTES, seed), BLOCK_BYTES, 16);
  const t1 = performance.now();
  await s.handle.flush();
  return { writes: (t1 - t0) / 1000, flush: (performance.now() - t1) / 1000 };
}

const FIRST_WRITE_CONFIGS = [
  ...SNAPSHOT_COUNTS.map((n) => ({ kind: "thin" as const, snapshots: n })),
  ...SNAPSHOT_COUNTS.map((n) => ({ kind: "snapshot-origin" as const, snapshots: n })),
];

async function firstWrite(dir: string, opts: ThinBenchOptions, log: (m: string) => void): Promise<FirstWriteResult[]> {
  const build = (c: (typeof FIRST_WRITE_CONFIGS)[number], bytes: number) =>
    c.kind === "thin" ? thinWithSnapshots(dir, bytes, c.snapshots) : originWithSnapshots(dir, bytes, c.snapshots);
  // Warm-up (JIT): one small untimed pass of each configuration.
  const warmup = Math.min(4 * MiB, opts.volumeBytes);
  for (const c of FIRST_WRITE_CONFIGS) {
    const s = await build(c, warmup);
    await timedPass(s, warmup, 99);
    await teardown(dir, s);
  }
  const reps = FIRST_WRITE_CONFIGS.map(() => [] as number[]);
  const withFlush = FIRST_WRITE_CONFIGS.map(() => [] as number[]);
  for (let rep = 0; rep < opts.repetitions; rep++) {
    // Rotate the order of the configurations between repetitions.
    for (let k = 0; k < FIRST_WRITE_CONFIGS.length; k++) {
      const i = (k + rep) % FIRST_WRITE_CONFIGS.length;
      const c = FIRST_WRITE_CONFIGS[i]!;
      const s = await build(c, opts.volumeBytes);
      syncDir(dir);
      const t = await timedPass(s, opts.volumeBytes, 1 + rep);
      await teardown(dir, s);
      reps[i]!.push(t.writes);
      withFlush[i]!.push(t.writes + t.flush);
      log(
        `thin bench: ${c.kind}, ${c.snapshots} snapshot(s), repetition ${rep + 1}/${opts.repetitions}: first write ${(opts.volumeBytes / MiB / t.writes).toFixed(1)} MiB/s, then flush ${(1000 * t.flush).toFixed(0)} ms`,
      );
    }
  }
  return FIRST_WRITE_CONFIGS.map((c, i) => ({
    ...c,
    reps: reps[i]!,
    seconds: median(reps[i]!),
    withFlush: withFlush[i]!,
  }));
}

/** Flushes and commits on the metadata device while 16 writers provision every block of a fresh volume. */
async function flushCount(dir: string, volumeBytes: number, writeBytes: number, fua: boolean): Promise<FlushResult> {
  const s = await thinStack(dir, volumeBytes, volumeBytes + 16 * MiB);
  const meta = s.backing.counted[0]!;
  const [flushes0, commits0] = [meta.flushes, meta.fuaWrites];
  const t0 = performance.now();
  await writePass(s.handle, permutation(volumeBytes / writeBytes, 7), writeBytes, 16, fua);
  await s.handle.flush();
  const seconds = (performance.now() - t0) / 1000;
  const flushes = meta.flushes - flushes0;
  const commits = meta.fuaWrites - commits0;
  await teardown(dir, s);
  const kib = writeBytes / 1024;
  const what = fua
    ? `${kib} KiB FUA writes`
    : `${kib} KiB writes, one flush at the end (commits: the pool's 1 s timer and the flush)`;
  return { what, writeBytes, fua, blocks: volumeBytes / BLOCK_BYTES, flushes, commits, seconds };
}

/** heapUsed + arrayBuffers once memory has settled after full GCs. */
async function resident(gc: () => void): Promise<number> {
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

/** Why the activation measurement cannot run here (it needs thin_restore), or null. */
export function thinRestoreMissing(): string | null {
  try {
    execFileSync("thin_restore", ["-V"], { stdio: "ignore" });
    return null;
  } catch {
    return "thin_restore (thin-provisioning-tools) is not installed";
  }
}

/**
 * Pool metadata with one thin device mapping `n` blocks, written by thin_restore. The mappings
 * are runs of 7 blocks placed in a scattered order on the data device (so the leaves hold real
 * keys and values, as after random writes, rather than one run).
 */
function restoreMetadata(dir: string, n: number): { meta: string; data: string; dataBlocks: number } {
  const run = 7;
  const runs = Math.ceil(n / run);
  const order = permutation(runs, 5);
  const lines = [
    `<superblock uuid="" time="0" transaction="1" flags="0" version="2" data_block_size="${BLOCK_SECTORS}" nr_data_blocks="${runs * run}">`,
    `  <device dev_id="1" mapped_blocks="${n}" transaction="0" creation_time="0" snap_time="0">`,
  ];
  for (let r = 0; r < runs; r++) {
    const length = Math.min(run, n - r * run);
    lines.push(
      `    <range_mapping origin_begin="${r * run}" data_begin="${order[r]! * run}" length="${length}" time="0"/>`,
    );
  }
  lines.push("  </device>", "</superblock>", "");
  const xml = path.join(dir, "restore.xml");
  fs.writeFileSync(xml, lines.join("\n"));
  const meta = path.join(dir, "meta-big.img");
  const data = path.join(dir, "data-big.img");
  sparseFile(meta, META_BYTES);
  sparseFile(data, runs * run * BLOCK_BYTES);
  execFileSync("thin_restore", ["-i", xml, "-o", meta], { stdio: "ignore" });
  fs.rmSync(xml);
  return { meta, data, dataBlocks: runs * run };
}

async function activation(dir: string, opts: ThinBenchOptions, log: (m: string) => void): Promise<ActivationResult> {
  const gc = ensureGc();
  const { meta, data, dataBlocks } = restoreMetadata(dir, opts.mappings);
  const seconds: number[] = [];
  const bytesPerMapping: number[] = [];
  const touchSeconds: number[] = [];
  const touchedBytesPerMapping: number[] = [];
  const buf = Buffer.alloc(4096);
  for (let rep = 0; rep < Math.max(1, opts.activations); rep++) {
    const dm = createDeviceMapper();
    try {
      const before = await resident(gc);
      const t0 = performance.now();
      await dm.create("pool", {
        table: `0 ${dataBlocks * BLOCK_SECTORS} thin-pool ${meta} ${data} ${BLOCK_SECTORS} 0`,
      });
      await dm.create("vol", { table: `0 ${opts.mappings * BLOCK_SECTORS} thin /dev/mapper/pool 1` });
      const h = dm.open("vol");
      await h.readInto(((opts.mappings * 7) >>> 3) * BLOCK_SECTORS, buf);
      seconds.push((performance.now() - t0) / 1000);
      bytesPerMapping.push(((await resident(gc)) - before) / opts.mappings);
      // Then reads all over the volume: the mapping tree's leaves come into the metadata cache.
      const t1 = performance.now();
      await readPass(h, permutation(opts.mappings, 17 + rep).subarray(0, opts.touchReads));
      touchSeconds.push((performance.now() - t1) / 1000);
      touchedBytesPerMapping.push(((await resident(gc)) - before) / opts.mappings);
      const status = dm.status("vol")[0]!.params;
      if (Number(status.split(" ")[0]) !== opts.mappings * BLOCK_SECTORS)
        throw new Error(`thin volume status '${status}': not ${opts.mappings} mapped blocks`);
      await h.close();
      log(
        `thin bench: activation ${rep + 1}: ${seconds.at(-1)!.toFixed(3)} s, ${bytesPerMapping.at(-1)!.toFixed(2)} B/mapping; ${opts.touchReads} reads ${touchSeconds.at(-1)!.toFixed(2)} s, then ${touchedBytesPerMapping.at(-1)!.toFixed(2)} B/mapping`,
      );
    } finally {
      await dm.close();
    }
  }
  const metadataBytes = fs.statSync(meta).blocks * 512;
  fs.rmSync(meta, { force: true });
  fs.rmSync(data, { force: true });
  return { mappings: opts.mappings, seconds, bytesPerMapping, touchSeconds, touchedBytesPerMapping, metadataBytes };
}

export async function runThinBenchmark(opts: ThinBenchOptions): Promise<ThinBenchResult> {
  const log = opts.log ?? (() => undefined);
  const dataDir = opts.dir ?? pickDataDir(20 * opts.volumeBytes + 2 * META_BYTES);
  const dir = fs.mkdtempSync(path.join(dataDir, "udm-thinbench-"));
  try {
    const fw = await firstWrite(dir, opts, log);
    const flushes = [
      await flushCount(dir, opts.flushVolumeBytes, BLOCK_BYTES, true),
      await flushCount(dir, opts.flushVolumeBytes, MiB, true),
      await flushCount(dir, opts.flushVolumeBytes, BLOCK_BYTES, false),
    ];
    for (const f of flushes)
      log(
        `thin bench: ${f.what}: ${f.flushes} flushes, ${f.commits} commits for ${f.blocks} blocks in ${f.seconds.toFixed(2)} s (${((1000 * f.seconds) / Math.max(1, f.commits)).toFixed(1)} ms per commit)`,
      );
    const missing = thinRestoreMissing();
    const act = missing ? { skipped: missing } : await activation(dir, opts, log);
    return { dataDir, filesystem: filesystemOf(dataDir), options: opts, firstWrite: fw, flushes, activation: act };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ---- reporting ----

export interface ThinRow {
  measure: string;
  value: string;
  goal: string;
  result: "PASS" | "MISS" | "";
}

export function thinRows(r: ThinBenchResult): ThinRow[] {
  const g = THIN_GOALS;
  const rows: ThinRow[] = [];
  const verdict = (ok: boolean): "PASS" | "MISS" => (ok ? "PASS" : "MISS");
  const mibps = (s: number) => r.options.volumeBytes / MiB / s;
  // Ratios are medians of per-repetition ratios: a repetition runs every configuration back to back.
  const paired = (a: FirstWriteResult, b: FirstWriteResult) => median(a.reps.map((x, i) => x / b.reps[i]!));
  const perRep = (a: FirstWriteResult, b: FirstWriteResult) => a.reps.map((x, i) => fmt(x / b.reps[i]!, 2)).join(" ");
  const pairedFlush = (a: FirstWriteResult, b: FirstWriteResult) =>
    median(a.withFlush.map((x, i) => x / b.withFlush[i]!));
  for (const kind of ["thin", "snapshot-origin"] as const) {
    const one = r.firstWrite.find((f) => f.kind === kind && f.snapshots === 1)!;
    for (const f of r.firstWrite.filter((x) => x.kind === kind)) {
      const last = f.snapshots === SNAPSHOT_COUNTS.at(-1);
      const ratio = paired(f, one);
      rows.push({
        measure: `${kind}, ${f.snapshots} snapshot${f.snapshots > 1 ? "s" : ""}: first write${f.snapshots > 1 ? `, time vs ${kind} with 1` : ""}`,
        value:
          f.snapshots === 1
            ? `${fmt(mibps(f.seconds))} MiB/s (${fmt(1000 * f.seconds, 0)} ms; with the flush ${fmt(1000 * median(f.withFlush), 0)} ms)`
            : `${fmt(mibps(f.seconds))} MiB/s; ${fmt(ratio, 2)}× (per rep ${perRep(f, one)}); with the flush ${fmt(pairedFlush(f, one), 2)}×`,
        goal: kind === "thin" && last ? `<= ${g.sixteenVsOne}×` : "",
        result: kind === "thin" && last ? verdict(ratio <= g.sixteenVsOne) : "",
      });
    }
  }
  for (const n of SNAPSHOT_COUNTS) {
    const thin = r.firstWrite.find((f) => f.kind === "thin" && f.snapshots === n)!;
    const origin = r.firstWrite.find((f) => f.kind === "snapshot-origin" && f.snapshots === n)!;
    rows.push({
      measure: `first write with ${n} snapshot${n > 1 ? "s" : ""}: snapshot-origin time / thin time`,
      value: `${fmt(paired(origin, thin), 2)}× (with the flush ${fmt(pairedFlush(origin, thin), 2)}×)`,
      goal: "",
      result: "",
    });
  }
  for (const f of r.flushes) {
    const perBlock = f.flushes / f.blocks;
    const floor = f.fua && f.writeBytes === BLOCK_BYTES;
    rows.push({
      measure: `metadata flushes per provisioned block, 16 writers × ${f.what}${floor ? " (floor 1/16: one block per writer in flight)" : ""}`,
      value: `1 per ${fmt(1 / perBlock, 1)} (${f.flushes} flushes, ${f.commits} commits, ${f.blocks} blocks, ${fmt((f.blocks / MiB / f.seconds) * BLOCK_BYTES)} MiB/s)`,
      goal: floor ? "" : "<= 1 per 32",
      result: floor ? "" : verdict(perBlock <= g.flushesPerBlock),
    });
  }
  const a = r.activation;
  if ("skipped" in a) {
    rows.push({ measure: "activation of 10^6 mappings", value: `skipped: ${a.skipped}`, goal: "", result: "" });
  } else {
    const n = a.mappings.toLocaleString("en-US");
    const s = median(a.seconds);
    rows.push({
      measure: `activate a pool and a thin volume mapping ${n} blocks, up to the end of the first read (${fmt(a.metadataBytes / MiB, 0)} MiB of metadata)`,
      value: `${fmt(s, 3)} s (${a.seconds.map((x) => fmt(x, 3)).join(" ")})`,
      goal: `<= ${g.activateSeconds} s`,
      result: verdict(s <= g.activateSeconds),
    });
    rows.push({
      measure: `resident bytes per mapping, ${n} mappings activated (metadata read on demand)`,
      value: `${fmt(median(a.bytesPerMapping), 2)} B`,
      goal: "",
      result: "",
    });
    const reads = r.options.touchReads;
    rows.push({
      measure: `resident bytes per mapping after ${reads.toLocaleString("en-US")} 4 KiB reads at random mapped blocks (QD16; the mapping tree's leaves cached)`,
      value: `${fmt(median(a.touchedBytesPerMapping), 2)} B (reads: ${fmt(reads / median(a.touchSeconds), 0)} IOPS)`,
      goal: "",
      result: "",
    });
  }
  return rows;
}

export function thinTable(r: ThinBenchResult): string {
  return markdownTable(
    ["Thin measure", "value", "goal", "result"],
    thinRows(r).map((x) => [x.measure, x.value, x.goal, x.result]),
    new Set(),
  );
}

export function describeThinRun(r: ThinBenchResult, quick: boolean): string[] {
  const o = r.options;
  const fsys = r.filesystem;
  return [
    `udm thin benchmark (${quick ? "quick" : "full"} run), in process through the library API, buffered file I/O; files in ${r.dataDir}, on ${fsys.type} (${fsys.source}, mounted at ${fsys.mountPoint})`,
    `first write: ${o.volumeBytes / MiB} MiB volume written in full, then N snapshots taken (origin suspended), then 64 KiB writes at QD16 to every block once in a random order (timed), then a flush (timed apart: the page cache's writeback of the data, the same in every configuration); thin: 64 KiB data blocks; snapshot-origin: persistent snapshots of 64 KiB chunks; files fdatasynced before the pass; median of ${o.repetitions} repetitions, ratios the median of per-repetition ratios (each repetition runs all six configurations back to back, order rotated)`,
    `metadata flushes: a fresh ${o.flushVolumeBytes / MiB} MiB thin volume, every block provisioned once by 16 writers; flush bios and FUA writes (commits) counted on the metadata device`,
    `activation: metadata written by thin_restore (${o.mappings.toLocaleString("en-US")} mappings in runs of 7, scattered over the data device), in the page cache; timed from the pool's create to the end of one 4 KiB read through the thin volume; resident = heapUsed + arrayBuffers after full GCs, after that read minus before the create`,
  ];
}

/** Replace the thin section of results.md (other sections are kept). */
export function recordThinResults(file: string, description: string[], table: string, command: string): void {
  recordResultsSection(file, "thin", "Thin provisioning", description, table, command);
}

runAsScript(
  import.meta.url,
  () => runThinBenchmark({ ...(quick() ? QUICK_THIN_OPTIONS : FULL_THIN_OPTIONS), log: (m) => console.error(m) }),
  (r) => [...describeThinRun(r, quick()), "", thinTable(r)],
);

function quick(): boolean {
  return process.argv.includes("--quick");
}
