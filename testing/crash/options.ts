/** What a crash-runner run is asked to do (`runCrashHarness`, `npm run crash`). */
import type { TargetClass } from "../../core/target.js";

export interface CrashRunOptions {
  /** Workload operations. */
  ops: number;
  seed: number;
  /** Origin size in sectors (default 2048). */
  originSectors?: number;
  /** Snapshots alive at once, at most (default 3). */
  maxSnapshots?: number;
  /** Crash points at random moments, with random unflushed writes kept (default ops / 2). */
  randomPoints?: number;
  /** Add random points until at least this many crash points are checked (default 0). */
  minPoints?: number;
  /** Target type of the workload's snapshot tables (default "snapshot"); reactivation always uses "snapshot". */
  snapshotTarget?: string;
  /** Target type of the workload's merge tables (default "snapshot-merge"); reactivation uses "snapshot-merge". */
  mergeTarget?: string;
  /** Extra target classes for the workload's device mapper (e.g. a deliberately broken snapshot). */
  targets?: TargetClass[];
  /**
   * Merge snapshots back into the origin: true (required), false, or "auto" (default): when the
   * registry lists snapshot-merge and a self-test passes.
   */
  merges?: boolean | "auto";
  /** Probability that a bio to a data RAM disk completes a few event-loop turns late (default 0.3). */
  jitter?: number;
  /**
   * Reused COW devices (default false): each holds garbage and an older store's areas and
   * records under a zeroed header before its snapshot is created (reused-cow.ts), and the
   * workload adds origin sweeps (long runs of writes) so that metadata areas fill up.
   */
  reusedCow?: boolean;
  /** At random points, write to the recovered devices and reactivate them again (default true). */
  postRecovery?: boolean;
  /** Compare replayLog(--end-mark) with the incremental replay every this many operations (default 50; 0: never). */
  crossCheckEvery?: number;
  /** Failing crash points described in the report, at most (default 10). */
  maxReported?: number;
  /** Progress lines (seed, phases). */
  progress?: (line: string) => void;
}
