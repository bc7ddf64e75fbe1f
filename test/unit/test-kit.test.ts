/**
 * udm/testing, the kit target authors test with: the seeded scheduler replays an interleaving
 * exactly and explores others, and the target crash check passes a correct target and catches
 * the usual mistakes of a new one (flushes or FUA not passed down).
 */
import { describe, expect, it } from "vitest";
import { type Bio, BioFlags, type DeviceLookup, MapResult, Services, Target, target } from "../../index.js";
import { ControlledDevice, SeededScheduler, pattern, runTargetCrashCheck, testMapper } from "../../testing/index.js";

/** Four concurrent writes through linear; the order in which they reached the disk. */
async function completionOrder(seed: number): Promise<{ order: number[]; steps: number }> {
  const { dm, backing } = testMapper();
  const disk = backing.add("disk", new ControlledDevice(1024, { name: "disk" }));
  await dm.create("lin", { table: "0 512 linear disk 0" });
  const h = dm.open("lin");
  const scheduler = new SeededScheduler([disk], seed);
  await scheduler.run(() => Promise.all([0, 8, 16, 24].map((s) => h.write(s, pattern(s, 4096)))));
  await h.close();
  return { order: disk.log.map((r) => r.sector), steps: scheduler.steps.length };
}

describe("SeededScheduler", () => {
  it("replays the same interleaving for a seed and explores others across seeds", async () => {
    const first = await completionOrder(11);
    expect(first.steps).toBe(4);
    expect(await completionOrder(11)).toEqual(first);
    const orders = new Set<string>();
    for (let seed = 1; seed <= 20; seed++) orders.add((await completionOrder(seed)).order.join(","));
    expect(orders.size).toBeGreaterThan(5);
  });

  it("fails picked bios with the chosen status and lets the work see the errors", async () => {
    const { dm, backing } = testMapper();
    const disk = backing.add("disk", new ControlledDevice(64, { name: "disk" }));
    await dm.create("lin", { table: "0 64 linear disk 0" });
    const h = dm.open("lin");
    const scheduler = new SeededScheduler([disk], 3, { failProbability: 1, failStatus: "ENOSPC" });
    await expect(scheduler.run(() => h.write(0, pattern(1, 512)))).rejects.toMatchObject({ status: "ENOSPC" });
    expect(scheduler.steps).toEqual([{ action: "fail", device: "disk", bio: expect.stringContaining("write") }]);
    await h.close();
  });
});

/** linear with knobs for the mistakes a new target makes. */
function passThrough(name: string, mistake: "none" | "no flush" | "drops FUA") {
  @target({ name, version: [1, 0, 0], inject: [Services.DeviceLookup] })
  class PassThrough extends Target {
    private dev!: Awaited<ReturnType<DeviceLookup["get"]>>;
    constructor(private readonly devices: DeviceLookup) {
      super();
    }
    async ctr(args: string[]): Promise<void> {
      this.dev = await this.devices.get(args[0]!);
      this.numFlushBios = mistake === "no flush" ? 0 : 1;
    }
    map(bio: Bio): MapResult {
      bio.device = this.dev;
      if (mistake === "drops FUA") bio.flags &= ~BioFlags.FUA;
      return MapResult.REMAPPED;
    }
  }
  return PassThrough;
}

describe("runTargetCrashCheck", () => {
  const check = (cls: ReturnType<typeof passThrough>, seed: number) =>
    runTargetCrashCheck({
      targets: [cls],
      table: "0 256 pass disk",
      devices: { disk: 256 },
      seed,
      ops: 120,
    });

  it("passes a target that passes flushes and FUA down", async () => {
    for (const seed of [1, 2, 3]) {
      const report = await check(passThrough("pass", "none"), seed);
      expect(report.problems, `seed ${seed}`).toEqual([]);
      expect(report.crashPoints).toBeGreaterThan(10);
      expect(report.flushes).toBeGreaterThan(10);
    }
  });

  it("catches a target that never sees flushes (numFlushBios = 0)", async () => {
    const report = await check(passThrough("pass", "no flush"), 1);
    expect(report.problemCount).toBeGreaterThan(0);
    expect(report.problems[0]).toMatch(
      /^crash point \d+ after batch \d+ \(seed 1\): sector \d+ holds its old content; allowed: #\d+ \(durable\)/,
    );
  });

  it("catches a target that drops FUA", async () => {
    const report = await check(passThrough("pass", "drops FUA"), 1);
    expect(report.problems[0]).toMatch(/holds its old content; allowed: #\d+ \(durable\)$/);
  });
});
