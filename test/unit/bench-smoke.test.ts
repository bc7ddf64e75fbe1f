import { describe, expect, it } from "vitest";
import { main } from "../../bench/run.js";
import { runSnapshotBenchmark, snapshotRows } from "../../bench/snapshot.js";

// Runs the micro-benchmark end to end on a tiny file; says nothing about speed.
describe("micro-benchmark smoke", () => {
  it("runs every workload in quick mode and reports positive figures", async () => {
    const printed: string[] = [];
    const sink = (text: string) => void printed.push(text);
    const result = await main(["--quick", "--size", "2M", "--seconds", "0.05", "--no-snapshot"], { stdout: sink, stderr: sink });
    expect(result.rows.map((r) => r.workload.name)).toEqual([
      "4 KiB random read",
      "4 KiB random write",
      "1 MiB sequential read",
      "1 MiB sequential write",
    ]);
    for (const row of result.rows) {
      for (const side of [row.reference, row.udm]) {
        expect(side.reps).toHaveLength(3);
        expect(side.mibps).toBeGreaterThan(0);
        expect(side.iops).toBeGreaterThan(0);
      }
      expect(row.ratio).toBeGreaterThan(0);
    }
    expect(printed.join("\n")).toMatch(/\| 4 KiB random read +\| +16 \|/);
  });
});

// The snapshot benchmarks end to end at a tiny size; says nothing about speed.
describe("snapshot benchmark smoke", () => {
  it("measures every row with positive figures", async () => {
    const r = await runSnapshotBenchmark({ originBytes: 1024 * 1024, repetitions: 1, rewriteRounds: 1, flushOriginBytes: 1024 * 1024, exceptions: 20_000, reactivations: 1 });
    expect(r.throughput.map((t) => t.config)).toEqual(["linear", "1 snapshot", "3 snapshots"]);
    for (const t of r.throughput) expect(t.first.mibps > 0 && t.rewrite.mibps > 0).toBe(true);
    expect(r.throughput[1]!.exceptions).toBe(256);
    expect(r.flushes.map((f) => f.exceptions)).toEqual([256, 256]);
    expect(r.reactivateSeconds).toBeGreaterThan(0);
    expect(r.tableStorageBytesPerException).toBeGreaterThan(0);
    expect(snapshotRows(r).filter((x) => x.goal && x.goal !== "(reference)").map((x) => x.result).every((v) => v === "PASS" || v === "MISS")).toBe(true);
  });
});
