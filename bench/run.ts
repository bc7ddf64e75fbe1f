/**
 * `npm run bench [-- options]`: the micro-benchmark (bench/micro.ts) as a table on stdout.
 * `npm run bench -- --attach` (root) measures the attached kernel device instead (bench/attach.ts);
 * --size, --seconds and --dir apply to it.
 *
 *   --quick        CI smoke run: 8 MiB file, 0.2 s repetitions, then the quick snapshot
 *                  benchmarks and a tiny matrix (under a minute in all; the matrix alone ~25 s)
 *   --direct       O_DIRECT on both sides (default: buffered I/O)
 *   --json         print the results as JSON on stdout (the table then goes to stderr)
 *   --size N       data file size, e.g. 64M, 1G (default 256M)
 *   --seconds S    duration of one repetition (default 1.5)
 *   --reps N       repetitions per side (default 5 on a full run, 3 on a quick one; at least 3)
 *   --only TEXT    run only the workloads whose name contains TEXT (e.g. "random write")
 *   --dir D        directory for the data file (default: os.tmpdir() unless it is tmpfs)
 *   --in-process   run both engines in this process (default: one child process per engine)
 *   --loader L     how engine processes load udm's TypeScript: tsc (default: tsc's emit, what
 *                  `npm run build` ships) or tsx (esbuild with keepNames, as `npm test` runs it)
 *   --no-snapshot  skip the snapshot benchmarks (bench/snapshot.ts), which otherwise run after the
 *                  micro-benchmark (not with --only); a full run records them in results.md too
 *   --thin         run only the thin benchmarks (bench/thin.ts, ~1 minute); a full run also runs them
 *                  after the snapshot benchmarks (--no-thin skips them) and records them in results.md
 *   --thin-overlay thin as a writable overlay of an external origin against qcow2 and nbdkit's cow
 *                  filter over NBD with fio (bench/thin-overlay.ts, ~3 minutes; recorded)
 *   --matrix       run only the benchmark matrix (bench/matrix.ts: udm over NBD against nbdkit,
 *                  qemu-nbd and the raw file, driven by fio; ~30 minutes in full). --quick runs
 *                  a tiny matrix after the micro and snapshot benchmarks (--no-matrix skips it);
 *                  with --matrix, --size / --seconds / --reps / --dir / --only apply to the matrix
 *   --configs LIST matrix configurations to run (comma-separated ids or parts of ids, e.g.
 *                  udm-linear,nbdkit-file; default all); "overlays" names issue 17's overlay
 *                  rows (nbdkit-cow, qcow2-4k, qcow2-64k, udm-linear, udm-overlay-4k and -64k:
 *                  bench/overlay.ts), and --only overlays runs only their workloads
 *   --udm-dir DIR  matrix: run the udmd of another udm checkout (DIR/dist/, built when older than
 *                  DIR's sources), e.g. a git worktree of an older commit for a before/after run;
 *                  such runs are never recorded
 *   --profile DIR  matrix: start udmd under node --cpu-prof, profiles in DIR (bench/profile-top.ts)
 *   --no-build     matrix: do not rebuild dist/ when it is older than the sources
 *   --no-inline-reads, --no-write-plug, --no-zero-copy
 *                  A/B measurements: udm with one optimisation off (udmd's flags of the same
 *                  names in the matrix, the library's io options in process; zero-copy only
 *                  concerns the NBD server, so the matrix). Such runs are never recorded.
 *
 * Profile with `node --import tsx --cpu-prof --cpu-prof-dir=DIR bench/run.ts --only ...`: each
 * engine process writes its own DIR/bench-<engine>-*.cpuprofile (summarise them with
 * bench/profile-top.ts).
 *
 * A full run (default size, duration, repetitions, workloads and engine processes) also records
 * its tables in bench/results.md, in the section for its mode (buffered or O_DIRECT); a full
 * `--matrix` run (default options, all configurations) records the Matrix section.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { attachBenchUnavailableReason, runAttachBench } from "./attach.js";
import { bytesText, fmt, markdownTable, parseSize, runAsScript } from "./format.js";
import {
  describeMatrixRun,
  ensureBuilt,
  FULL_MATRIX,
  type MatrixOptions,
  type MatrixResult,
  matrixReport,
  matrixUnavailableReason,
  matrixVerdict,
  QUICK_MATRIX,
  recordMatrixResults,
  runMatrix,
} from "./matrix.js";
import { median, type MicroResult, MiB, type Row, runMicroBenchmark, type Side, WORKLOADS } from "./micro.js";
import {
  describeSnapshotRun,
  FULL_OPTIONS,
  QUICK_OPTIONS,
  recordSnapshotResults,
  runSnapshotBenchmark,
  type SnapshotBenchResult,
  snapshotRows,
  snapshotTable,
} from "./snapshot.js";
import {
  describeThinRun,
  FULL_THIN_OPTIONS,
  recordThinResults,
  runThinBenchmark,
  thinRows,
  thinTable,
} from "./thin.js";
import {
  describeThinOverlayRun,
  FULL_THIN_OVERLAY,
  recordThinOverlayResults,
  runThinOverlayBenchmark,
  thinOverlayTable,
} from "./thin-overlay.js";

export const GOAL = 0.9;

export interface Output {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
}

const consoleOutput: Output = {
  stdout: (t) => process.stdout.write(t + "\n"),
  stderr: (t) => process.stderr.write(t + "\n"),
};

/** PASS/MISS on the ratio of the medians; `*` when the median per-pair ratio says otherwise. */
function verdict(r: Row): string {
  const pass = r.ratio >= GOAL;
  return (pass ? "PASS" : "MISS") + (pass !== median(r.pairRatios) >= GOAL ? "*" : "");
}

