/**
 * Which moments the runner crashes at: every FLUSH or FUA entry of any device (no unflushed write
 * kept), random moments at plain-write completions (a random share of the unflushed writes kept),
 * and cross-checks at some marks. Sorted by time, so the incremental replays only move forward.
 */
import type { IncrementalReplay } from "./incremental-replay.js";
import type { Rng } from "../rng.js";
import type { OpRecord } from "./workload.js";

export interface CrashPoint {
  /** Clock stamp of the crash. */
  at: number;
  kind: "flush" | "fua" | "random" | "cross-check";
  /** Which device's entry made the point (flush/fua) or which mark (cross-check). */
  source: string;
  /** Probability of keeping each unflushed write (random points). */
  keep: number;
  /** Seed of the point's own generator (random points). */
  seed: number;
}

export interface ScheduleInput {
  replays: IncrementalReplay[];
  ops: OpRecord[];
  markStamps: Map<string, number>;
  /** Clock stamp after the last operation: later entries (teardown) make no points. */
  endOfWorkload: number;
  /** Draws the random points. */
  rng: Rng;
  /** Random points (default ops / 2), at least enough to reach minPoints (default 0). */
  randomPoints: number | undefined;
  minPoints: number | undefined;
  /** Cross-check every this many operations, and at the last (default 50; 0: never). */
  crossCheckEvery: number | undefined;
}

export function scheduleCrashPoints(input: ScheduleInput): CrashPoint[] {
  const { endOfWorkload, rng } = input;
  const points: CrashPoint[] = [];
  const plainCompletions: number[] = [];
  for (const replay of input.replays) {
    for (const mapped of replay.entries) {
      if (mapped.durableAt > endOfWorkload) continue;
      if (mapped.kind === "flush" || mapped.kind === "fua") {
        const source = `${replay.device.key} entry ${mapped.entry.index}`;
        points.push({ at: mapped.durableAt, kind: mapped.kind, source, keep: 0, seed: 0 });
      }
    }
    for (const mapped of replay.entries) {
      if (mapped.kind === "plain" && mapped.completedAt <= endOfWorkload) plainCompletions.push(mapped.completedAt);
    }
  }
  let randomCount = plainCompletions.length === 0 ? 0 : (input.randomPoints ?? Math.round(input.ops.length / 2));
  if (plainCompletions.length > 0) randomCount = Math.max(randomCount, (input.minPoints ?? 0) - points.length);
  for (let i = 0; i < randomCount; i++) {
    const at = rng.pick(plainCompletions);
    const keep = rng.weighted<number>([
      [0.5, 3],
      [1, 1],
      [0.2, 1],
    ]);
    const source = `random, keeping ${Math.round(keep * 100)}% of the unflushed writes`;
    points.push({ at, kind: "random", source, keep, seed: rng.u32() });
  }
  const every = input.crossCheckEvery ?? 50;
  if (every > 0) {
    for (const op of input.ops) {
      if (op.index % every === every - 1 || op.index === input.ops.length - 1) {
        points.push({
          at: input.markStamps.get(`op${op.index}`)!,
          kind: "cross-check",
          source: `op${op.index}`,
          keep: 0,
          seed: 0,
        });
      }
    }
  }
  return points.sort((a, b) => a.at - b.at);
}
