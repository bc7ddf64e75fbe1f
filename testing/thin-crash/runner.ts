/**
 * The thin crash runner: a seeded workload on a thin pool whose metadata and data devices are
 * recorded with log-writes, then the pool reactivated and checked at every flush/FUA point and at
 * random moments (docs/testing.md, "Crash runs of thin pools"). The log, the crash points and the
 * incremental replays are the snapshot runner's (testing/crash/); the workload, the model and the
 * checks are the pool's own.
 */
import type { DeviceMapper } from "../../core/device-mapper.js";
import { MemoryLogger } from "../../core/logger.js";
import type { TargetClass } from "../../core/target.js";
import { createDeviceMapper } from "../../index.js";
import { builtinTargets } from "../../targets/index.js";
import { ThinPoolTarget } from "../../targets/thin/pool-target.js";
import { ThinTarget } from "../../targets/thin/thin-target.js";
import { crossCheckAtMark } from "../crash/cross-check.js";
import { CrashClock, type Jitter, NamedDevices } from "../crash/devices.js";
import { IncrementalReplay } from "../crash/incremental-replay.js";
import { readMappedLog } from "../crash/log-mapping.js";
import { LoggedDevices } from "../crash/logged-devices.js";
import type { CrashFailure } from "../crash/report.js";
import { type CrashPoint, scheduleCrashPoints } from "../crash/schedule.js";
import type { OpRecord } from "../crash/workload.js";
import { Rng } from "../rng.js";
import { BROKEN_POOLS } from "./broken-pools.js";
import { ManualClock } from "./clock.js";
import { ThinCrashPointChecker } from "./crash-point.js";
import { ThinPoolModel } from "./model.js";
import { type ThinCrashRunOptions, type ThinCrashRunReport, type ThinRunStats, newThinRunStats } from "./report.js";
import { ThinCheckTool, findThinCheck } from "./thin-check-tool.js";
import { ThinWorkload } from "./workload.js";

export { BROKEN_POOLS } from "./broken-pools.js";
export type { ThinCrashRunOptions, ThinCrashRunReport } from "./report.js";

export async function runThinCrashHarness(options: ThinCrashRunOptions): Promise<ThinCrashRunReport> {
  return new ThinCrashRun(options).run();
}

/** thin-pool and thin, unless the build already lists them. */
function thinTargets(extra: TargetClass[]): TargetClass[] {
  return [...(builtinTargets.includes(ThinPoolTarget) ? [] : [ThinPoolTarget, ThinTarget]), ...extra];
}

class ThinCrashRun {
  private readonly rng: Rng;
  private readonly clock = new CrashClock();
  private readonly timers = new ManualClock();
  private readonly backing = new NamedDevices();
  private readonly logger = new MemoryLogger(true);
  private readonly dm: DeviceMapper;
  private readonly model: ThinPoolModel;
  private readonly logged: LoggedDevices;
  private readonly stats: ThinRunStats = newThinRunStats();
  private readonly workloadProblems: string[] = [];
  private readonly progress: (line: string) => void;
  private readonly poolTarget: string;
  /** The pool table's feature arguments: "" or " <n> <feature>...". */
  private readonly features: string;

  constructor(private readonly options: ThinCrashRunOptions) {
    this.rng = new Rng(options.seed);
    const jitterRng = this.rng.fork();
    const probability = options.jitter ?? 0.3;
    const jitter: Jitter | null =
      probability > 0 ? { probability, int: (n) => jitterRng.int(n), chance: (p) => jitterRng.chance(p) } : null;
    this.progress = options.progress ?? (() => {});
    let extra: TargetClass[] = [];
    this.poolTarget = "thin-pool";
    const features = options.poolFeatures ?? [];
    this.features = features.length ? ` ${features.length} ${features.join(" ")}` : "";
    if (options.broken !== undefined) {
      const broken = BROKEN_POOLS[options.broken];
      if (!broken) throw new Error(`no broken pool "${options.broken}" (${Object.keys(BROKEN_POOLS).join(", ")})`);
      extra = [broken.target];
      this.poolTarget = broken.type;
    }
    this.dm = createDeviceMapper({
      backing: this.backing,
      logger: this.logger,
      clock: this.timers,
      targets: thinTargets(extra),
    });
    const volumeSectors = options.volumeSectors ?? 2048;
    const blockSize = options.blockSize ?? 128;
    if (volumeSectors % blockSize !== 0) throw new Error("the volume size must be a multiple of the block size");
    this.model = new ThinPoolModel(volumeSectors, blockSize, features.includes("skip_block_zeroing"));
    this.logged = new LoggedDevices(this.backing, this.clock, jitter);
  }

