/**
 * The benchmark matrix (udm issue 8): udm's daemon over NBD against nbdkit, qemu-nbd and the raw
 * file, with one client (fio) and the same job options for every NBD server, all on this machine
 * in one run. `npm run bench -- --matrix` runs it in full and records it in bench/results.md;
 * `npm run bench -- --quick` includes a tiny run of it as a smoke test.
 *
 * Configurations (each on a freshly written data file of random bytes):
 *   raw file, buffered (fio psync) and O_DIRECT (fio libaio): no server, the baselines;
 *   nbdkit file plugin (default threads, --threads 4); qemu-nbd serving the raw file;
 *   nbdkit with the cow filter; qemu-nbd serving a qcow2 overlay over the raw file (4 KiB and
 *   64 KiB clusters); udm linear; udm snapshot-origin with one persistent snapshot (chunk 8 and
 *   128 sectors) and with three (chunk 8); and, not one of issue 8's, udm with one transient (N)
 *   snapshot: what the persistent store's durability costs (nbdkit's cow overlay is never flushed).
 * Workloads: 1 MiB sequential read / write (QD 4), 4 KiB random read / write (QD 16), time-based;
 * for the copy-on-write configurations (and udm linear, the reference for rewrites) also "first
 * write" (one pass of 4 KiB random writes at QD 16 over every block of a fresh snapshot / overlay:
 * every chunk is copied) and "rewrite" (the same pass again: nothing left to copy).
 *
 * Writable overlays (issue 17, bench/overlay.ts): udm snapshots without a snapshot-origin (chunk 8
 * and 128) as overlays of the data file, with their own workloads, also run by nbdkit's cow
 * filter, the qcow2 overlays and udm linear; `--configs overlays --only overlays` runs just those.
 *
 * Repetitions run in rounds: every configuration once per round (server started, data file
 * written, one repetition of each workload, server stopped), so the ratios of round n compare
 * figures taken minutes apart, not a quarter of an hour.
 *
 * Server CPU: utime + stime of the server process (/proc/PID/stat) before and after each job.
 *
 * Profiling udmd: `npm run bench -- --matrix --configs udm-linear --only "random read" --profile
 * var/prof` starts it with `node --cpu-prof`; summarise with `node --import tsx
 * bench/profile-top.ts var/prof/udmd-*.cpuprofile`.
 */
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { type FioJob, type FioResult, type FioTarget, runFio } from "./fio.js";
import {
  cowBytesFor,
  OVERLAY_CONFIGS,
  OVERLAY_DESCRIPTION,
  OVERLAY_WORKLOADS,
  type OverlayKey,
  overlayCpuTable,
  overlayTable,
  overlayTargets,
  runOverlayPhases,
} from "./overlay.js";
import { REMOTE_CONFIGS, remoteTargets } from "./remote.js";
import { bytesText, fmt, GiB, KiB, markdownTable, MiB, replaceSection } from "./format.js";
import { type Filesystem, filesystemOf, fillFile, median, pickDataDir } from "./micro.js";
import {
  cpuSeconds,
  ROOT,
  type Server,
  startNbdkit,
  startQemuNbd,
  startUdmd,
  syncFile,
  syncOpenFiles,
  toolVersion,
  UDMD,
  type Udmd,
} from "./servers.js";

// ---- workloads ----

export type WorkloadKey =
  | "seqread"
  | "seqwrite"
  | "randread"
  | "randwrite"
  | "firstwrite"
  | "rewrite"
  // issue 17's overlay workloads (bench/overlay.ts)
  | OverlayKey;

export interface MatrixWorkload {
  key: WorkloadKey;
  name: string;
  rw: FioJob["rw"];
  blockSize: number;
  iodepth: number;
  /** How the throughput is shown. */
  unit: "MiB/s" | "IOPS";
  /** One pass over the whole device (first write, rewrite) rather than a time-based run. */
  pass: boolean;
  /** One of the overlay workloads (bench/overlay.ts), run in its phases rather than with these. */
  overlay?: boolean;
  /** Bytes skipped after each I/O of a sequential pass (fio's rw=write:N): one I/O per stride. */
  skip?: number;
}

export const MATRIX_WORKLOADS: readonly MatrixWorkload[] = [
  { key: "seqread", name: "1 MiB sequential read", rw: "read", blockSize: MiB, iodepth: 4, unit: "MiB/s", pass: false },
  {
    key: "seqwrite",
    name: "1 MiB sequential write",
    rw: "write",
    blockSize: MiB,
    iodepth: 4,
    unit: "MiB/s",
    pass: false,
  },
  {
    key: "randread",
    name: "4 KiB random read",
    rw: "randread",
    blockSize: 4 * KiB,
    iodepth: 16,
    unit: "IOPS",
    pass: false,
  },
  {
    key: "randwrite",
    name: "4 KiB random write",
    rw: "randwrite",
    blockSize: 4 * KiB,
    iodepth: 16,
    unit: "IOPS",
    pass: false,
  },
  {
    key: "firstwrite",
    name: "first write",
    rw: "randwrite",
    blockSize: 4 * KiB,
    iodepth: 16,
    unit: "MiB/s",
    pass: true,
  },
  { key: "rewrite", name: "rewrite", rw: "randwrite", blockSize: 4 * KiB, iodepth: 16, unit: "MiB/s", pass: true },
];

const STANDARD: readonly WorkloadKey[] = ["seqread", "seqwrite", "randread", "randwrite"];
const workload = (key: WorkloadKey) => [...MATRIX_WORKLOADS, ...OVERLAY_WORKLOADS].find((w) => w.key === key)!;

// ---- configurations ----

/** What fio talks to right now, and the server process doing the work (null for the raw file). */
export interface Running {
  target: FioTarget;
  server: Server | null;
}

