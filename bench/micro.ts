/**
 * Micro-benchmark workloads: the same fixed-size I/O pattern run against the data file through
 * two engines, Node's fd I/O (fs.read / fs.write, what FileDevice itself uses) as the reference,
 * and a udm `linear` device over that file through `DeviceHandle`. Both keep the same number of
 * requests in flight and alternate repetitions, so the ratio between them is udm's own overhead.
 *
 * Each engine runs in a process of its own by default (engine-host.ts): in one process the two
 * share JIT feedback (the harness's call sites turn polymorphic), heap and libuv pool, which
 * skewed in-process runs against udm. `inProcess` runs both here instead. Engine processes load the TypeScript through bench/tsc-loader.mjs (tsc's emit,
 * as `npm run build` ships it) unless `loader: "tsx"` is asked for.
 */
import { randomFillSync } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { alignedBuffer } from "../core/devices/fd-device.js";
import type { IoOptions } from "../core/devices/block-device.js";
import { createDeviceMapper } from "../index.js";
import { childHost, type Loader } from "./engine-host.js";

export const KiB = 1024;
export const MiB = 1024 * KiB;

export interface Workload {
  name: string;
  op: "read" | "write";
  random: boolean;
  blockSize: number;
  /** Requests kept in flight. */
  queueDepth: number;
}

export const WORKLOADS: readonly Workload[] = [
  { name: "4 KiB random read", op: "read", random: true, blockSize: 4 * KiB, queueDepth: 16 },
  { name: "4 KiB random write", op: "write", random: true, blockSize: 4 * KiB, queueDepth: 16 },
  { name: "1 MiB sequential read", op: "read", random: false, blockSize: MiB, queueDepth: 4 },
  { name: "1 MiB sequential write", op: "write", random: false, blockSize: MiB, queueDepth: 4 },
];

/** One side of the comparison: positional I/O of whole buffers on the data file. */
export interface Engine {
  readonly label: string;
  read(buf: Buffer, pos: number): Promise<unknown>;
  write(buf: Buffer, pos: number): Promise<unknown>;
  close(): Promise<void>;
}

/** The reference: one fs.read / fs.write per request on a plain fd. */
export function referenceEngine(file: string, direct: boolean): Engine {
  const fd = fs.openSync(file, fs.constants.O_RDWR | (direct ? fs.constants.O_DIRECT : 0));
  const whole =
    (what: string, buf: Buffer, resolve: () => void, reject: (e: Error) => void) => (err: Error | null, n: number) => {
      if (err) reject(err);
      else if (n !== buf.length) reject(new Error(`short ${what}: ${n} of ${buf.length} bytes`));
      else resolve();
    };
  return {
    label: "reference",
    read: (buf, pos) =>
      new Promise<void>((res, rej) => fs.read(fd, buf, 0, buf.length, pos, whole("read", buf, res, rej))),
    write: (buf, pos) =>
      new Promise<void>((res, rej) => fs.write(fd, buf, 0, buf.length, pos, whole("write", buf, res, rej))),
    close: async () => fs.closeSync(fd),
  };
}

/** udm: `0 <sectors> linear <file> 0`, I/O through `dm.open()`. */
export async function udmEngine(file: string, bytes: number, io: IoOptions): Promise<Engine> {
  const dm = createDeviceMapper({ io });
  await dm.create("bench", { table: `0 ${bytes / 512} linear ${file} 0` });
  const handle = dm.open("bench");
  return {
    label: "udm",
    read: (buf, pos) => handle.readInto(pos / 512, buf),
    write: (buf, pos) => handle.write(pos / 512, buf),
    close: async () => {
      await handle.close();
      await dm.close();
    },
  };
}

export interface Repetition {
  ops: number;
  seconds: number;
  mibps: number;
  iops: number;
  /** Process CPU time (user + system, all threads) per operation, in microseconds. */
  cpuUsPerOp: number;
  /** Time the main thread (event loop) was busy, per operation, in microseconds. */
  mainUsPerOp: number;
  /** Fraction of the repetition the main thread was busy (event-loop utilization). */
  mainBusy: number;
}

/** Run `w` on `engine` for `ms` milliseconds with one buffer per request in flight. */
export async function runRepetition(
  engine: Engine,
  w: Workload,
  fileBytes: number,
  ms: number,
  buffers: readonly Buffer[],
): Promise<Repetition> {
  const blocks = Math.floor(fileBytes / w.blockSize);
  let cursor = 0;
  let ops = 0;
  const cpuStart = process.cpuUsage();
  const eluStart = performance.eventLoopUtilization();
  const start = performance.now();
  const deadline = start + ms;
  const worker = async (buf: Buffer): Promise<void> => {
    while (performance.now() < deadline) {
      const block = w.random ? Math.floor(Math.random() * blocks) : cursor++ % blocks;
      if (w.op === "read") await engine.read(buf, block * w.blockSize);
      else await engine.write(buf, block * w.blockSize);
      ops++;
    }
  };
  await Promise.all(buffers.slice(0, w.queueDepth).map(worker));
  const seconds = (performance.now() - start) / 1000;
  const cpu = process.cpuUsage(cpuStart);
  const elu = performance.eventLoopUtilization(eluStart);
  return {
    ops,
    seconds,
    mibps: (ops * w.blockSize) / MiB / seconds,
    iops: ops / seconds,
    cpuUsPerOp: (cpu.user + cpu.system) / ops,
    mainUsPerOp: (elu.active * 1000) / ops,
    mainBusy: elu.utilization,
  };
}

