import { describe, expect, it } from "vitest";
import { main } from "../../bench/run.js";

// Runs the micro-benchmark end to end on a tiny file; says nothing about speed.
describe("micro-benchmark smoke", () => {
  it("runs every workload in quick mode and reports positive figures", async () => {
    const printed: string[] = [];
    const sink = (text: string) => void printed.push(text);
    const result = await main(["--quick", "--size", "2M", "--seconds", "0.05"], { stdout: sink, stderr: sink });
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