interface ConfigContext {
  dir: string;
  data: string;
  fileBytes: number;
  profileDir?: string;
  profileName: string;
  udmdArgs?: string[];
  /** The udmd.js to run (default: this checkout's dist/). */
  udmd?: string;
}

export interface ConfigInstance {
  running(): Running;
  /** A fresh snapshot / overlay for a first-write pass (a no-op where there is none). */
  fresh(): Promise<void>;
  close(): Promise<void>;
}

export interface MatrixConfig {
  id: string;
  label: string;
  /** Runs the first-write / rewrite passes, each repetition on a fresh snapshot / overlay. */
  passes: boolean;
  /** The configuration whose work per server core this one is set against. */
  perCoreRef?: string;
  /** Runs issue 8's workloads (default true; false: only the overlay ones). */
  matrixWorkloads?: boolean;
  /** Its part in the overlay rows (bench/overlay.ts): a peer, a udm overlay, or the udm linear reference. */
  overlay?: OverlayRole;
  open(ctx: ConfigContext): Promise<ConfigInstance>;
}

export type OverlayRole = "peer" | "udm" | "linear";

function fixed(r: Running, close: () => Promise<void> = async () => undefined): ConfigInstance {
  return { running: () => r, fresh: async () => undefined, close };
}

function raw(direct: boolean): (ctx: ConfigContext) => Promise<ConfigInstance> {
  return async (ctx) =>
    fixed({ target: { engine: direct ? "libaio" : "psync", file: ctx.data, direct }, server: null });
}

function nbdkitFile(extra: string[]): (ctx: ConfigContext) => Promise<ConfigInstance> {
  return async (ctx) => {
    const server = await startNbdkit(path.join(ctx.dir, "nbdkit.sock"), [...extra, "file", ctx.data]);
    return fixed({ target: { engine: "nbd", uri: server.uri() }, server }, server.stop);
  };
}

/** A server restarted for every fresh overlay (nbdkit's cow filter, qemu-nbd on a new qcow2). */
function restarting(start: (ctx: ConfigContext) => Promise<Server>): (ctx: ConfigContext) => Promise<ConfigInstance> {
  return async (ctx) => {
    let server: Server | null = null;
    const fresh = async () => {
      await server?.stop();
      server = null;
      server = await start(ctx);
    };
    await fresh();
    return {
      running: () => ({ target: { engine: "nbd", uri: server!.uri() }, server }),
      fresh,
      close: async () => server?.stop(),
    };
  };
}

function qcow2(clusterBytes: number) {
  return restarting(async (ctx) => {
    const overlay = path.join(ctx.dir, "overlay.qcow2");
    fs.rmSync(overlay, { force: true });
    execFileSync("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-b",
      ctx.data,
      "-F",
      "raw",
      "-o",
      `cluster_size=${clusterBytes}`,
      overlay,
    ]);
    return startQemuNbd(path.join(ctx.dir, "qemu.sock"), ["-f", "qcow2", overlay]);
  });
}

const SECTOR = 512;

async function udmd(ctx: ConfigContext): Promise<Udmd> {
  return startUdmd(path.join(ctx.dir, "udm-run"), {
    udmd: ctx.udmd,
    args: ctx.udmdArgs,
    profileDir: ctx.profileDir,
    profileName: ctx.profileName,
  });
}

function udmLinear(): (ctx: ConfigContext) => Promise<ConfigInstance> {
  return async (ctx) => {
    const d = await udmd(ctx);
    try {
      await d.control.request("create", {
        name: "vol",
        table: [{ start: 0, length: ctx.fileBytes / SECTOR, type: "linear", params: `${ctx.data} 0` }],
      });
    } catch (err) {
      await d.stop();
      throw err;
    }
    return fixed({ target: { engine: "nbd", uri: d.uri("vol") }, server: d }, d.stop);
  };
}

/**
 * snapshot-origin "base" over the data file with `count` persistent snapshots of `chunkSectors`,
 * taken the documented way (suspend, create, resume) on zeroed COW files; fresh() replaces them.
 */
function udmSnapshots(
  count: number,
  chunkSectors: number,
  store: "P" | "N" = "P",
): (ctx: ConfigContext) => Promise<ConfigInstance> {
  return async (ctx) => {
    const d = await udmd(ctx);
    const sectors = ctx.fileBytes / SECTOR;
    const chunkBytes = chunkSectors * SECTOR;
    const cows = Array.from({ length: count }, (_, i) => path.join(ctx.dir, `cow${i}.img`));
    let live = 0;
    const fresh = async () => {
      for (let i = 0; i < live; i++) await d.control.request("remove", { name: `snap${i}` });
      live = 0;
      for (const cow of cows) {
        fs.rmSync(cow, { force: true });
        fs.writeFileSync(cow, "");
        fs.truncateSync(cow, cowBytesFor(ctx.fileBytes / chunkBytes, chunkBytes));
      }
      await d.control.request("suspend", { name: "base" });
      try {
        for (const [i, cow] of cows.entries()) {
          await d.control.request("create", {
            name: `snap${i}`,
            table: [
              { start: 0, length: sectors, type: "snapshot", params: `${ctx.data} ${cow} ${store} ${chunkSectors}` },
            ],
          });
          live++;
        }
      } finally {
        await d.control.request("resume", { name: "base" });
      }
    };
    try {
      await d.control.request("create", {
        name: "base",
        table: [{ start: 0, length: sectors, type: "snapshot-origin", params: ctx.data }],
      });
      await fresh();
    } catch (err) {
      await d.stop();
      throw err;
    }
    return {
      running: () => ({ target: { engine: "nbd", uri: d.uri("base") }, server: d }),
      fresh,
      close: async () => {
        await d.stop();
        for (const cow of cows) fs.rmSync(cow, { force: true });
      },
    };
  };
}

