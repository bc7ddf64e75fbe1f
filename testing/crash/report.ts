/** What a crash-runner run reports, and the per-point problem list its checks fill. */

export interface CrashFailure {
  point: string;
  problems: string[];
}

export interface RunStats {
  writes: number;
  reads: number;
  flushes: number;
  suspends: number;
  snapshotsCreated: number;
  snapshotsRemoved: number;
  logEntries: number;
  unflushedKept: number;
  unflushedDropped: number;
  /** Sectors where log order and completion order disagreed (see applyEntry in incremental-replay.ts). */
  reorderedSectors: number;
  /** Plain writes made durable by a flush that log-writes did not give them to (see log-mapping.ts). */
  earlierDurable: number;
}

export function newRunStats(): RunStats {
  return {
    writes: 0,
    reads: 0,
    flushes: 0,
    suspends: 0,
    snapshotsCreated: 0,
    snapshotsRemoved: 0,
    logEntries: 0,
    unflushedKept: 0,
    unflushedDropped: 0,
    reorderedSectors: 0,
    earlierDurable: 0,
  };
}

export interface CrashRunReport {
  seed: number;
  ops: number;
  pointsChecked: number;
  flushPoints: number;
  randomPoints: number;
  /** Failing crash points plus workload problems (a wrong live read, a failed I/O, an engine error). */
  failures: number;
  failedPoints: number;
  failureDetails: CrashFailure[];
  workloadProblems: string[];
  crossChecks: number;
  merges: { enabled: boolean; note: string; done: number };
  stats: RunStats;
  elapsedMs: { workload: number; check: number; total: number };
}

/** The problems found at one crash point; at most `limit` of one kind (key), then one "more" line. */
export class Problems {
  readonly list: string[] = [];
  private readonly countByKey = new Map<string, number>();

  add(key: string, text: string, limit = 4): void {
    const count = (this.countByKey.get(key) ?? 0) + 1;
    this.countByKey.set(key, count);
    if (count <= limit) this.list.push(text);
    else if (count === limit + 1) this.list.push(`${key}: more problems like these left out`);
  }

  get empty(): boolean {
    return this.list.length === 0;
  }
}
