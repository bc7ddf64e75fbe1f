/**
 * `npm run crash -- [--ops N] [--seed S] [options]`: the crash-consistency runner (./runner.ts).
 * Prints the seed first, then "crash points checked: X, failures: Y"; exits 1 on failures, 2 on
 * bad arguments.
 */
import crypto from "node:crypto";
import { runCrashHarness, type CrashRunOptions } from "./runner.js";

const USAGE = `Usage: npm run crash -- [options]
  --ops N              workload operations (default 400)
  --seed S             seed (default: random, printed)
  --origin-sectors N   origin size in 512-byte sectors (default 2048)
  --max-snapshots N    snapshots alive at once, at most (default 3)
  --random-points N    crash points at random moments, keeping random unflushed writes (default ops/2)
  --jitter P           probability that a RAM-disk bio completes a few event-loop turns late (default 0.3)
  --min-points N       add random points until at least N crash points are checked
  --no-post-recovery   do not write to and reactivate the recovered devices at the random points
  --cross-check N      compare replayLog --end-mark with the incremental replay every N ops (default 50, 0: never)
  --show N             failing crash points to describe (default 10)
  --merges             require merges (default: merge when snapshot-merge is registered and works)
  --no-merges          never merge
  --json               print the whole report as JSON as well
  -q, --quiet          no progress lines
`;

export async function main(argv: string[]): Promise<number> {
  const opts: CrashRunOptions = { ops: 400, seed: crypto.randomBytes(4).readUInt32LE(0) };
  let json = false;
  let quiet = false;
  const num = (name: string, text: string | undefined): number => {
    const n = Number(text);
    if (text === undefined || text === "" || !Number.isSafeInteger(n) || n < 0) throw new UsageError(`${name}: expected a non-negative integer, got ${text ?? "nothing"}`);
    return n;
  };
  try {
    for (let i = 0; i < argv.length; i++) {
      const arg = argv[i]!;
      const [flag, inline] = arg.startsWith("--") && arg.includes("=") ? [arg.slice(0, arg.indexOf("=")), arg.slice(arg.indexOf("=") + 1)] : [arg, undefined];
      const value = () => inline ?? argv[++i];
      switch (flag) {
        case "--ops": opts.ops = num(flag, value()); break;
        case "--seed": opts.seed = num(flag, value()) >>> 0; break;
        case "--origin-sectors": opts.originSectors = num(flag, value()); break;
        case "--max-snapshots": opts.maxSnapshots = num(flag, value()); break;
        case "--random-points": opts.randomPoints = num(flag, value()); break;
        case "--jitter": {
          const p = Number(value());
          if (!(p >= 0 && p <= 1)) throw new UsageError("--jitter: expected a probability from 0 to 1");
          opts.jitter = p;
          break;
        }
        case "--min-points": opts.minPoints = num(flag, value()); break;
        case "--no-post-recovery": opts.postRecovery = false; break;
        case "--cross-check": opts.crossCheckEvery = num(flag, value()); break;
        case "--show": opts.maxReported = num(flag, value()); break;
        case "--merges": opts.merges = true; break;
        case "--no-merges": opts.merges = false; break;
        case "--json": json = true; break;
        case "-q": case "--quiet": quiet = true; break;
        case "-h": case "--help": process.stdout.write(USAGE); return 0;
        default: throw new UsageError(`unknown option ${arg}`);
      }
    }
    if (opts.originSectors !== undefined && (opts.originSectors < 64 || opts.originSectors % 32 !== 0)) {
      throw new UsageError("--origin-sectors: at least 64, a multiple of 32");
    }
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`crash: ${err.message}\n${USAGE}`);
    return 2;
  }
  process.stdout.write(`seed ${opts.seed} (repeat with --seed ${opts.seed} --ops ${opts.ops})\n`);
  if (!quiet) opts.progress = (line) => process.stdout.write(`${line}\n`);
  const report = await runCrashHarness(opts);
  for (const f of report.failureDetails) {
    process.stdout.write(`FAIL ${f.point}\n`);
    for (const p of f.problems) process.stdout.write(`  ${p}\n`);
  }
  for (const p of report.workloadProblems) process.stdout.write(`FAIL workload: ${p}\n`);
  if (!quiet) {
    process.stdout.write(
      `${report.flushPoints} flush/FUA points, ${report.randomPoints} random points ` +
        `(${report.stats.unflushedKept} unflushed writes kept, ${report.stats.unflushedDropped} dropped), ` +
        `${report.crossChecks} replayLog cross-checks, ${report.stats.reorderedSectors} sectors replayed in completion order, ` +
        `${report.stats.earlierDurable} writes durable before the flush log-writes gave them to; ` +
        `merges: ${report.merges.note} (${report.merges.done} done); ` +
        `${report.elapsedMs.workload} ms workload, ${report.elapsedMs.check} ms checking\n`,
    );
  }
  if (json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  process.stdout.write(`crash points checked: ${report.pointsChecked}, failures: ${report.failures}\n`);
  return report.failures > 0 ? 1 : 0;
}

class UsageError extends Error {}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`crash: ${(err as Error).stack ?? String(err)}\n`);
    process.exitCode = 1;
  },
);