export const MATRIX_CONFIGS: readonly MatrixConfig[] = [
  { id: "raw-buffered", label: "raw file, buffered (psync)", passes: false, open: raw(false) },
  { id: "raw-direct", label: "raw file, O_DIRECT (libaio)", passes: false, open: raw(true) },
  { id: "nbdkit-file", label: "nbdkit file", passes: false, open: nbdkitFile([]) },
  {
    id: "nbdkit-file-t4",
    label: "nbdkit file --threads 4",
    passes: false,
    perCoreRef: "nbdkit-file",
    open: nbdkitFile(["--threads", "4"]),
  },
  {
    id: "qemu-raw",
    label: "qemu-nbd raw",
    passes: false,
    perCoreRef: "nbdkit-file",
    open: restarting((ctx) => startQemuNbd(path.join(ctx.dir, "qemu.sock"), ["-f", "raw", ctx.data])),
  },
  {
    id: "nbdkit-cow",
    label: "nbdkit cow filter (64 KiB blocks)",
    passes: true,
    overlay: "peer",
    // The overlay is a temporary file: put it next to the data file (TMPDIR), not on tmpfs.
    open: restarting((ctx) =>
      startNbdkit(path.join(ctx.dir, "nbdkit.sock"), ["--filter=cow", "file", ctx.data], { TMPDIR: ctx.dir }),
    ),
  },
  {
    id: "qcow2-4k",
    label: "qemu-nbd qcow2 overlay, 4 KiB clusters",
    passes: true,
    overlay: "peer",
    perCoreRef: "nbdkit-cow",
    open: qcow2(4 * KiB),
  },
  {
    id: "qcow2-64k",
    label: "qemu-nbd qcow2 overlay, 64 KiB clusters",
    passes: true,
    overlay: "peer",
    perCoreRef: "nbdkit-cow",
    open: qcow2(64 * KiB),
  },
  {
    id: "udm-linear",
    label: "udm linear",
    passes: true,
    perCoreRef: "nbdkit-file",
    overlay: "linear",
    open: udmLinear(),
  },
  {
    id: "udm-snap-4k",
    label: "udm snapshot-origin, 1 snapshot, chunk 8 (4 KiB)",
    passes: true,
    perCoreRef: "nbdkit-cow",
    open: udmSnapshots(1, 8),
  },
  {
    id: "udm-snap-64k",
    label: "udm snapshot-origin, 1 snapshot, chunk 128 (64 KiB)",
    passes: true,
    perCoreRef: "nbdkit-cow",
    open: udmSnapshots(1, 128),
  },
  {
    id: "udm-snap3-4k",
    label: "udm snapshot-origin, 3 snapshots, chunk 8 (4 KiB)",
    passes: true,
    perCoreRef: "nbdkit-cow",
    open: udmSnapshots(3, 8),
  },
  // Not one of issue 8's configurations: what the persistent store's durability costs. A transient
  // (N) store keeps its exceptions in memory only, like nbdkit's cow overlay (a temporary file).
  {
    id: "udm-snap-4k-transient",
    label: "udm snapshot-origin, 1 transient (N) snapshot, chunk 8 (4 KiB)",
    passes: true,
    perCoreRef: "nbdkit-cow",
    open: udmSnapshots(1, 8, "N"),
  },
  // Writable overlays of a base image (issue 17): a snapshot without a snapshot-origin (bench/overlay.ts).
  ...OVERLAY_CONFIGS,
  // Remote devices (issue 20): tables over an NBD export, against fio straight to it (bench/remote.ts).
  ...REMOTE_CONFIGS,
];

// ---- results ----

export interface MatrixRep extends FioResult {
  /** Server CPU seconds (user + system) during the job; null without a server. */
  serverCpu: number | null;
}

export interface Figure {
  /** Medians over the repetitions. */
  mibps: number;
  iops: number;
  /** Server CPU seconds per GiB moved. */
  cpuPerGiB: number | null;
  /** MiB/s (or IOPS, for the random workloads) per 100% of one server core. */
  perCore: number | null;
  /** fio's own CPU, percent of one core. */
  clientCpu: number;
  reps: MatrixRep[];
}

export interface ConfigResult {
  id: string;
  label: string;
  perCoreRef?: string;
  overlay?: OverlayRole;
  figures: Partial<Record<WorkloadKey, Figure>>;
  /** Lowest and highest 1-minute load average at the start and end of this configuration's rounds. */
  load: [number, number];
  seconds: number;
}

export interface TargetRow {
  target: string;
  /**
   * The ratio (of medians), and the lowest and highest ratio of one round (repetition n of both
   * configurations, which ran within minutes of each other).
   */
  ratio: number;
  low: number;
  high: number;
  goal: string;
  pass: boolean;
}

export interface MatrixOptions {
  fileBytes: number;
  /** Duration of one time-based repetition. */
  runtimeMs: number;
  /** Untimed run before the repetitions of each workload (0: none). */
  warmupMs: number;
  repetitions: number;
  /** Directory for the data file, overlays and sockets (default: pickDataDir). */
  dir?: string;
  /** Configuration ids to run (default all): exact ids or substrings of ids. */
  configs?: string[];
  /** Workload filter: substring of the workload name (e.g. "random read", "first write"). */
  only?: string;
  /** Start udmd with node --cpu-prof, writing its profiles here. */
  profileDir?: string;
  /** Extra udmd arguments: tuning flags for an A/B run (--no-inline-reads, --no-write-plug, --no-zero-copy). */
  udmdArgs?: string[];
  /** Another udm checkout whose dist/ udmd runs instead of this one's (a before/after run). */
  udmDir?: string;
  /**
   * Configurations run at the same time (default 1). Only for smoke runs: concurrent
   * configurations compete for the machine, so their figures are not comparable.
   */
  concurrency?: number;
  log?: (message: string) => void;
}

