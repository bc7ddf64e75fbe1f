/**
 * The crash-consistency runner: a seeded workload on a snapshot stack recorded with log-writes,
 * then the stack reactivated and checked at every flush/FUA point and at random moments. How it
 * works, and what it checks: docs/testing.md, "Crash-consistency runner".
 */
import type { DeviceMapper } from "../../core/device-mapper.js";
import { MemoryLogger } from "../../core/logger.js";
import { createDeviceMapper } from "../../index.js";
import { crossCheckAtMark } from "./cross-check.js";
import { CrashPointChecker } from "./crash-point.js";
import { CrashClock, type Jitter, NamedDevices } from "./devices.js";
import { IncrementalReplay } from "./incremental-replay.js";
import { readMappedLog } from "./log-mapping.js";
import { LoggedDevices, existedAt } from "./logged-devices.js";
import { decideMerges } from "./merge.js";
import type { CrashRunOptions } from "./options.js";
import { type CrashFailure, type CrashRunReport, type RunStats, newRunStats } from "./report.js";
import { Rng } from "../rng.js";
import { type CrashPoint, scheduleCrashPoints } from "./schedule.js";
import { StackModel } from "./stack-model.js";
import { type OpRecord, Workload } from "./workload.js";

export { leakProblems } from "./cow-checks.js";
export type { CrashRunOptions } from "./options.js";
export type { CrashFailure, CrashRunReport } from "./report.js";

export async function runCrashHarness(options: CrashRunOptions): Promise<CrashRunReport> {
  return new CrashRun(options).run();
}

interface CheckResult {
  points: number;
  flushPoints: number;
  randomPoints: number;
  failedPoints: number;
  details: CrashFailure[];
  crossChecks: number;
}

class CrashRun {
  private readonly rng: Rng;
  private readonly clock = new CrashClock();
  private readonly backing = new NamedDevices();
  private readonly logger = new MemoryLogger(true);
  private readonly dm: DeviceMapper;
  private readonly model: StackModel;
  private readonly logged: LoggedDevices;
  private readonly stats: RunStats = newRunStats();
  private readonly workloadProblems: string[] = [];
  private readonly progress: (line: string) => void;

  constructor(private readonly options: CrashRunOptions) {
    this.rng = new Rng(options.seed);
    const jitterRng = this.rng.fork();
    const probability = options.jitter ?? 0.3;
    const jitter: Jitter | null =
      probability > 0 ? { probability, int: (n) => jitterRng.int(n), chance: (p) => jitterRng.chance(p) } : null;
    this.progress = options.progress ?? (() => {});
    this.dm = createDeviceMapper({ backing: this.backing, logger: this.logger, targets: options.targets ?? [] });
    this.model = new StackModel(options.originSectors ?? 2048);
    this.logged = new LoggedDevices(this.backing, this.clock, jitter);
  }

  async run(): Promise<CrashRunReport> {
    const { seed, ops } = this.options;
    const started = performance.now();
    const reused = this.options.reusedCow ? ", reused COW devices" : "";
    this.progress(`crash runner: seed ${seed}, ${ops} operations, origin ${this.model.originSectors} sectors${reused}`);
    const merges = await decideMerges(this.dm, this.options.merges);
    const problem = (text: string) => this.workloadProblems.push(text);
    const workload = new Workload(
      this.rng,
      this.clock,
      this.dm,
      this.model,
      this.logged,
      {
        maxSnapshots: this.options.maxSnapshots ?? 3,
        snapshotTarget: this.options.snapshotTarget ?? "snapshot",
        mergeTarget: this.options.mergeTarget ?? "snapshot-merge",
        mergesEnabled: merges.enabled,
        reusedCow: this.options.reusedCow ?? false,
      },
      this.stats,
      problem,
    );
    await workload.setUp();
    for (let index = 0; index < ops; index++) await workload.step(index);
    const endOfWorkload = this.clock.tick();
    await workload.tearDown();
    for (const record of this.logger.records) {
      if (record.level === "error") {
        problem(`engine error during the workload: ${record.msg} ${JSON.stringify(record.fields ?? {})}`);
      }
    }
    for (const history of [this.model.origin, ...this.model.snapshots.map((snapshot) => snapshot.history)]) {
      history.finalize();
      const overlap = history.overlapping();
      if (overlap) problem(`runner bug, the model cannot order these writes: ${overlap}`);
    }
    const replays = await this.readLogs();
    const workloadDone = performance.now();
    const { writes, flushes, snapshotsCreated, logEntries } = this.stats;
    this.progress(
      `workload done: ${writes} writes, ${flushes} flushes, ${snapshotsCreated} snapshots, ` +
        `${logEntries} log entries (${Math.round(workloadDone - started)} ms)`,
    );
    const result = await this.checkAll(replays, workload, endOfWorkload);
    for (const replay of replays) this.stats.reorderedSectors += replay.reorderedSectors.size;
    const finished = performance.now();
    return {
      seed,
      ops,
      pointsChecked: result.points,
      flushPoints: result.flushPoints,
      randomPoints: result.randomPoints,
      failures: result.failedPoints + this.workloadProblems.length,
      failedPoints: result.failedPoints,
      failureDetails: result.details,
      workloadProblems: this.workloadProblems.slice(0, 50),
      crossChecks: result.crossChecks,
      merges: { enabled: merges.enabled, note: merges.note, done: workload.mergesDone },
      stats: this.stats,
      elapsedMs: {
        workload: Math.round(workloadDone - started),
        check: Math.round(finished - workloadDone),
        total: Math.round(finished - started),
      },
    };
  }