export type EngineKind = "reference" | "udm";

/** One engine on one workload (JSON: it travels to engine processes). */
export interface EngineSpec {
  kind: EngineKind;
  file: string;
  fileBytes: number;
  direct: boolean;
  /** udm's other I/O options (A/B measurements: inline reads, write plug off). */
  io?: Omit<IoOptions, "direct">;
  workload: Workload;
}

/** Where an engine runs: this process (localHost) or one of its own (childHost). */
export interface EngineHost {
  open(spec: EngineSpec): Promise<void>;
  run(ms: number): Promise<Repetition>;
  close(): Promise<void>;
  exit(): Promise<void>;
}

/** Engines in this process, each with one (random-filled) buffer per request in flight. */
export function localHost(): EngineHost {
  let current: { engine: Engine; spec: EngineSpec; buffers: Buffer[] } | null = null;
  const close = async () => {
    const c = current;
    current = null;
    await c?.engine.close();
  };
  return {
    async open(spec) {
      await close();
      const { file, fileBytes, direct, workload: w } = spec;
      const engine =
        spec.kind === "udm" ? await udmEngine(file, fileBytes, { ...spec.io, direct }) : referenceEngine(file, direct);
      const buffers = Array.from({ length: w.queueDepth }, () => randomFillSync(alignedBuffer(w.blockSize)));
      current = { engine, spec, buffers };
    },
    run(ms) {
      if (!current) throw new Error("no engine open");
      return runRepetition(current.engine, current.spec.workload, current.spec.fileBytes, ms, current.buffers);
    },
    close,
    exit: close,
  };
}

