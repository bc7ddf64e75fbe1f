/** What a thin crash run is asked to do (`runThinCrashHarness`, `npm run crash -- --target thin`) and what it reports. */
import type { CrashFailure, RunStats } from "../crash/report.js";

export interface ThinCrashRunOptions {
  /** Workload operations. */
  ops: number;
  seed: number;
  /** Size of every thin volume in sectors (default 2048: 16 blocks). */
  volumeSectors?: number;
  /** The pool's data block size in sectors (default 128, the kernel's smallest). */
  blockSize?: number;
  /** Data device size in blocks (default 256; never filled by the workload). */
  dataBlocks?: number;
  /** Features of the pool's table, e.g. ["no_discard_passdown"] (default none). */
  poolFeatures?: string[];
  /** Thin volumes (thin devices and snapshots) alive at once, at most (default 4). */
  maxVolumes?: number;
  /** Crash points at random moments, with random unflushed writes kept (default ops / 2). */
  randomPoints?: number;
  /** Add random points until at least this many crash points are checked (default 0). */
  minPoints?: number;
  /** Probability that a bio to a RAM disk completes a few event-loop turns late (default 0.3). */
  jitter?: number;
  /**
   * Run thin_check (thin-provisioning-tools) on the metadata at every this many crash points
   * (default 0: never; 1: every point). Reported as skipped when thin_check is not installed.
   */
  thinCheckEvery?: number;
  /** At random points, write to the recovered volumes, flush, reactivate and read them again (default true). */
  postRecovery?: boolean;
  /** Compare replayLog(--end-mark) with the incremental replay every this many operations (default 50; 0: never). */
  crossCheckEvery?: number;
  /**
   * A data block the space map counts more often than the mappings refer to (a leak) fails the
   * point (default true); false only counts such points (leakPoints).
   */
  leaksFail?: boolean;
  /** A deliberately broken pool (broken-pools.ts) for the workload's table instead of thin-pool. */
  broken?: string;
  /** Failing crash points described in the report, at most (default 10). */
  maxReported?: number;
  progress?: (line: string) => void;
}

/** The snapshot runner's figures (snapshotsRemoved: snapshots deleted), and the thin workload's own. */
export interface ThinRunStats extends RunStats {
  discards: number;
  thinsCreated: number;
  /** Volumes deleted, snapshots or not. */
  deletes: number;
  /** Times the pool's periodic commit was made to fire with I/O in flight. */
  periodicCommits: number;
}

export function newThinRunStats(): ThinRunStats {
  return {
    writes: 0,
    discards: 0,
    reads: 0,
    flushes: 0,
    suspends: 0,
    thinsCreated: 0,
    snapshotsCreated: 0,
    snapshotsRemoved: 0,
    deletes: 0,
    periodicCommits: 0,
    logEntries: 0,
    unflushedKept: 0,
    unflushedDropped: 0,
    reorderedSectors: 0,
    earlierDurable: 0,
  };
}

export interface ThinCrashRunReport {
  seed: number;
  ops: number;
  pointsChecked: number;
  flushPoints: number;
  randomPoints: number;
  /** Points whose metadata check.ts checked (every point), and thin_check ran on. */
  metadataChecks: number;
  thinChecks: number;
  /** Why thin_check did not run, when it was asked for (not installed). */
  thinCheckSkipped: string | null;
  /** Points where post-recovery writes and a second activation were checked. */
  postRecoveryChecks: number;
  /** Points whose metadata leaked data blocks, when leaks do not fail points (leaksFail false). */
  leakPoints: number;
  /** Volumes brought back and read, over all points. */
  volumesChecked: number;
  /** Failing crash points plus workload problems (a wrong live read, a failed I/O, an engine error). */
  failures: number;
  failedPoints: number;
  failureDetails: CrashFailure[];
  workloadProblems: string[];
  crossChecks: number;
  stats: ThinRunStats;
  elapsedMs: { workload: number; check: number; total: number };
}
