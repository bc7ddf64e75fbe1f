import { describe, expect, it } from "vitest";
import { runThinBenchmark, SNAPSHOT_COUNTS, thinRestoreMissing, thinRows } from "../../bench/thin.js";
import { skipOrFail } from "../support/requirements.js";

// The thin benchmarks (bench/thin.ts) end to end at a tiny size; says nothing about speed. The
// activation row needs thin_restore (thin-provisioning-tools, installed by .ci/run).
const skip = thinRestoreMissing();

describe("thin benchmark smoke", () => {
  const skipped = skipOrFail("thin benchmark smoke", skip);

  it.skipIf(skipped)("measures every row with positive figures", async () => {
    const r = await runThinBenchmark({
      volumeBytes: 1024 * 1024,
      repetitions: 1,
      flushVolumeBytes: 1024 * 1024,
      mappings: 10_000,
      activations: 1,
      touchReads: 1000,
    });
    expect(r.firstWrite.map((f) => `${f.kind} ${f.snapshots}`)).toEqual([
      ...SNAPSHOT_COUNTS.map((n) => `thin ${n}`),
      ...SNAPSHOT_COUNTS.map((n) => `snapshot-origin ${n}`),
    ]);
    for (const f of r.firstWrite) expect(f.seconds > 0 && f.withFlush[0]! >= f.reps[0]!).toBe(true);
    // 16 blocks of 64 KiB, each provisioned; FUA writes commit at least once, plain writes once at the flush.
    expect(r.flushes.map((f) => f.blocks)).toEqual([16, 16, 16]);
    expect(r.flushes[0]!.commits).toBeGreaterThan(0);
    expect(r.flushes[2]!.commits).toBeGreaterThanOrEqual(1);
    if ("skipped" in r.activation) throw new Error(r.activation.skipped);
    expect(r.activation.seconds[0]).toBeGreaterThan(0);
    expect(r.activation.touchedBytesPerMapping[0]).toBeGreaterThan(0);
    const judged = thinRows(r).filter((x) => x.goal);
    expect(judged.length).toBe(4);
    expect(judged.every((x) => x.result === "PASS" || x.result === "MISS")).toBe(true);
  });
});