export const FULL_MATRIX: MatrixOptions = { fileBytes: GiB, runtimeMs: 2000, warmupMs: 1000, repetitions: 3 };
/** The smoke run: every configuration and workload, tiny, several configurations at a time (fio spends ~0.5 s starting and stopping). */
export const QUICK_MATRIX: MatrixOptions = {
  fileBytes: 8 * MiB,
  runtimeMs: 100,
  warmupMs: 0,
  repetitions: 3,
  concurrency: 6,
};

export interface MatrixResult {
  date: string;
  dataDir: string;
  filesystem: Filesystem;
  options: Omit<MatrixOptions, "log">;
  machine: { cpus: number; cpuModel: string; memoryBytes: number; kernel: string };
  versions: { node: string; fio: string; nbdkit: string; qemu: string };
  load: [number, number];
  /** The libuv settings udmd inherited from this process's environment. */
  udmdEnv: string;
  configs: ConfigResult[];
  targets: TargetRow[];
  seconds: number;
}

// ---- availability and build ----

const DEBIAN: Record<string, string> = {
  fio: "fio",
  nbdkit: "nbdkit",
  "qemu-nbd": "qemu-utils",
  "qemu-img": "qemu-utils",
};

function runs(cmd: string, args: string[]): boolean {
  const r = spawnSync(cmd, args, { stdio: "ignore", timeout: 10_000 });
  return r.status === 0;
}

/** Why the matrix cannot run here (missing tools or build), or null. */
export function matrixUnavailableReason(): string | null {
  if (process.platform !== "linux") return `needs Linux (/proc/PID/stat), this is ${process.platform}`;
  const missing: string[] = [];
  if (!runs("fio", ["--version"])) missing.push("fio");
  if (!runs("nbdkit", ["--version"])) missing.push("nbdkit");
  for (const t of ["qemu-nbd", "qemu-img"]) if (!runs(t, ["--version"])) missing.push(t);
  if (missing.length)
    return `${missing.join(", ")} not installed (Debian: apt-get install ${[...new Set(missing.map((t) => DEBIAN[t]))].join(" ")})`;
  if (!runs("fio", ["--enghelp=nbd"])) return "this fio has no nbd ioengine (Debian's fio has it)";
  if (!runs("fio", ["--enghelp=libaio"])) return "this fio has no libaio ioengine";
  if (!runs("nbdkit", ["--filter=cow", "file", "--version"]))
    return "nbdkit's file plugin or cow filter is missing (Debian: nbdkit)";
  if (!fs.existsSync(UDMD)) return `${path.relative(process.cwd(), UDMD)} is missing (npx tsc -p tsconfig.build.json)`;
  return null;
}

function newestSource(dir: string): number {
  let newest = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile() && e.name.endsWith(".ts"))
      newest = Math.max(newest, fs.statSync(path.join(e.parentPath, e.name)).mtimeMs);
  }
  return newest;
}

/** The udmd.js of the checkout at `root`. */
export const udmdOf = (root: string) => path.join(root, path.relative(ROOT, UDMD));

/**
 * Build `root`'s dist/ (tsc -p tsconfig.build.json) when its udmd.js is missing or older than its
 * sources (default root: this checkout).
 */
export function ensureBuilt(log: (m: string) => void, root = ROOT): void {
  const udmd = udmdOf(root);
  const built = fs.existsSync(udmd) ? fs.statSync(udmd).mtimeMs : 0;
  const sources = Math.max(
    fs.statSync(path.join(root, "index.ts")).mtimeMs,
    ...["core", "targets", "dmsetup"].map((d) => newestSource(path.join(root, d))),
  );
  if (built >= sources) return;
  const dist = root === ROOT ? "dist/" : `${path.join(root, "dist")}/`;
  log(
    built
      ? `${dist} is older than the sources: building (tsc -p tsconfig.build.json)`
      : `building ${dist} (tsc -p tsconfig.build.json)`,
  );
  const tsc = path.join(root, "node_modules/typescript/bin/tsc");
  const r = spawnSync(process.execPath, [tsc, "-p", "tsconfig.build.json"], { cwd: root, encoding: "utf8" });
  if (r.status !== 0) {
    if (!built) throw new Error(`build failed:\n${r.stdout}${r.stderr}`);
    log(`build failed, benchmarking the existing dist/:\n${r.stdout}${r.stderr}`);
  }
}

// ---- the run ----

function summarise(w: MatrixWorkload, reps: MatrixRep[]): Figure {
  const cpu = reps.filter((r) => r.serverCpu !== null);
  const perCore = cpu
    .filter((r) => r.serverCpu! > 0)
    .map((r) => (w.unit === "IOPS" ? r.ios : r.bytes / MiB) / r.serverCpu!);
  return {
    mibps: median(reps.map((r) => r.mibps)),
    iops: median(reps.map((r) => r.iops)),
    cpuPerGiB: cpu.length ? median(cpu.map((r) => r.serverCpu! / (r.bytes / GiB))) : null,
    perCore: perCore.length ? median(perCore) : null,
    clientCpu: median(reps.map((r) => r.clientCpu)),
    reps,
  };
}

/** --configs overlays, --only overlays: issue 17's overlay rows (bench/overlay.ts). */
const OVERLAYS = "overlays";

