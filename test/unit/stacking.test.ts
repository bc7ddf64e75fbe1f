/**
 * Mapped devices stacked on mapped devices (core/stacking.ts, the holders of mapped-device.ts):
 * a held device cannot be removed, so no table ever names a device that is gone and no minor is
 * reused under it; a table that would put a device under itself, or stack too high, is refused at
 * load; a stack is walked without recursion; shutdown ends I/O queued on a suspended lower device.
 */
import { describe, expect, it } from "vitest";
import { Bio } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { target } from "../../core/registry.js";
import { Services, type DeviceLookup } from "../../core/services.js";
import { MAX_STACK_DEPTH } from "../../core/stacking.js";
import { MapResult, Target } from "../../core/target.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { createDeviceMapper } from "../../index.js";
import { NamedBacking, pattern } from "../../testing/memory-backing.js";
import { rejection } from "../support/recording-device.js";

function mapper(): { dm: DeviceMapper; backing: NamedBacking } {
  const backing = new NamedBacking();
  backing.memory("mem", 64);
  backing.memory("mem2", 64);
  return { dm: createDeviceMapper({ backing, targets: [TraceTarget] }), backing };
}

const linear = (dev: string) => `0 64 linear ${dev} 0`;

describe("holders", () => {
  it("a device another table holds is not removed, forced or not; forced, it gets the error table", async () => {
    const { dm } = mapper();
    await dm.create("a", { table: linear("mem") });
    await dm.create("b", { table: linear("/dev/mapper/a") });
    const b = dm.open("b");
    await b.write(0, pattern(1, 512));

    expect(await rejection(dm.remove("a"))).toMatchObject({ errno: "EBUSY" });
    const forced = await rejection(dm.remove("a", { force: true }));
    expect(forced).toMatchObject({ errno: "EBUSY", message: "a: device is in use by b; remove or reload those first" });
    expect(dm.list()).toEqual(["a", "b"]);
    expect(dm.tableText("a")).toBe("0 64 error \n");
    expect(await rejection(b.read(0, 1))).toMatchObject({ status: "EIO" });

    // No minor is reused under b: a new device gets another one, and b still names a.
    await dm.create("c", { table: linear("mem2") });
    expect(dm.info("c").minor).not.toBe(dm.info("a").minor);
    expect(dm.tableText("b")).toBe(`0 64 linear 253:${dm.info("a").minor} 0\n`);
    await b.close();
    await dm.remove("b");
    await dm.remove("a");
    expect(dm.list()).toEqual(["c"]);
  });

  it("a reload that no longer uses the lower device releases it at the swap", async () => {
    const { dm } = mapper();
    await dm.create("a", { table: linear("mem") });
    await dm.create("b", { table: linear("/dev/mapper/a") });
    await dm.load("b", linear("mem2"));
    expect(await rejection(dm.remove("a"))).toMatchObject({ errno: "EBUSY" }); // the live table still holds it
    await dm.resume("b");
    await dm.remove("a");
    expect(dm.list()).toEqual(["b"]);
  });

  it("remove_all removes a stack from the top down", async () => {
    const { dm } = mapper();
    await dm.create("a", { table: linear("mem") });
    await dm.create("b", { table: linear("/dev/mapper/a") });
    await dm.create("c", { table: linear("/dev/mapper/b") });
    expect(await dm.removeAll()).toBe(0);
  });
});