export function resultTable(result: MicroResult): string {
  const header = [
    "Workload",
    "QD",
    "ref MiB/s",
    "ref IOPS",
    "udm MiB/s",
    "udm IOPS",
    "udm/ref",
    "per-rep ratios",
    "goal",
    "result",
  ];
  const rows = result.rows.map((r) => [
    r.workload.name,
    String(r.workload.queueDepth),
    fmt(r.reference.mibps),
    fmt(r.reference.iops, 0),
    fmt(r.udm.mibps),
    fmt(r.udm.iops, 0),
    r.ratio.toFixed(3),
    r.pairRatios.map((x) => x.toFixed(2)).join(" "),
    `>= ${GOAL}`,
    verdict(r),
  ]);
  const table = markdownTable(header, rows, new Set([1, 2, 3, 4, 5, 6]));
  const noisy = result.rows.some((r) => verdict(r).endsWith("*"));
  const note =
    "Results marked * are too noisy to call: the median of the per-repetition ratios is on the other side of the goal.";
  return noisy ? `${table}\n\n${note}` : table;
}

/**
 * Where the time goes, per operation: busy time of the main thread (event-loop utilization: the
 * JS side, incl. submitting to libuv) and CPU time of the whole process (main thread + libuv
 * pool). When the main thread is near 100% busy, its µs/op bounds the IOPS.
 */
export function costTable(result: MicroResult): string {
  const header = [
    "Workload",
    "ref main µs/op",
    "udm main µs/op",
    "ref main busy",
    "udm main busy",
    "ref CPU µs/op",
    "udm CPU µs/op",
  ];
  const busy = (s: Side) => `${fmt(100 * s.mainBusy, 0)}%`;
  const rows = result.rows.map((r) => [
    r.workload.name,
    fmt(r.reference.mainUsPerOp, 2),
    fmt(r.udm.mainUsPerOp, 2),
    busy(r.reference),
    busy(r.udm),
    fmt(r.reference.cpuUsPerOp, 2),
    fmt(r.udm.cpuUsPerOp, 2),
  ]);
  return markdownTable(header, rows, new Set([1, 2, 3, 4, 5, 6]));
}

/** ", udm with inline reads off" and the like, for a run with optimisations turned off. */
function turnedOff(io: { inlineReads?: boolean; writePlug?: boolean } | undefined): string {
  const off = [];
  if (io?.inlineReads === false) off.push("inline reads");
  if (io?.writePlug === false) off.push("the write plug");
  return off.length ? `, udm with ${off.join(" and ")} off` : "";
}