/** (Re)create `file` with `bytes` random bytes, on disk (fsynced) and in the page cache. */
export function fillFile(file: string, bytes: number): void {
  const chunk = Buffer.allocUnsafe(Math.min(bytes, MiB));
  const fd = fs.openSync(file, "w");
  try {
    for (let done = 0; done < bytes; done += chunk.length) {
      fs.writeSync(fd, randomFillSync(chunk), 0, Math.min(chunk.length, bytes - done), done);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function syncFile(file: string): void {
  const fd = fs.openSync(file, "r+");
  try {
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export interface Filesystem {
  type: string;
  source: string;
  mountPoint: string;
}

/** The mount holding `dir`, from /proc/self/mountinfo (longest matching mount point). */
export function filesystemOf(dir: string): Filesystem {
  const real = fs.realpathSync(dir);
  const unescape = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  let best: Filesystem = { type: "unknown", source: "unknown", mountPoint: "/" };
  let bestLen = -1;
  let lines: string[] = [];
  try {
    lines = fs.readFileSync("/proc/self/mountinfo", "utf8").split("\n");
  } catch {
    return best;
  }
  for (const line of lines) {
    const [pre, post] = line.split(" - ");
    if (!pre || !post) continue;
    const mountPoint = unescape(pre.split(" ")[4] ?? "");
    const [type = "unknown", source = "unknown"] = post.split(" ");
    const inside = real === mountPoint || real.startsWith(mountPoint.endsWith("/") ? mountPoint : mountPoint + "/");
    if (inside && mountPoint.length >= bestLen) {
      best = { type, source: unescape(source), mountPoint };
      bestLen = mountPoint.length;
    }
  }
  return best;
}

const MEMORY_FS = new Set(["tmpfs", "ramfs"]);

/**
 * Where the data file goes: os.tmpdir() unless it is memory-backed (or too small), then the
 * project's ./var, then /var/tmp.
 */
export function pickDataDir(bytes: number): string {
  const candidates = [os.tmpdir(), path.join(import.meta.dirname, "..", "var"), "/var/tmp"];
  for (const dir of candidates) {
    try {
      fs.mkdirSync(dir, { recursive: true });
      const st = fs.statfsSync(dir);
      if (!MEMORY_FS.has(filesystemOf(dir).type) && st.bavail * st.bsize > bytes * 1.1) return dir;
    } catch {
      // not usable: try the next one
    }
  }
  return os.tmpdir();
}

export interface Side {
  /** Medians over the repetitions. */
  mibps: number;
  iops: number;
  cpuUsPerOp: number;
  mainUsPerOp: number;
  mainBusy: number;
  reps: Repetition[];
}

export interface Row {
  workload: Workload;
  reference: Side;
  udm: Side;
  /** udm / reference, of the median MiB/s. */
  ratio: number;
  /** udm / reference of each repetition pair: how noisy the ratio is. */
  pairRatios: number[];
}

export interface MicroOptions {
  fileBytes: number;
  /** Duration of one timed repetition. */
  repMs: number;
  repetitions: number;
  direct: boolean;
  /** udm's other I/O options (A/B measurements). */
  io?: Omit<IoOptions, "direct">;
  /** Directory for the data file (default: pickDataDir). */
  dir?: string;
  workloads?: readonly Workload[];
  /** Untimed run of each engine before the timed ones (default: max(repMs / 4, 250 ms)). */
  warmupMs?: number;
  /** Run both engines in this process instead of one child process each. */
  inProcess?: boolean;
  /** How engine processes load the TypeScript (default tsc). */
  loader?: Loader;
  /** Progress messages. */
  log?: (message: string) => void;
}

export interface MicroResult {
  dataDir: string;
  filesystem: Filesystem;
  fileBytes: number;
  repMs: number;
  repetitions: number;
  direct: boolean;
  io?: Omit<IoOptions, "direct">;
  inProcess: boolean;
  loader: Loader | "this process's";
  rows: Row[];
}

const KINDS = ["reference", "udm"] as const;

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

function side(reps: Repetition[]): Side {
  const med = (key: Exclude<keyof Repetition, "ops" | "seconds">) => median(reps.map((r) => r[key]));
  return {
    mibps: med("mibps"),
    iops: med("iops"),
    cpuUsPerOp: med("cpuUsPerOp"),
    mainUsPerOp: med("mainUsPerOp"),
    mainBusy: med("mainBusy"),
    reps,
  };
}

/**
 * Every workload on a freshly written file: an untimed warm-up of each engine, then
 * `repetitions` timed pairs in ABBA order (reference first on even pairs, udm first on odd ones);
 * only one engine does I/O at a time. After a write repetition the file is fdatasynced, untimed,
 * so each repetition starts with a clean page cache.
 */
export async function runMicroBenchmark(opts: MicroOptions): Promise<MicroResult> {
  const { fileBytes, repMs, repetitions, direct } = opts;
  if (fileBytes < MiB || fileBytes % MiB !== 0) throw new Error("file size must be a whole number of MiB");
  const log = opts.log ?? (() => undefined);
  const dataDir = opts.dir ?? pickDataDir(fileBytes);
  const workDir = fs.mkdtempSync(path.join(dataDir, "udm-bench-"));
  const file = path.join(workDir, "data.bin");
  const rows: Row[] = [];
  const loader = opts.loader ?? "tsc";
  const started = await Promise.allSettled(
    KINDS.map(async (kind) => (opts.inProcess ? localHost() : childHost(kind, loader))),
  );
  const hosts = started.flatMap((s) => (s.status === "fulfilled" ? [s.value] : []));
  try {
    for (const s of started) if (s.status === "rejected") throw s.reason;
    for (const w of opts.workloads ?? WORKLOADS) {
      fillFile(file, fileBytes);
      const reps: Repetition[][] = [[], []];
      for (const [i, host] of hosts.entries())
        await host.open({ kind: KINDS[i]!, file, fileBytes, direct, io: opts.io, workload: w });
      try {
        const run = async (i: 0 | 1, ms: number) => {
          const r = await hosts[i]!.run(ms);
          if (w.op === "write") syncFile(file);
          return r;
        };
        const warmupMs = opts.warmupMs ?? Math.max(repMs / 4, 250);
        await run(0, warmupMs);
        await run(1, warmupMs);
        for (let n = 0; n < repetitions; n++) {
          for (const i of n % 2 === 0 ? ([0, 1] as const) : ([1, 0] as const)) reps[i]!.push(await run(i, repMs));
          log(
            `${w.name}: repetition ${n + 1}/${repetitions}: reference ${reps[0]!.at(-1)!.mibps.toFixed(1)} MiB/s, udm ${reps[1]!.at(-1)!.mibps.toFixed(1)} MiB/s`,
          );
        }
      } finally {
        for (const host of hosts)
          await host.close().catch((err: unknown) => log(`closing an engine failed: ${String(err)}`));
      }
      const reference = side(reps[0]!);
      const udm = side(reps[1]!);
      rows.push({
        workload: w,
        reference,
        udm,
        ratio: udm.mibps / reference.mibps,
        pairRatios: udm.reps.map((r, i) => r.mibps / reference.reps[i]!.mibps),
      });
    }
  } finally {
    for (const host of hosts)
      await host.exit().catch((err: unknown) => log(`stopping an engine failed: ${String(err)}`));
    fs.rmSync(workDir, { recursive: true, force: true });
  }
  return {
    dataDir,
    filesystem: filesystemOf(dataDir),
    fileBytes,
    repMs,
    repetitions,
    direct,
    io: opts.io,
    inProcess: opts.inProcess ?? false,
    loader: opts.inProcess ? "this process's" : loader,
    rows,
  };
}