  async run(): Promise<ThinCrashRunReport> {
    const { seed, ops } = this.options;
    const started = performance.now();
    this.progress(
      `thin crash runner: seed ${seed}, ${ops} operations, ${this.poolTarget}, ` +
        `volumes of ${this.model.volumeSectors} sectors in blocks of ${this.model.blockSize}` +
        `${this.features ? `, features${this.features}` : ""}`,
    );
    const problem = (text: string) => this.workloadProblems.push(text);
    const workload = new ThinWorkload(
      this.rng,
      this.clock,
      this.timers,
      this.dm,
      this.model,
      this.logged,
      {
        poolTarget: this.poolTarget,
        maxVolumes: this.options.maxVolumes ?? 4,
        dataBlocks: this.options.dataBlocks ?? 256,
        features: this.features,
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
    for (const volume of this.model.volumes) {
      volume.history.finalize();
      const overlap = volume.history.overlapping();
      if (overlap) problem(`runner bug, the model cannot order these writes: ${overlap}`);
    }
    const replays: IncrementalReplay[] = [];
    for (const device of this.logged.list) {
      const log = await readMappedLog(device);
      this.stats.earlierDurable += log.earlierDurable;
      this.stats.logEntries += log.entries.length;
      replays.push(new IncrementalReplay(device, log.entries, log.reorderedSectors));
    }
    const workloadDone = performance.now();
    const { writes, discards, flushes, snapshotsCreated, deletes, logEntries } = this.stats;
    this.progress(
      `workload done: ${writes} writes, ${discards} discards, ${flushes} flushes, ${snapshotsCreated} snapshots, ` +
        `${deletes} deletes, ${logEntries} log entries (${Math.round(workloadDone - started)} ms)`,
    );
    const report = await this.checkAll(replays, workload, endOfWorkload);
    for (const replay of replays) this.stats.reorderedSectors += replay.reorderedSectors.size;
    const finished = performance.now();
    report.failures = report.failedPoints + this.workloadProblems.length;
    report.workloadProblems = this.workloadProblems.slice(0, 50);
    report.elapsedMs = {
      workload: Math.round(workloadDone - started),
      check: Math.round(finished - workloadDone),
      total: Math.round(finished - started),
    };
    return report;
  }

  private async checkAll(
    replays: IncrementalReplay[],
    workload: ThinWorkload,
    endOfWorkload: number,
  ): Promise<ThinCrashRunReport> {
    const replayDm = createDeviceMapper({
      backing: this.backing,
      logger: new MemoryLogger(false),
      clock: new ManualClock(),
      targets: thinTargets([]),
    });
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
    const every = this.options.thinCheckEvery ?? 0;
    const executable = every > 0 ? findThinCheck() : null;
    const thinCheck = executable ? new ThinCheckTool(executable) : null;
    const [metaReplay, dataReplay] = replays;
    const checker = new ThinCrashPointChecker(
      replayDm,
      this.backing,
      this.model,
      metaReplay!,
      dataReplay!,
      {
        dataSectors: workload.dataSectors,
        poolReadyAt: workload.poolReadyAt,
        postRecovery: this.options.postRecovery ?? true,
        leaksFail: this.options.leaksFail ?? true,
        features: this.features,
      },
      this.stats,
      thinCheck,
    );
    const report: ThinCrashRunReport = {
      seed: this.options.seed,
      ops: this.options.ops,
      pointsChecked: 0,
      flushPoints: 0,
      randomPoints: 0,
      metadataChecks: 0,
      thinChecks: 0,
      thinCheckSkipped:
        every > 0 && !thinCheck ? "thin_check not installed (Debian: apt-get install thin-provisioning-tools)" : null,
      postRecoveryChecks: 0,
      leakPoints: 0,
      volumesChecked: 0,
      failures: 0,
      failedPoints: 0,
      failureDetails: [],
      workloadProblems: [],
      crossChecks: 0,
      stats: this.stats,
      elapsedMs: { workload: 0, check: 0, total: 0 },
    };
    const maxReported = this.options.maxReported ?? 10;
    try {
      for (const point of points) {
        for (const replay of replays) await replay.advanceTo(point.at);
        let problems: string[];
        if (point.kind === "cross-check") {
          problems = await crossCheckAtMark(replays, point.source);
          report.crossChecks++;
        } else {
          const result = await checker.check(
            point,
            report.pointsChecked,
            every > 0 && report.pointsChecked % every === 0,
          );
          problems = result.problems;
          report.pointsChecked++;
          if (point.kind === "random") report.randomPoints++;
          else report.flushPoints++;
          if (result.metadataChecked) report.metadataChecks++;
          if (result.thinChecked) report.thinChecks++;
          if (result.postRecovery) report.postRecoveryChecks++;
          report.volumesChecked += result.volumes;
          if (result.leaks > 0) report.leakPoints++;
        }
        if (problems.length > 0) {
          report.failedPoints++;
          if (report.failureDetails.length < maxReported) {
            report.failureDetails.push(this.failure(point, report.pointsChecked, replays, workload.ops, problems));
          }
        }
        if (report.pointsChecked % 500 === 0 && point.kind !== "cross-check") {
          this.progress(`  ${report.pointsChecked}/${points.length} crash points checked`);
        }
      }
    } finally {
      thinCheck?.close();
      await replayDm.close();
    }
    return report;
  }

  private failure(
    point: CrashPoint,
    pointNumber: number,
    replays: IncrementalReplay[],
    ops: OpRecord[],
    problems: string[],
  ): CrashFailure {
    let op: OpRecord | undefined;
    for (const candidate of ops) if (candidate.at <= point.at) op = candidate;
    const during = op ? `during op ${op.index} (${op.desc})` : "before the first operation";
    const cuts = replays
      .map((replay) => {
        const { device, appliedCount, entries, unflushed } = replay;
        return `${device.key} ${appliedCount}/${entries.length} durable + ${unflushed.size} unflushed`;
      })
      .join(", ");
    return {
      point:
        `crash point ${pointNumber} (${point.kind}: ${point.source}; t=${point.at}, ${during}; ` +
        `log entries: ${cuts}; seed ${this.options.seed})`,
      problems,
    };
  }
}