function describeRun(result: MicroResult, quick: boolean, load: [before: number, after: number]): string[] {
  const fsys = result.filesystem;
  const cpus = os.cpus();
  return [
    `udm micro-benchmark (${quick ? "quick" : "full"} run), ${result.direct ? "O_DIRECT" : "buffered I/O (page cache)"} on both sides${turnedOff(result.io)}`,
    `data file: ${bytesText(result.fileBytes)} of random bytes in ${result.dataDir}, on ${fsys.type} (${fsys.source}, mounted at ${fsys.mountPoint}); recreated before each workload`,
    `each figure: median of ${result.repetitions} repetitions of ${result.repMs / 1000} s, reference and udm alternated (ABBA) after a warm-up`,
    `reference: fs.read/fs.write on an fd; udm: linear table over the same file, DeviceHandle.readInto/write; ${result.inProcess ? "both engines in one process" : `each engine in a child process of its own, udm compiled by ${result.loader === "tsx" ? "tsx (esbuild, keepNames)" : "tsc (as npm run build ships it)"}`}`,
    `machine: ${cpus.length} × ${cpus[0]?.model.trim() ?? "unknown CPU"}, ${fmt(os.totalmem() / (1024 * MiB))} GiB RAM, ${os.type()} ${os.release()}; Node ${process.version}, UV_THREADPOOL_SIZE=${process.env.UV_THREADPOOL_SIZE ?? "4 (default)"}`,
    `1-minute load average: ${fmt(load[0], 2)} before, ${fmt(load[1], 2)} after${Math.max(...load) > 0.5 ? " (other work on the machine: ratios are noisier)" : ""}`,
  ];
}

/** Replace this mode's section of bench/results.md, keeping the other mode's. */
function recordResults(file: string, result: MicroResult, description: string[], table: string): void {
  const mode = result.direct ? "direct" : "buffered";
  const begin = `<!-- ${mode}:begin -->`;
  const end = `<!-- ${mode}:end -->`;
  const section = [
    begin,
    `## ${result.direct ? "O_DIRECT" : "Buffered I/O"}`,
    "",
    `Run on ${new Date().toISOString()} by \`npm run bench${result.direct ? " -- --direct" : ""}\`.`,
    "",
    ...description.map((d) => `- ${d}`),
    "",
    table,
    end,
  ].join("\n");
  let text = fs.existsSync(file) ? fs.readFileSync(file, "utf8") : "";
  if (!text.startsWith("# "))
    text =
      "# udm micro-benchmark results\n\nWritten by `npm run bench` (full runs only); goal: udm >= 0.9 × the reference.\n";
  const at = text.indexOf(begin);
  const stop = text.indexOf(end);
  text =
    at >= 0 && stop > at
      ? text.slice(0, at) + section + text.slice(stop + end.length)
      : text.trimEnd() + "\n\n" + section + "\n";
  fs.writeFileSync(file, text);
}

export interface BenchResult {
  micro?: MicroResult;
  snapshot?: SnapshotBenchResult;
  matrix?: MatrixResult;
  /** Why the matrix did not run (tools missing) in a --quick run. */
  matrixSkipped?: string;
}