  /** Every logged device's log, mapped to clock stamps, with an incremental replay at moment 0. */
  private async readLogs(): Promise<IncrementalReplay[]> {
    const replays: IncrementalReplay[] = [];
    for (const device of this.logged.list) {
      const log = await readMappedLog(device);
      this.stats.earlierDurable += log.earlierDurable;
      this.stats.logEntries += log.entries.length;
      replays.push(new IncrementalReplay(device, log.entries, log.reorderedSectors));
    }
    return replays;
  }

  private async checkAll(
    replays: IncrementalReplay[],
    workload: Workload,
    endOfWorkload: number,
  ): Promise<CheckResult> {
    const replayDm = createDeviceMapper({ backing: this.backing, logger: new MemoryLogger(false) });
    const points = scheduleCrashPoints({
      replays,
      ops: workload.ops,
      markStamps: workload.markStamps,
      endOfWorkload,
      rng: this.rng.fork(),
      randomPoints: this.options.randomPoints,
      minPoints: this.options.minPoints,
      crossCheckEvery: this.options.crossCheckEvery,
    });
    const checker = new CrashPointChecker(
      replayDm,
      this.backing,
      this.model,
      replays,
      this.options.postRecovery ?? true,
      this.stats,
    );
    const result: CheckResult = {
      points: 0,
      flushPoints: 0,
      randomPoints: 0,
      failedPoints: 0,
      details: [],
      crossChecks: 0,
    };
    const maxReported = this.options.maxReported ?? 10;
    for (const point of points) {
      for (const replay of replays) await replay.advanceTo(point.at);
      let problems: string[];
      if (point.kind === "cross-check") {
        problems = await crossCheckAtMark(replays, point.source);
        result.crossChecks++;
      } else {
        problems = await checker.check(point, result.points);
        result.points++;
        if (point.kind === "random") result.randomPoints++;
        else result.flushPoints++;
      }
      if (problems.length > 0) {
        result.failedPoints++;
        if (result.details.length < maxReported) {
          result.details.push({ point: this.describePoint(point, result.points, replays, workload.ops), problems });
        }
      }
      if (result.points % 500 === 0 && point.kind !== "cross-check") {
        this.progress(`  ${result.points}/${points.length} crash points checked`);
      }
    }
    await replayDm.close();
    return result;
  }

  private describePoint(point: CrashPoint, pointNumber: number, replays: IncrementalReplay[], ops: OpRecord[]): string {
    let op: OpRecord | undefined;
    for (const candidate of ops) if (candidate.at <= point.at) op = candidate;
    const during = op ? `during op ${op.index} (${op.desc})` : "before the first operation";
    const cuts = replays
      .filter((replay) => existedAt(replay.device, point.at))
      .map((replay) => {
        const { device, appliedCount, entries, unflushed } = replay;
        return `${device.key} ${appliedCount}/${entries.length} durable + ${unflushed.size} unflushed`;
      })
      .join(", ");
    return (
      `crash point ${pointNumber} (${point.kind}: ${point.source}; t=${point.at}, ${during}; ` +
      `log entries: ${cuts}; seed ${this.options.seed})`
    );
  }
}