function selected(opts: MatrixOptions): { configs: MatrixConfig[]; workloads: MatrixWorkload[] } {
  // Each wanted name picks the configuration with that id, or else every id containing it;
  // "overlays" picks every configuration of the overlay rows.
  const picks = (want: string) =>
    want === OVERLAYS
      ? (c: MatrixConfig) => c.overlay !== undefined
      : MATRIX_CONFIGS.some((c) => c.id === want)
        ? (c: MatrixConfig) => c.id === want
        : (c: MatrixConfig) => c.id.includes(want);
  const configs = opts.configs?.length
    ? MATRIX_CONFIGS.filter((c) => opts.configs!.some((want) => picks(want)(c)))
    : [...MATRIX_CONFIGS];
  if (configs.length === 0)
    throw new Error(
      `no configuration matches ${opts.configs!.join(", ")} (${MATRIX_CONFIGS.map((c) => c.id).join(", ")})`,
    );
  const only = opts.only?.toLowerCase();
  const all = [...MATRIX_WORKLOADS, ...OVERLAY_WORKLOADS];
  const workloads = only
    ? all.filter((w) => w.name.toLowerCase().includes(only) || w.key === only || (only === OVERLAYS && w.overlay))
    : all;
  if (workloads.length === 0)
    throw new Error(`no workload matches ${opts.only} (${all.map((w) => w.name).join(", ")}, ${OVERLAYS})`);
  return { configs, workloads };
}

/**
 * One round of one configuration (one repetition of every workload), in its own directory `dir`,
 * on a data file written for it.
 */
async function runConfig(
  config: MatrixConfig,
  workloads: MatrixWorkload[],
  dir: string,
  opts: MatrixOptions,
  round: number,
): Promise<ConfigResult> {
  const log = opts.log ?? (() => undefined);
  const { fileBytes } = opts;
  const of = `round ${round + 1}/${opts.repetitions}`;
  const t0 = performance.now();
  const load0 = os.loadavg()[0]!;
  const data = path.join(dir, "data.bin");
  const scratch = path.join(dir, "fio.json");
  log(`matrix: ${config.label}: writing ${bytesText(fileBytes)} of random bytes`);
  fillFile(data, fileBytes);
  const figures: ConfigResult["figures"] = {};
  const inst = await config.open({
    dir,
    data,
    fileBytes,
    profileDir: opts.profileDir,
    profileName: `udmd-${config.id}-${Date.now()}.cpuprofile`,
    udmdArgs: opts.udmdArgs,
    udmd: opts.udmDir ? udmdOf(path.resolve(opts.udmDir)) : undefined,
  });
  try {
    const measure = async (w: MatrixWorkload, runtimeMs: number | undefined, label = w.name): Promise<MatrixRep> => {
      const { target, server } = inst.running();
      const cpu0 = server ? cpuSeconds(server.pid) : 0;
      let r: FioResult;
      try {
        r = await runFio(
          target,
          {
            name: w.key,
            rw: w.rw,
            blockSize: w.blockSize,
            iodepth: w.iodepth,
            runtimeMs,
            skip: w.skip,
            // A pass with holes ends at the end of the device, not after `size` bytes (fio wraps around).
            numberIos: w.skip && runtimeMs === undefined ? Math.ceil(fileBytes / (w.blockSize + w.skip)) : undefined,
          },
          scratch,
        );
      } catch (err) {
        throw new Error(
          `${config.label}, ${label}: ${(err as Error).message}${server ? `\n${server.name} stderr: ${server.stderr().slice(-4000)}` : ""}`,
        );
      }
      const serverCpu = server ? cpuSeconds(server.pid) - cpu0 : null;
      if (w.rw.endsWith("write")) {
        // Untimed: every repetition starts without dirty pages from the previous one.
        syncFile(data);
        if (server) syncOpenFiles(server.pid);
      }
      return { ...r, serverCpu };
    };
    const matrixSet = config.matrixWorkloads === false ? [] : workloads.filter((w) => !w.overlay);
    const pass = matrixSet.filter((w) => w.pass);
    if (config.passes && pass.length) {
      if (opts.warmupMs > 0) {
        await inst.fresh();
        await measure(workload("randwrite"), opts.warmupMs, "warm-up");
      }
      await inst.fresh();
      // A rewrite-only selection still needs the first pass (it makes the copies).
      const first = await measure(workload("firstwrite"), undefined);
      const again = await measure(workload("rewrite"), undefined);
      log(`matrix: ${config.label}: first write ${fmt(first.mibps)} MiB/s, rewrite ${fmt(again.mibps)} MiB/s (${of})`);
      for (const w of pass) figures[w.key] = summarise(w, [w.key === "firstwrite" ? first : again]);
    }
    const report = (w: MatrixWorkload, r: MatrixRep) => {
      const f = (figures[w.key] = summarise(w, [r]));
      log(
        `matrix: ${config.label}: ${w.name}: ${w.unit === "IOPS" ? fmt(r.iops, 0) : fmt(r.mibps)} ${w.unit}${f.cpuPerGiB !== null ? `, server CPU ${fmt(f.cpuPerGiB, 2)} s/GiB` : ""} (${of})`,
      );
    };
    for (const w of matrixSet.filter((x) => !x.pass)) {
      if (opts.warmupMs > 0) await measure(w, opts.warmupMs, `${w.name} warm-up`);
      report(w, await measure(w, opts.runtimeMs));
    }
    const overlaySet = config.overlay ? workloads.filter((w) => w.overlay) : [];
    if (overlaySet.length) {
      const reps = await runOverlayPhases(
        { fresh: () => inst.fresh(), measure, warmupMs: opts.warmupMs, runtimeMs: opts.runtimeMs },
        overlaySet,
      );
      for (const w of overlaySet) report(w, reps.get(w.key as OverlayKey)!);
    }
  } finally {
    await inst.close();
  }
  return {
    id: config.id,
    label: config.label,
    perCoreRef: config.perCoreRef,
    overlay: config.overlay,
    figures,
    load: [load0, os.loadavg()[0]!],
    seconds: (performance.now() - t0) / 1000,
  };
}