export async function main(argv: string[], out: Output = consoleOutput): Promise<BenchResult> {
  const { values } = parseArgs({
    args: argv,
    allowNegative: true,
    options: {
      snapshot: { type: "boolean", default: true },
      thin: { type: "boolean" },
      "thin-overlay": { type: "boolean", default: false },
      matrix: { type: "boolean" },
      attach: { type: "boolean", default: false },
      build: { type: "boolean", default: true },
      quick: { type: "boolean", default: false },
      direct: { type: "boolean", default: false },
      json: { type: "boolean", default: false },
      size: { type: "string" },
      seconds: { type: "string" },
      reps: { type: "string" },
      dir: { type: "string" },
      only: { type: "string" },
      configs: { type: "string" },
      "udm-dir": { type: "string" },
      profile: { type: "string" },
      "in-process": { type: "boolean", default: false },
      loader: { type: "string", default: "tsc" },
      "inline-reads": { type: "boolean", default: true },
      "write-plug": { type: "boolean", default: true },
      "zero-copy": { type: "boolean", default: true },
    },
  });
  // Optimisations turned off for an A/B measurement (undefined: udm's default).
  const io = {
    inlineReads: values["inline-reads"] ? undefined : false,
    writePlug: values["write-plug"] ? undefined : false,
  };
  const udmdArgs = [
    ...(values["inline-reads"] ? [] : ["--no-inline-reads"]),
    ...(values["write-plug"] ? [] : ["--no-write-plug"]),
    ...(values["zero-copy"] ? [] : ["--no-zero-copy"]),
  ];
  const tuned = udmdArgs.length > 0;
  const quick = values.quick;
  // --json keeps stdout machine-readable: everything for humans goes to stderr.
  const print = values.json ? out.stderr : out.stdout;
  /** A benchmark's description lines and then its table, each after a blank line. */
  const printReport = (description: string[], table: string): void => {
    print("");
    for (const d of description) print(d);
    print("");
    print(table);
  };
  const reps = values.reps ? Number(values.reps) : undefined;
  if (reps !== undefined && (!Number.isInteger(reps) || reps < 3)) throw new Error("--reps must be an integer >= 3");
  if (values.seconds && !(Number(values.seconds) > 0)) throw new Error("--seconds must be positive");

  /** The matrix with this run's options; `only` applies to it when it runs alone. */
  const matrix = async (alone: boolean): Promise<MatrixResult> => {
    const defaults = quick ? QUICK_MATRIX : FULL_MATRIX;
    const opts: MatrixOptions = {
      ...defaults,
      fileBytes: values.size ? parseSize(values.size) : defaults.fileBytes,
      runtimeMs: values.seconds ? Number(values.seconds) * 1000 : defaults.runtimeMs,
      warmupMs: values.seconds ? Math.min(defaults.warmupMs, Number(values.seconds) * 500) : defaults.warmupMs,
      repetitions: reps ?? defaults.repetitions,
      dir: values.dir,
      configs: values.configs
        ?.split(",")
        .map((c) => c.trim())
        .filter(Boolean),
      only: alone ? values.only : undefined,
      profileDir: values.profile,
      udmdArgs,
      udmDir: values["udm-dir"],
      log: out.stderr,
    };
    if (values.build) ensureBuilt(out.stderr, values["udm-dir"] ? path.resolve(values["udm-dir"]) : undefined);
    const result = await runMatrix(opts);
    const description = describeMatrixRun(result, quick);
    const report = matrixReport(result);
    printReport(description, report);
    print("");
    print(matrixVerdict(result));
    const defaultRun =
      !quick &&
      !values.size &&
      !values.seconds &&
      !values.reps &&
      !values.only &&
      !values.configs &&
      !values.profile &&
      !values.dir &&
      !values["udm-dir"] &&
      !tuned;
    if (alone && defaultRun) {
      const file = path.join(import.meta.dirname, "results.md");
      recordMatrixResults(file, result, description, report, "npm run bench -- --matrix");
      print(`recorded in ${path.relative(process.cwd(), file)}`);
    }
    if (values.profile)
      print(`udmd CPU profiles in ${values.profile} (summarise: node --import tsx bench/profile-top.ts FILE)`);
    return result;
  };

  if (values.attach) {
    const reason = attachBenchUnavailableReason();
    if (reason) throw new Error(`the attach benchmark cannot run here: ${reason}`);
    if (values.build) ensureBuilt(out.stderr);
    const seconds = values.seconds ? Number(values.seconds) : undefined;
    const fileBytes = values.size ? parseSize(values.size) : undefined;
    print(await runAttachBench({ fileBytes, seconds, dir: values.dir }, out.stderr));
    return {};
  }

  /** The thin benchmarks (bench/thin.ts), recorded when run with default options. */
  const thin = async (command: string): Promise<void> => {
    const r = await runThinBenchmark({ ...FULL_THIN_OPTIONS, dir: values.dir, log: out.stderr });
    const description = describeThinRun(r, false);
    const table = thinTable(r);
    printReport(description, table);
    const misses = thinRows(r).filter((x) => x.result === "MISS");
    print("");
    print(misses.length === 0 ? "thin goals met" : `thin goals missed: ${misses.map((x) => x.measure).join("; ")}`);
    if (!values.dir) recordThinResults(path.join(import.meta.dirname, "results.md"), description, table, command);
  };

  if (values.thin) {
    await thin("npm run bench -- --thin");
    return {};
  }

  if (values["thin-overlay"]) {
    const reason = matrixUnavailableReason();
    if (reason) throw new Error(`the thin overlay benchmark cannot run here: ${reason}`);
    if (values.build) ensureBuilt(out.stderr);
    const r = await runThinOverlayBenchmark({ ...FULL_THIN_OVERLAY, dir: values.dir, log: out.stderr });
    const description = describeThinOverlayRun(r);
    const table = thinOverlayTable(r);
    printReport(description, table);
    if (!values.dir)
      recordThinOverlayResults(
        path.join(import.meta.dirname, "results.md"),
        description,
        table,
        "npm run bench -- --thin-overlay",
      );
    return {};
  }

  if (values.matrix) {
    const reason = matrixUnavailableReason();
    if (reason) throw new Error(`the matrix cannot run here: ${reason}`);
    const result = await matrix(true);
    if (values.json) out.stdout(JSON.stringify(result, null, 2));
    return { matrix: result };
  }

  const fileBytes = values.size ? parseSize(values.size) : quick ? 8 * MiB : 256 * MiB;
  const repMs = values.seconds ? Number(values.seconds) * 1000 : quick ? 200 : 1500;
  const repetitions = reps ?? (quick ? 3 : 5);
  const only = values.only?.toLowerCase();
  const workloads = only ? WORKLOADS.filter((w) => w.name.toLowerCase().includes(only)) : WORKLOADS;
  if (workloads.length === 0)
    throw new Error(`--only ${values.only}: no such workload (${WORKLOADS.map((w) => w.name).join(", ")})`);
  const loader = values.loader;
  if (loader !== "tsc" && loader !== "tsx") throw new Error("--loader must be tsc or tsx");

  const loadBefore = os.loadavg()[0]!;
  const result = await runMicroBenchmark({
    fileBytes,
    repMs,
    repetitions,
    direct: values.direct,
    io,
    dir: values.dir,
    workloads,
    inProcess: values["in-process"],
    loader,
    log: out.stderr,
  });
  const description = describeRun(result, quick, [loadBefore, os.loadavg()[0]!]);
  const table = resultTable(result) + "\n\n" + costTable(result);
  printReport(description, table);
  const misses = result.rows.filter((r) => r.ratio < GOAL).map((r) => r.workload.name);
  const unsure = result.rows.filter((r) => verdict(r).endsWith("*")).map((r) => r.workload.name);
  print("");
  print(
    misses.length === 0
      ? `goal met: udm >= ${GOAL} × reference on every workload`
      : `goal missed (< ${GOAL} × reference) on: ${misses.join(", ")}`,
  );
  if (unsure.length > 0) print(`too noisy to call: ${unsure.join(", ")}`);
  // The snapshot benchmarks (bench/snapshot.ts), unless --no-snapshot or --only picks micro workloads.
  let snapshot: SnapshotBenchResult | undefined;
  if (values.snapshot && !values.only) {
    snapshot = await runSnapshotBenchmark({
      ...(quick ? QUICK_OPTIONS : FULL_OPTIONS),
      dir: values.dir,
      io,
      log: out.stderr,
    });
    const snapDescription = describeSnapshotRun(snapshot, quick);
    const snapTable = snapshotTable(snapshot);
    printReport(snapDescription, snapTable);
    const snapMisses = snapshotRows(snapshot)
      .filter((r) => r.result === "MISS")
      .map((r) => r.measure);
    print("");
    print(snapMisses.length === 0 ? "snapshot goals met" : `snapshot goals missed: ${snapMisses.join("; ")}`);
    if (!quick && !values.dir && !tuned) {
      const file = path.join(import.meta.dirname, "results.md");
      recordSnapshotResults(file, snapDescription, snapTable, "npm run bench");
    }
  }
  if (values.thin !== false && !quick && !values.only) await thin("npm run bench");
  // The smoke run includes a tiny matrix (the full one is `--matrix`: it takes minutes).
  let matrixResult: MatrixResult | undefined;
  let matrixSkipped: string | undefined;
  if (quick && values.matrix !== false && !values.only) {
    matrixSkipped = matrixUnavailableReason() ?? undefined;
    if (matrixSkipped) print(`\nmatrix skipped: ${matrixSkipped}`);
    else matrixResult = await matrix(false);
  }
  if (values.json)
    out.stdout(
      JSON.stringify(
        {
          date: new Date().toISOString(),
          node: process.version,
          goal: GOAL,
          ...result,
          snapshot,
          matrix: matrixResult,
        },
        null,
        2,
      ),
    );
  if (
    !quick &&
    !values.size &&
    !values.seconds &&
    !values.reps &&
    !values.only &&
    !values["in-process"] &&
    loader === "tsc" &&
    !tuned
  ) {
    const file = path.join(import.meta.dirname, "results.md");
    recordResults(file, result, description, table);
    print(`recorded in ${path.relative(process.cwd(), file)}`);
  }
  return { micro: result, snapshot, matrix: matrixResult, matrixSkipped };
}

runAsScript(
  import.meta.url,
  () => main(process.argv.slice(2)),
  () => [],
);
