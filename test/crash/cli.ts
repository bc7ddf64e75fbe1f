/**
 * `npm run crash -- [--ops N] [--seed S] [options]`: the crash-consistency runner (./runner.ts).
 * Prints the seed first, and last "crash points checked: X, failures: Y (seed S, ops N)" (the seed
 * again, so a figure quoted from that line can be reproduced); exits 1 on failures, 2 on bad
 * arguments. `--target thin` runs the thin-pool runner instead (testing/thin-crash/cli.ts).
 */
import crypto from "node:crypto";
import { type ParseArgsConfig, parseArgs } from "node:util";
import { type CrashRunOptions, type CrashRunReport, runCrashHarness } from "../../testing/crash/runner.js";
import { thinCrashMain } from "../../testing/thin-crash/cli.js";
import { integer, probability, UsageError } from "../../testing/cli-values.js";

const USAGE = `Usage: npm run crash -- [options]
  --target T           snapshot (default) or thin (its options: npm run crash -- --target thin --help)
  --ops N              workload operations (default 400)
  --seed S             seed (default: random, printed)
  --origin-sectors N   origin size in 512-byte sectors (default 2048)
  --max-snapshots N    snapshots alive at once, at most (default 3)
  --random-points N    crash points at random moments, keeping random unflushed writes (default ops/2)
  --jitter P           probability that a RAM-disk bio completes a few event-loop turns late (default 0.3)
  --min-points N       add random points until at least N crash points are checked
  --no-post-recovery   do not write to and reactivate the recovered devices at the random points
  --reused-cow         COW devices hold garbage and an older store before each snapshot is made
  --cross-check N      compare replayLog --end-mark with the incremental replay every N ops (default 50, 0: never)
  --show N             failing crash points to describe (default 10)
  --merges             require merges (default: merge when snapshot-merge is registered and works)
  --no-merges          never merge
  --json               print the whole report as JSON as well
  -q, --quiet          no progress lines
`;

const OPTIONS = {
  target: { type: "string" },
  ops: { type: "string" },
  seed: { type: "string" },
  "origin-sectors": { type: "string" },
  "max-snapshots": { type: "string" },
  "random-points": { type: "string" },
  jitter: { type: "string" },
  "min-points": { type: "string" },
  "no-post-recovery": { type: "boolean" },
  "reused-cow": { type: "boolean" },
  "cross-check": { type: "string" },
  show: { type: "string" },
  merges: { type: "boolean" },
  "no-merges": { type: "boolean" },
  json: { type: "boolean" },
  quiet: { type: "boolean", short: "q" },
  help: { type: "boolean", short: "h" },
} satisfies ParseArgsConfig["options"];

interface Command {
  options: CrashRunOptions;
  json: boolean;
  quiet: boolean;
}

/** The run the arguments ask for, or null for --help; throws a UsageError naming the bad option or value. */
function parseCommand(argv: string[]): Command | null {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, strict: true, allowPositionals: false, tokens: true });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { values, tokens } = parsed;
  if (values.help) return null;
  if (values.target !== undefined && values.target !== "snapshot") {
    throw new UsageError(`--target: snapshot or thin, not ${values.target}`);
  }
  const options: CrashRunOptions = {
    ops: integer("ops", values.ops) ?? 400,
    seed: (integer("seed", values.seed) ?? crypto.randomBytes(4).readUInt32LE(0)) >>> 0,
    originSectors: integer("origin-sectors", values["origin-sectors"]),
    maxSnapshots: integer("max-snapshots", values["max-snapshots"]),
    randomPoints: integer("random-points", values["random-points"]),
    jitter: probability("jitter", values.jitter),
    minPoints: integer("min-points", values["min-points"]),
    crossCheckEvery: integer("cross-check", values["cross-check"]),
    maxReported: integer("show", values.show),
  };
  if (values["no-post-recovery"]) options.postRecovery = false;
  if (values["reused-cow"]) options.reusedCow = true;
  // --merges and --no-merges: the last one given counts.
  const mergeFlag = tokens.findLast(
    (token) => token.kind === "option" && (token.name === "merges" || token.name === "no-merges"),
  );
  if (mergeFlag?.kind === "option") options.merges = mergeFlag.name === "merges";
  const originSectors = options.originSectors;
  if (originSectors !== undefined && (originSectors < 64 || originSectors % 32 !== 0)) {
    throw new UsageError("--origin-sectors: at least 64, a multiple of 32");
  }
  return { options, json: values.json ?? false, quiet: values.quiet ?? false };
}

export async function main(argv: string[]): Promise<number> {
  const target = argv.indexOf("--target");
  if (target >= 0 && argv[target + 1] === "thin") return thinCrashMain(argv.toSpliced(target, 2));
  let command: Command | null;
  try {
    command = parseCommand(argv);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`crash: ${err.message}\n${USAGE}`);
    return 2;
  }
  if (command === null) {
    process.stdout.write(USAGE);
    return 0;
  }
  const { options, json, quiet } = command;
  const reused = options.reusedCow ? " --reused-cow" : "";
  process.stdout.write(`seed ${options.seed} (repeat with --seed ${options.seed} --ops ${options.ops}${reused})\n`);
  if (!quiet) options.progress = (line) => process.stdout.write(`${line}\n`);
  const report = await runCrashHarness(options);
  for (const failure of report.failureDetails) {
    process.stdout.write(`FAIL ${failure.point}\n`);
    for (const problem of failure.problems) process.stdout.write(`  ${problem}\n`);
  }
  for (const problem of report.workloadProblems) process.stdout.write(`FAIL workload: ${problem}\n`);
  if (!quiet) process.stdout.write(`${details(report)}\n`);
  if (json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  process.stdout.write(
    `crash points checked: ${report.pointsChecked}, failures: ${report.failures} ` +
      `(seed ${options.seed}, ops ${options.ops})\n`,
  );
  return report.failures > 0 ? 1 : 0;
}

/** The line after the run: how the points were made, and the times. */
function details(report: CrashRunReport): string {
  const { stats, merges, elapsedMs } = report;
  return (
    `${report.flushPoints} flush/FUA points, ${report.randomPoints} random points ` +
    `(${stats.unflushedKept} unflushed writes kept, ${stats.unflushedDropped} dropped), ` +
    `${report.crossChecks} replayLog cross-checks, ${stats.reorderedSectors} sectors replayed in completion order, ` +
    `${stats.earlierDurable} writes durable before the flush log-writes gave them to; ` +
    `merges: ${merges.note} (${merges.done} done); ` +
    `${elapsedMs.workload} ms workload, ${elapsedMs.check} ms checking`
  );
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`crash: ${(err as Error).stack ?? String(err)}\n`);
    process.exitCode = 1;
  },
);