/** The rounds of one configuration as one result: every figure over all their repetitions. */
function mergeRounds(rounds: ConfigResult[]): ConfigResult {
  const first = rounds[0]!;
  const figures: ConfigResult["figures"] = {};
  for (const key of Object.keys(first.figures) as WorkloadKey[]) {
    figures[key] = summarise(
      workload(key),
      rounds.flatMap((r) => r.figures[key]?.reps ?? []),
    );
  }
  const loads = rounds.flatMap((r) => r.load);
  return {
    ...first,
    figures,
    load: [Math.min(...loads), Math.max(...loads)],
    seconds: rounds.reduce((t, r) => t + r.seconds, 0),
  };
}

export async function runMatrix(opts: MatrixOptions): Promise<MatrixResult> {
  const { fileBytes, repetitions } = opts;
  if (fileBytes < MiB || fileBytes % MiB !== 0) throw new Error("the data file size must be a whole number of MiB");
  if (!Number.isInteger(repetitions) || repetitions < 3) throw new Error("repetitions must be an integer >= 3");
  const concurrency = opts.concurrency ?? 1;
  const { configs, workloads } = selected(opts);
  // Room for the data file, three COW files as big as it, and an overlay (per configuration running).
  const dataDir = opts.dir ?? pickDataDir(fileBytes * 5 * concurrency);
  const dir = fs.mkdtempSync(path.join(dataDir, "udm-matrix-"));
  if (opts.profileDir) fs.mkdirSync(opts.profileDir, { recursive: true });
  const started = performance.now();
  const loadBefore = os.loadavg()[0]!;
  // Repetitions run in rounds: every configuration once per round, so that a burst of other work
  // on the shared machine (minutes long) lands in one round of several configurations rather than
  // in every repetition of one, and round n of two configurations can be compared directly.
  const rounds: ConfigResult[][] = configs.map(() => []);
  try {
    for (let round = 0; round < repetitions; round++) {
      let next = 0;
      const worker = async () => {
        while (next < configs.length) {
          const i = next++;
          const sub = path.join(dir, `${configs[i]!.id}-${round}`);
          fs.mkdirSync(sub);
          try {
            rounds[i]!.push(await runConfig(configs[i]!, workloads, sub, opts, round));
          } finally {
            fs.rmSync(sub, { recursive: true, force: true });
          }
        }
      };
      const settled = await Promise.allSettled(Array.from({ length: Math.min(concurrency, configs.length) }, worker));
      for (const s of settled) if (s.status === "rejected") throw s.reason;
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const results = rounds.map(mergeRounds);
  const cpus = os.cpus();
  const { log: _log, ...options } = opts;
  return {
    date: new Date().toISOString(),
    dataDir,
    filesystem: filesystemOf(dataDir),
    options,
    machine: {
      cpus: cpus.length,
      cpuModel: cpus[0]?.model.trim() ?? "unknown CPU",
      memoryBytes: os.totalmem(),
      kernel: `${os.type()} ${os.release()}`,
    },
    versions: {
      node: process.version,
      fio: toolVersion("fio"),
      nbdkit: toolVersion("nbdkit"),
      qemu: toolVersion("qemu-nbd").replace(/^qemu-nbd /, ""),
    },
    load: [loadBefore, os.loadavg()[0]!],
    udmdEnv: `${opts.udmDir ? `udm checkout ${path.resolve(opts.udmDir)}, ` : ""}UV_THREADPOOL_SIZE=${process.env.UV_THREADPOOL_SIZE ?? "4 (default)"}${process.env.UV_USE_IO_URING ? `, UV_USE_IO_URING=${process.env.UV_USE_IO_URING}` : ""}${opts.udmdArgs?.length ? `, udmd ${opts.udmdArgs.join(" ")}` : ""}`,
    configs: results,
    targets: matrixTargets(results),
    seconds: (performance.now() - started) / 1000,
  };
}

// ---- targets ----

export const MATRIX_GOALS = {
  /** udm linear / the better nbdkit file configuration, every standard workload. */
  linearVsNbdkit: 1.2,
  /** udm linear / raw O_DIRECT, every standard workload. */
  linearVsDirect: 1.0,
  /** udm snapshot (chunk 8) first write / nbdkit cow filter. */
  firstWriteVsNbdkitCow: 2.0,
  /** udm snapshot (chunk 8) first write / qemu-nbd qcow2 with 4 KiB clusters. */
  firstWriteVsQcow2: 1.5,
  /** udm snapshot rewrite / udm linear rewrite. */
  rewriteVsLinear: 0.9,
  /** first-write time, three snapshots / one. */
  threeVsOne: 1.7,
};

function value(f: Figure | undefined, w: MatrixWorkload): number | undefined {
  return f ? (w.unit === "IOPS" ? f.iops : f.mibps) : undefined;
}

function repValues(f: Figure, w: MatrixWorkload): number[] {
  return f.reps.map((r) => (w.unit === "IOPS" ? r.iops : r.mibps));
}

export function matrixTargets(results: ConfigResult[]): TargetRow[] {
  const by = (id: string) => results.find((r) => r.id === id);
  const rows: TargetRow[] = [];
  const g = MATRIX_GOALS;
  /** a / b ≥ goal (or, with atMost, ≤ goal), on figures of workload key. */
  const compare = (
    target: string,
    a: Figure | undefined,
    b: Figure | undefined,
    w: MatrixWorkload,
    goal: number,
    atMost = false,
  ) => {
    if (!a || !b) return;
    const ratio = value(a, w)! / value(b, w)!;
    const av = repValues(a, w);
    const bv = repValues(b, w);
    const perRound = av.map((x, i) => x / bv[i]!).filter((x) => Number.isFinite(x));
    const low = Math.min(...perRound);
    const high = Math.max(...perRound);
    rows.push({
      target,
      ratio,
      low,
      high,
      goal: `${atMost ? "<=" : ">="} ${goal}×`,
      pass: atMost ? ratio <= goal : ratio >= goal,
    });
  };
  const linear = by("udm-linear");
  for (const key of STANDARD) {
    const w = workload(key);
    const candidates = [by("nbdkit-file"), by("nbdkit-file-t4")].filter((c) => c?.figures[key]);
    const best = candidates.sort((x, y) => value(y!.figures[key], w)! - value(x!.figures[key], w)!)[0];
    if (best)
      compare(
        `udm linear / ${best.label} (the better nbdkit file), ${w.name}`,
        linear?.figures[key],
        best.figures[key],
        w,
        g.linearVsNbdkit,
      );
  }
  for (const key of STANDARD) {
    const w = workload(key);
    compare(
      `udm linear / raw O_DIRECT, ${w.name}`,
      linear?.figures[key],
      by("raw-direct")?.figures[key],
      w,
      g.linearVsDirect,
    );
  }
  const fw = workload("firstwrite");
  const snap = by("udm-snap-4k");
  compare(
    "udm 1 snapshot (chunk 8) / nbdkit cow filter, first write",
    snap?.figures.firstwrite,
    by("nbdkit-cow")?.figures.firstwrite,
    fw,
    g.firstWriteVsNbdkitCow,
  );
  compare(
    "udm 1 snapshot (chunk 8) / qemu-nbd qcow2 4 KiB clusters, first write",
    snap?.figures.firstwrite,
    by("qcow2-4k")?.figures.firstwrite,
    fw,
    g.firstWriteVsQcow2,
  );
  for (const id of ["udm-snap-4k", "udm-snap-64k", "udm-snap3-4k"]) {
    const c = by(id);
    if (c)
      compare(
        `${c.label.replace("udm snapshot-origin, ", "udm ")} / udm linear, rewrite`,
        c.figures.rewrite,
        linear?.figures.rewrite,
        workload("rewrite"),
        g.rewriteVsLinear,
      );
  }
  remoteTargets(by, STANDARD.map(workload), compare);
  // Time of the first-write pass, three snapshots / one: the inverse of the MiB/s ratio.
  compare(
    "first-write time, udm 3 snapshots / 1 snapshot (chunk 8)",
    snap?.figures.firstwrite,
    by("udm-snap3-4k")?.figures.firstwrite,
    fw,
    g.threeVsOne,
    true,
  );
  overlayTargets(by, compare);
  return rows;
}

// ---- report ----

const dash = "—";

function cell(f: Figure | undefined, w: MatrixWorkload): string {
  if (!f) return dash;
  return w.unit === "IOPS" ? fmt(f.iops, 0) : fmt(f.mibps);
}

/** The configurations that ran issue 8's workloads (the overlay-only ones have their own table). */
const matrixRows = (r: MatrixResult) => r.configs.filter((c) => MATRIX_WORKLOADS.some((w) => c.figures[w.key]));

export function matrixThroughputTable(r: MatrixResult): string {
  const ws = MATRIX_WORKLOADS;
  const header = ["Configuration", ...ws.map((w) => `${w.name} ${w.unit}`), "load avg"];
  const rows = matrixRows(r).map((c) => [
    c.label,
    ...ws.map((w) => cell(c.figures[w.key], w)),
    `${fmt(c.load[0], 1)}–${fmt(c.load[1], 1)}`,
  ]);
  return markdownTable(header, rows, new Set(ws.map((_, i) => i + 1)));
}

export function matrixCpuTable(r: MatrixResult): string {
  const ws = MATRIX_WORKLOADS;
  const servers = matrixRows(r).filter((c) => ws.some((w) => (c.figures[w.key]?.cpuPerGiB ?? null) !== null));
  const header = ["Server CPU s per GiB moved", ...ws.map((w) => w.name)];
  const rows = servers.map((c) => [
    c.label,
    ...ws.map((w) => {
      const f = c.figures[w.key];
      return f?.cpuPerGiB != null ? fmt(f.cpuPerGiB, 2) : dash;
    }),
  ]);
  return markdownTable(header, rows, new Set(ws.map((_, i) => i + 1)));
}

export function matrixPerCoreTable(r: MatrixResult): string {
  const ws = MATRIX_WORKLOADS;
  const by = (id: string) => r.configs.find((c) => c.id === id);
  const servers = matrixRows(r).filter((c) => ws.some((w) => c.figures[w.key]?.perCore != null));
  const header = ["Work per server core (× its nbdkit)", ...ws.map((w) => `${w.name} ${w.unit}/core`)];
  const rows = servers.map((c) => [
    c.perCoreRef && by(c.perCoreRef) ? `${c.label} (vs ${by(c.perCoreRef)!.label})` : c.label,
    ...ws.map((w) => {
      const f = c.figures[w.key];
      if (f?.perCore == null) return dash;
      const ref = c.perCoreRef ? by(c.perCoreRef)?.figures[w.key]?.perCore : null;
      const text = fmt(f.perCore, 0);
      return ref ? `${text} (${(f.perCore / ref).toFixed(2)}×)` : text;
    }),
  ]);
  return markdownTable(header, rows, new Set(ws.map((_, i) => i + 1)));
}

export function matrixTargetTable(r: MatrixResult): string {
  const rows = r.targets.map((t) => [
    t.target,
    `${t.ratio.toFixed(2)}× (${t.low.toFixed(2)}–${t.high.toFixed(2)})`,
    t.goal,
    t.pass ? "PASS" : "MISS",
  ]);
  return markdownTable(["Target (ratio of medians, this run)", "ratio (rep range)", "goal", "result"], rows, new Set());
}

export function describeMatrixRun(r: MatrixResult, quick: boolean): string[] {
  const o = r.options;
  const m = r.machine;
  const fsys = r.filesystem;
  const loads = r.configs.flatMap((c) => c.load);
  return [
    `udm benchmark matrix (${quick ? "quick" : "full"} run, ${fmt(r.seconds / 60, 1)} min): every configuration on this machine in one run; each figure the median of ${o.repetitions} repetitions, run in ${o.repetitions} rounds (every configuration once per round, in table order); ratios only between figures of this run, their range ("rep range") the lowest and highest ratio within one round; "load avg": lowest and highest 1-minute load average at the start and end of the configuration's rounds${(o.concurrency ?? 1) > 1 ? `; ${o.concurrency} configurations at a time (a smoke run: the figures are not comparable)` : ", one configuration at a time"}`,
    `machine: ${m.cpus} × ${m.cpuModel}, ${fmt(m.memoryBytes / GiB)} GiB RAM, ${m.kernel}; Node ${r.versions.node}; ${r.versions.fio}; ${r.versions.nbdkit}; qemu-nbd ${r.versions.qemu}`,
    `1-minute load average: ${fmt(r.load[0], 2)} at the start, ${fmt(r.load[1], 2)} at the end, ${fmt(Math.min(...loads), 2)}–${fmt(Math.max(...loads), 2)} across configurations${Math.max(...loads) > 0.5 * m.cpus ? ` (a shared, busy machine: fio, the server and other work compete for ${m.cpus} cores; figures are noisy)` : ""}`,
    `data file: ${bytesText(o.fileBytes)} of random bytes in ${r.dataDir}, on ${fsys.type} (${fsys.source}, mounted at ${fsys.mountPoint}), recreated before each configuration; after every write job the data file and every file the server has open are fdatasynced (untimed)`,
    `client: fio, one job; NBD servers through fio's nbd ioengine (libnbd) on a unix socket, the same job options for every server; raw baselines: fio psync (buffered; synchronous, so one request at a time) and libaio with O_DIRECT`,
    `workloads: 1 MiB sequential read / write at QD 4 and 4 KiB random read / write at QD 16, time-based, ${o.runtimeMs / 1000} s per repetition${o.warmupMs ? ` after a ${o.warmupMs / 1000} s untimed warm-up` : ""}; first write: one pass of 4 KiB random writes at QD 16 over every 4 KiB block of the device in a random order (fio's random map), on a fresh snapshot / overlay each repetition (with 64 KiB chunks / clusters / blocks one write in 16 copies a chunk); rewrite: the same pass again; the COW configurations run the other workloads after these passes (every chunk copied)`,
    `servers: nbdkit file plugin (default: 16 threads; and --threads 4); nbdkit --filter=cow file (its default 64 KiB blocks, overlay in the data directory); qemu-nbd --persistent with its default cache (writeback) and aio (threads), on the raw file or on a qcow2 overlay (qemu-img create -f qcow2 -b data -F raw -o cluster_size=4096|65536, recreated each repetition); udmd from dist/ (node ${r.versions.node}, ${r.udmdEnv}), tables "linear" and "snapshot-origin" + persistent snapshots ("snapshot ... P 8|128", zeroed COW files, taken with suspend / create / resume; one transient "N 8" row for reference)`,
    `server CPU: utime + stime of the server process (all threads) from /proc/PID/stat before and after each job; work per core: MiB (or I/Os) moved per CPU second of the server, i.e. MiB/s (IOPS) per 100% of one core, set against nbdkit file (default threads) or, for the COW configurations, nbdkit's cow filter`,
    ...(r.configs.some((c) => OVERLAY_WORKLOADS.some((w) => c.figures[w.key])) ? [OVERLAY_DESCRIPTION] : []),
    `in-process figures of the same engines (no NBD, no fio): sections "Buffered I/O", "O_DIRECT" and "Snapshots" of bench/results.md (bench/micro.ts, bench/snapshot.ts)`,
  ];
}

export function matrixReport(r: MatrixResult): string {
  const overlay = overlayTable(r);
  const overlayCpu = overlayCpuTable(r);
  const issue8 = matrixRows(r).length
    ? ["Throughput:", "", matrixThroughputTable(r), "", matrixCpuTable(r), "", matrixPerCoreTable(r), ""]
    : [];
  return [
    ...issue8,
    ...(overlay ? ["Writable overlays (issue 17):", "", overlay, "", overlayCpu!, ""] : []),
    matrixTargetTable(r),
  ].join("\n");
}

export function matrixVerdict(r: MatrixResult): string {
  const misses = r.targets.filter((t) => !t.pass);
  return misses.length === 0
    ? `matrix targets met (${r.targets.length})`
    : `matrix targets missed (${misses.length} of ${r.targets.length}): ${misses.map((t) => t.target).join("; ")}`;
}

/** Replace the Matrix section of results.md (other sections are kept). */
export function recordMatrixResults(
  file: string,
  r: MatrixResult,
  description: string[],
  report: string,
  command: string,
): void {
  const body = [
    "## Matrix (udm over NBD vs nbdkit, qemu-nbd and the raw file)",
    "",
    `Run on ${r.date} by \`${command}\`.`,
    "",
    ...description.map((d) => `- ${d}`),
    "",
    report,
    "",
    matrixVerdict(r),
  ].join("\n");
  replaceSection(file, "matrix", body, "# udm benchmark results\n\n");
}
