/**
 * `npm run bench [-- options]`: the micro-benchmark (bench/micro.ts) as a table on stdout.
 *
 *   --quick        CI smoke run: 8 MiB file, 0.2 s repetitions (whole run well under 15 s)
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
 *
 * Profile with `node --import tsx --cpu-prof --cpu-prof-dir=DIR bench/run.ts --only ...`: each
 * engine process writes its own DIR/bench-<engine>-*.cpuprofile (summarise them with
 * bench/profile-top.ts).
 *
 * A full run (default size, duration, repetitions, workloads and engine processes) also records
 * its tables in bench/results.md, in the section for its mode (buffered or O_DIRECT).
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { KiB, MiB, median, type MicroResult, type Row, runMicroBenchmark, type Side, WORKLOADS } from "./micro.js";
import {
  describeSnapshotRun, FULL_OPTIONS, QUICK_OPTIONS, recordSnapshotResults, runSnapshotBenchmark, type SnapshotBenchResult, snapshotRows, snapshotTable,
} from "./snapshot.js";

export const GOAL = 0.9;

export interface Output {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
}

const consoleOutput: Output = {
  stdout: (t) => process.stdout.write(t + "\n"),
  stderr: (t) => process.stderr.write(t + "\n"),
};

function parseSize(text: string): number {
  const m = /^(\d+)\s*([KMG]?)(i?B)?$/i.exec(text.trim());
  if (!m) throw new Error(`bad size: ${text}`);
  const unit = { "": 1, K: KiB, M: MiB, G: 1024 * MiB }[m[2]!.toUpperCase() as "" | "K" | "M" | "G"];
  return Number(m[1]) * unit;
}

const fmt = (x: number, digits = 1) => x.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
const bytesText = (b: number) => (b >= MiB ? `${b / MiB} MiB` : `${b / KiB} KiB`);

/** A Markdown table with padded columns: readable in a terminal and in results.md. */
function markdownTable(header: string[], rows: string[][], rightAligned: Set<number>): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) =>
    "| " + cells.map((c, i) => (rightAligned.has(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join(" | ") + " |";
  const rule = "|" + widths.map((w, i) => (rightAligned.has(i) ? "-".repeat(w + 1) + ":" : "-".repeat(w + 2))).join("|") + "|";
  return [line(header), rule, ...rows.map(line)].join("\n");
}

/** PASS/MISS on the ratio of the medians; `*` when the median per-pair ratio says otherwise. */
function verdict(r: Row): string {
  const pass = r.ratio >= GOAL;
  return (pass ? "PASS" : "MISS") + (pass !== median(r.pairRatios) >= GOAL ? "*" : "");
}

export function resultTable(result: MicroResult): string {
  const header = ["Workload", "QD", "ref MiB/s", "ref IOPS", "udm MiB/s", "udm IOPS", "udm/ref", "per-rep ratios", "goal", "result"];
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
  const note = "Results marked * are too noisy to call: the median of the per-repetition ratios is on the other side of the goal.";
  return noisy ? `${table}\n\n${note}` : table;
}

/**
 * Where the time goes, per operation: busy time of the main thread (event-loop utilization: the
 * JS side, incl. submitting to libuv) and CPU time of the whole process (main thread + libuv
 * pool). When the main thread is near 100% busy, its µs/op bounds the IOPS.
 */
export function costTable(result: MicroResult): string {
  const header = ["Workload", "ref main µs/op", "udm main µs/op", "ref main busy", "udm main busy", "ref CPU µs/op", "udm CPU µs/op"];
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

function describeRun(result: MicroResult, quick: boolean, load: [before: number, after: number]): string[] {
  const fsys = result.filesystem;
  const cpus = os.cpus();
  return [
    `udm micro-benchmark (${quick ? "quick" : "full"} run), ${result.direct ? "O_DIRECT" : "buffered I/O (page cache)"} on both sides`,
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
  if (!text.startsWith("# ")) text = "# udm micro-benchmark results\n\nWritten by `npm run bench` (full runs only); goal: udm >= 0.9 × the reference.\n";
  const at = text.indexOf(begin);
  const stop = text.indexOf(end);
  text = at >= 0 && stop > at ? text.slice(0, at) + section + text.slice(stop + end.length) : text.trimEnd() + "\n\n" + section + "\n";
  fs.writeFileSync(file, text);
}

export async function main(argv: string[], out: Output = consoleOutput): Promise<MicroResult & { snapshot?: SnapshotBenchResult }> {
  const { values } = parseArgs({
    args: argv,
    allowNegative: true,
    options: {
      snapshot: { type: "boolean", default: true },
      quick: { type: "boolean", default: false },
      direct: { type: "boolean", default: false },
      json: { type: "boolean", default: false },
      size: { type: "string" },
      seconds: { type: "string" },
      reps: { type: "string" },
      dir: { type: "string" },
      only: { type: "string" },
      "in-process": { type: "boolean", default: false },
      loader: { type: "string", default: "tsc" },
    },
  });
  const quick = values.quick;
  const fileBytes = values.size ? parseSize(values.size) : quick ? 8 * MiB : 256 * MiB;
  const repMs = values.seconds ? Number(values.seconds) * 1000 : quick ? 200 : 1500;
  const repetitions = values.reps ? Number(values.reps) : quick ? 3 : 5;
  const only = values.only?.toLowerCase();
  const workloads = only ? WORKLOADS.filter((w) => w.name.toLowerCase().includes(only)) : WORKLOADS;
  if (workloads.length === 0) throw new Error(`--only ${values.only}: no such workload (${WORKLOADS.map((w) => w.name).join(", ")})`);
  if (!(repMs > 0)) throw new Error("--seconds must be positive");
  const loader = values.loader;
  if (loader !== "tsc" && loader !== "tsx") throw new Error("--loader must be tsc or tsx");
  if (!Number.isInteger(repetitions) || repetitions < 3) throw new Error("--reps must be an integer >= 3");
  // --json keeps stdout machine-readable: everything for humans goes to stderr.
  const print = values.json ? out.stderr : out.stdout;

  const loadBefore = os.loadavg()[0]!;
  const result = await runMicroBenchmark({ fileBytes, repMs, repetitions, direct: values.direct, dir: values.dir, workloads, inProcess: values["in-process"], loader, log: out.stderr });
  const description = describeRun(result, quick, [loadBefore, os.loadavg()[0]!]);
  const table = resultTable(result) + "\n\n" + costTable(result);
  print("");
  for (const d of description) print(d);
  print("");
  print(table);
  const misses = result.rows.filter((r) => r.ratio < GOAL).map((r) => r.workload.name);
  const unsure = result.rows.filter((r) => verdict(r).endsWith("*")).map((r) => r.workload.name);
  print("");
  print(misses.length === 0 ? `goal met: udm >= ${GOAL} × reference on every workload` : `goal missed (< ${GOAL} × reference) on: ${misses.join(", ")}`);
  if (unsure.length > 0) print(`too noisy to call: ${unsure.join(", ")}`);
  // The snapshot benchmarks (bench/snapshot.ts), unless --no-snapshot or --only picks micro workloads.
  let snapshot: SnapshotBenchResult | undefined;
  if (values.snapshot && !values.only) {
    snapshot = await runSnapshotBenchmark({ ...(quick ? QUICK_OPTIONS : FULL_OPTIONS), dir: values.dir, log: out.stderr });
    const snapDescription = describeSnapshotRun(snapshot, quick);
    const snapTable = snapshotTable(snapshot);
    print("");
    for (const d of snapDescription) print(d);
    print("");
    print(snapTable);
    const snapMisses = snapshotRows(snapshot).filter((r) => r.result === "MISS").map((r) => r.measure);
    print("");
    print(snapMisses.length === 0 ? "snapshot goals met" : `snapshot goals missed: ${snapMisses.join("; ")}`);
    if (!quick && !values.dir) {
      const file = path.join(import.meta.dirname, "results.md");
      recordSnapshotResults(file, snapshot, snapDescription, snapTable, "npm run bench");
    }
  }
  if (values.json) out.stdout(JSON.stringify({ date: new Date().toISOString(), node: process.version, goal: GOAL, ...result, snapshot }, null, 2));
  if (!quick && !values.size && !values.seconds && !values.reps && !values.only && !values["in-process"] && loader === "tsc") {
    const file = path.join(import.meta.dirname, "results.md");
    recordResults(file, result, description, table);
    print(`recorded in ${path.relative(process.cwd(), file)}`);
  }
  return { ...result, snapshot };
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exitCode = 1;
  });
}