describe("stacking rules", () => {
  it("refuses a table that would put a device under itself, and changes nothing", async () => {
    const { dm } = mapper();
    await dm.create("a", { table: linear("mem") });
    await dm.create("b", { table: linear("/dev/mapper/a") });
    const refused = await rejection(dm.load("a", linear("/dev/mapper/b")));
    expect(refused).toMatchObject({
      errno: "EINVAL",
      message: "a: table would stack the device on itself: a -> b -> a",
    });
    expect(dm.info("a").inactivePresent).toBe(false);
    expect(dm.info("b").openCount).toBe(0);
    const b = dm.open("b");
    await b.write(0, pattern(2, 512));
    expect((await b.read(0, 1)).equals(pattern(2, 512))).toBe(true);
    await b.close();
  });

  it("sees cycles through inactive tables too", async () => {
    const { dm } = mapper();
    await dm.create("a", { table: linear("mem") });
    await dm.create("b", { table: linear("mem2") });
    await dm.load("b", linear("/dev/mapper/a")); // not live yet
    expect(await rejection(dm.load("a", linear("/dev/mapper/b")))).toMatchObject({
      errno: "EINVAL",
      message: "a: table would stack the device on itself: a -> b -> a",
    });
  });

  it(`stacks at most ${MAX_STACK_DEPTH} devices, counting those above as well as below`, async () => {
    const { dm } = mapper();
    await dm.create("d0", { table: linear("mem") });
    for (let i = 1; i < MAX_STACK_DEPTH; i++) await dm.create(`d${i}`, { table: linear(`/dev/mapper/d${i - 1}`) });
    const tooHigh = await rejection(dm.create("over", { table: linear(`/dev/mapper/d${MAX_STACK_DEPTH - 1}`) }));
    expect(tooHigh).toMatchObject({
      errno: "EINVAL",
      message: `over: table would make a stack of ${MAX_STACK_DEPTH + 1} mapped devices; at most ${MAX_STACK_DEPTH} may be stacked`,
    });
    expect(dm.has("over")).toBe(false);
    // Below the bottom: d0 over another mapped device makes every device above one level higher.
    await dm.create("under", { table: linear("mem2") });
    expect(await rejection(dm.load("d0", linear("/dev/mapper/under")))).toMatchObject({ errno: "EINVAL" });
    // The full-height stack does I/O end to end.
    const top = dm.open(`d${MAX_STACK_DEPTH - 1}`);
    await top.write(8, pattern(3, 1024));
    expect((await top.read(8, 2)).equals(pattern(3, 1024))).toBe(true);
    await top.close();
  });
});

describe("stacking rules on shared lower devices", () => {
  it("checks a ladder (two devices a level, each on both below) in time linear in its size", async () => {
    const { dm, backing } = mapper();
    backing.memory("mem3", 64);
    await dm.create("l0a", { table: "0 32 linear mem 0\n32 32 linear mem2 0" });
    await dm.create("l0b", { table: "0 32 linear mem2 32\n32 32 linear mem3 0" });
    // 40 levels: walked once per path, the next load would take 2^40 steps.
    for (let i = 1; i < 40; i++) {
      const below = `0 32 linear /dev/mapper/l${i - 1}a 0\n32 32 linear /dev/mapper/l${i - 1}b 32`;
      await dm.create(`l${i}a`, { table: below });
      await dm.create(`l${i}b`, { table: below });
    }
    expect(dm.list()).toHaveLength(80);
    const top = dm.open("l39a");
    await top.write(0, pattern(6, 512));
    expect((await top.read(0, 1)).equals(pattern(6, 512))).toBe(true);
    await top.close();
  }, 10_000);
});

const trace: string[] = [];

/** `trace <dev> <label>`: remaps to <dev>, logging when its map starts and ends. */
@target({ name: "trace", version: [1, 0, 0], inject: [Services.DeviceLookup] })
class TraceTarget extends Target {
  private dev!: BlockDevice;
  private label = "";
  constructor(private readonly devices: DeviceLookup) {
    super();
  }
  async ctr(args: string[]): Promise<void> {
    this.dev = await this.devices.get(args[0]!);
    this.label = args[1]!;
  }
  map(bio: Bio): MapResult {
    trace.push(`${this.label} enters`);
    bio.device = this.dev;
    bio.device.submit(bio); // submitted from inside map, as a target that issues its own I/O does
    trace.push(`${this.label} leaves`);
    return MapResult.SUBMITTED;
  }
}

describe("walking a stack", () => {
  it("maps each device after the one above has returned (the kernel's bio_list), not inside it", async () => {
    const { dm } = mapper();
    await dm.create("low", { table: "0 64 trace mem low" });
    await dm.create("mid", { table: "0 64 trace /dev/mapper/low mid" });
    await dm.create("top", { table: "0 64 trace /dev/mapper/mid top" });
    const h = dm.open("top");
    trace.length = 0;
    await h.write(0, pattern(4, 512));
    expect(trace).toEqual(["top enters", "top leaves", "mid enters", "mid leaves", "low enters", "low leaves"]);
    await h.close();
  });
});

describe("shutdown", () => {
  it("ends I/O held by a suspended lower device, then removes everything", async () => {
    const { dm } = mapper();
    await dm.create("a", { table: linear("mem") });
    await dm.create("b", { table: linear("/dev/mapper/a") });
    await dm.suspend("a");
    const b = dm.open("b");
    const held = b.submit(new Bio("write", 0, 1, pattern(5, 512), 0, null)).catch((err: Error) => err);
    await dm.close(); // waits for b's in-flight write, which waits for a's resume: never, unless failed
    expect(await held).toMatchObject({ status: "EIO" });
    expect(dm.list()).toEqual([]);
  }, 5_000);
});
