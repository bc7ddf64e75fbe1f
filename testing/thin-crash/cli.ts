/**
 * `npm run crash -- --target thin [options]` (test/crash/cli.ts hands thin runs over to this):
 * the thin crash runner from the command line. Prints the seed first and last
 * "crash points checked: X, failures: Y (seed S, ops N)", like the snapshot runner; exits 1 on
 * failures, 2 on bad arguments.
 */
import crypto from "node:crypto";
import { type ParseArgsConfig, parseArgs } from "node:util";
import { BROKEN_POOLS } from "./broken-pools.js";
import type { ThinCrashRunOptions, ThinCrashRunReport } from "./report.js";
import { runThinCrashHarness } from "./runner.js";
import { integer, probability, UsageError } from "../cli-values.js";

export const THIN_USAGE = `Usage: npm run crash -- --target thin [options]
  --ops N              workload operations (default 300)
  --seed S             seed (default: random, printed)
  --volume-sectors N   size of each thin volume in sectors (default 2048)
  --block-size N       the pool's data block size in sectors (default 128)
  --max-volumes N      thin volumes and snapshots alive at once, at most (default 4)
  --random-points N    crash points at random moments, keeping random unflushed writes (default ops/2)
  --min-points N       add random points until at least N crash points are checked
  --jitter P           probability that a RAM-disk bio completes a few event-loop turns late (default 0.3)
  --thin-check N       run thin_check on the metadata of every Nth crash point (default 10; 1: every point; 0: never)
  --pool-features F    the pool table's features, comma-separated (e.g. no_discard_passdown)
  --count-leaks        count crash points with leaked data blocks instead of failing them
  --no-post-recovery   do not write to and reactivate the recovered pool at the random points
  --cross-check N      compare replayLog --end-mark with the incremental replay every N ops (default 50, 0: never)
  --broken NAME        a deliberately broken pool: ${Object.keys(BROKEN_POOLS).join(", ")}
  --show N             failing crash points to describe (default 10)
  --json               print the whole report as JSON as well
  -q, --quiet          no progress lines
`;

const OPTIONS = {
  ops: { type: "string" },
  seed: { type: "string" },
  "volume-sectors": { type: "string" },
  "block-size": { type: "string" },
  "max-volumes": { type: "string" },
  "random-points": { type: "string" },
  "min-points": { type: "string" },
  jitter: { type: "string" },
  "thin-check": { type: "string" },
  "no-post-recovery": { type: "boolean" },
  "count-leaks": { type: "boolean" },
  "pool-features": { type: "string" },
  "cross-check": { type: "string" },
  broken: { type: "string" },
  show: { type: "string" },
  json: { type: "boolean" },
  quiet: { type: "boolean", short: "q" },
  help: { type: "boolean", short: "h" },
} satisfies ParseArgsConfig["options"];

function parseCommand(argv: string[]): { options: ThinCrashRunOptions; json: boolean; quiet: boolean } | null {
  let values;
  try {
    values = parseArgs({ args: argv, options: OPTIONS, strict: true, allowPositionals: false }).values;
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  if (values.help) return null;
  const options: ThinCrashRunOptions = {
    ops: integer("ops", values.ops) ?? 300,
    seed: (integer("seed", values.seed) ?? crypto.randomBytes(4).readUInt32LE(0)) >>> 0,
    volumeSectors: integer("volume-sectors", values["volume-sectors"]),
    blockSize: integer("block-size", values["block-size"]),
    maxVolumes: integer("max-volumes", values["max-volumes"]),
    randomPoints: integer("random-points", values["random-points"]),
    minPoints: integer("min-points", values["min-points"]),
    jitter: probability("jitter", values.jitter),
    thinCheckEvery: integer("thin-check", values["thin-check"]) ?? 10,
    crossCheckEvery: integer("cross-check", values["cross-check"]),
    maxReported: integer("show", values.show),
  };
  if (values["no-post-recovery"]) options.postRecovery = false;
  if (values["count-leaks"]) options.leaksFail = false;
  if (values["pool-features"]) options.poolFeatures = values["pool-features"].split(",").filter(Boolean);
  if (values.broken !== undefined) {
    if (!(values.broken in BROKEN_POOLS)) {
      throw new UsageError(`--broken: one of ${Object.keys(BROKEN_POOLS).join(", ")}, not ${values.broken}`);
    }
    options.broken = values.broken;
  }
  const bs = options.blockSize ?? 128;
  if (bs < 128 || bs % 128 !== 0 || bs > 2097152) throw new UsageError("--block-size: a multiple of 128 up to 2097152");
  const sectors = options.volumeSectors ?? 2048;
  if (sectors < bs || sectors % bs !== 0) throw new UsageError("--volume-sectors: a multiple of the block size");
  if (options.maxVolumes === 0) throw new UsageError("--max-volumes: at least 1");
  return { options, json: values.json ?? false, quiet: values.quiet ?? false };
}

export async function thinCrashMain(argv: string[]): Promise<number> {
  let command;
  try {
    command = parseCommand(argv);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`crash: ${err.message}\n${THIN_USAGE}`);
    return 2;
  }
  if (command === null) {
    process.stdout.write(THIN_USAGE);
    return 0;
  }
  const { options, json, quiet } = command;
  process.stdout.write(
    `seed ${options.seed} (repeat with --target thin --seed ${options.seed} --ops ${options.ops})\n`,
  );
  if (!quiet) options.progress = (line) => process.stdout.write(`${line}\n`);
  const report = await runThinCrashHarness(options);
  for (const failure of report.failureDetails) {
    process.stdout.write(`FAIL ${failure.point}\n`);
    for (const problem of failure.problems) process.stdout.write(`  ${problem}\n`);
  }
  for (const problem of report.workloadProblems) process.stdout.write(`FAIL workload: ${problem}\n`);
  if (report.thinCheckSkipped) process.stdout.write(`thin_check skipped: ${report.thinCheckSkipped}\n`);
  if (!quiet) process.stdout.write(`${thinDetails(report)}\n`);
  if (json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  process.stdout.write(
    `crash points checked: ${report.pointsChecked}, failures: ${report.failures} ` +
      `(seed ${options.seed}, ops ${options.ops})\n`,
  );
  return report.failures > 0 ? 1 : 0;
}

/** The line after a run: what was checked, and the times. */
export function thinDetails(report: ThinCrashRunReport): string {
  const { stats, elapsedMs } = report;
  return (
    `${report.flushPoints} flush/FUA points, ${report.randomPoints} random points ` +
    `(${stats.unflushedKept} unflushed writes kept, ${stats.unflushedDropped} dropped); ` +
    `metadata checked at ${report.metadataChecks} points, thin_check at ${report.thinChecks}` +
    `${report.leakPoints ? `, leaked data blocks at ${report.leakPoints} (counted, not failed)` : ""}; ` +
    `${report.volumesChecked} volumes read back, ${report.postRecoveryChecks} pools written after recovery; ` +
    `${report.crossChecks} replayLog cross-checks; workload: ${stats.writes} writes, ${stats.discards} discards, ` +
    `${stats.flushes} flushes, ${stats.thinsCreated} thin volumes, ${stats.snapshotsCreated} snapshots, ` +
    `${stats.deletes} deletes, ${stats.periodicCommits} periodic commits; ` +
    `${elapsedMs.workload} ms workload, ${elapsedMs.check} ms checking`
  );
}
