// The counting target under udm's test kit: RAM disks, a seeded scheduler and the crash check.
// It tests the build (npm test runs tsc first): vitest's transform cannot lower standard decorators.
import { describe, expect, it } from "vitest";
import { ControlledDevice, SeededScheduler, pattern, runTargetCrashCheck, testMapper } from "udm/testing";
import { CountingTarget } from "../dist/index.js";

describe("counting", () => {
  it("maps like linear at its offset and counts completed I/O", async () => {
    const { dm, backing } = testMapper({ targets: [CountingTarget] });
    backing.memory("disk", 4096);
    await dm.create("c", { table: "0 2048 counting disk 1024" });
    const h = dm.open("c");
    await h.write(8, pattern(1, 4096));
    expect((await h.read(8, 8)).equals(pattern(1, 4096))).toBe(true);
    expect(dm.status("c")[0]!.params).toBe("reads 1 writes 1");
    expect(dm.tableText("c")).toBe("0 2048 counting disk 1024\n");
    await dm.message("c", 0, "reset");
    expect(dm.status("c")[0]!.params).toBe("reads 0 writes 0");
    await h.close();
  });

  it("counts each write once, in whatever order the disk completes them (20 seeded orders)", async () => {
    for (let seed = 1; seed <= 20; seed++) {
      const { dm, backing } = testMapper({ targets: [CountingTarget] });
      const disk = backing.add("disk", new ControlledDevice(4096, { name: "disk" }));
      await dm.create("c", { table: "0 2048 counting disk 0" });
      const h = dm.open("c");
      const writes = [0, 8, 16, 24].map((sector) => () => h.write(sector, pattern(sector, 4096)));
      await new SeededScheduler([disk], seed).run(() => Promise.all(writes.map((w) => w())));
      expect(dm.status("c")[0]!.params, `seed ${seed}`).toBe("reads 0 writes 4");
      await h.close();
    }
  });

  it("loses no durable write when the power fails", async () => {
    const report = await runTargetCrashCheck({
      targets: [CountingTarget],
      table: "0 1024 counting disk 0",
      devices: { disk: 1024 },
      seed: 1,
    });
    expect(report.problems).toEqual([]);
  });
});
