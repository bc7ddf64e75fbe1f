import { describe, expect, it } from "vitest";
import { type Bio, readBio, submitAndWait } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { DmError } from "../../core/errors.js";
import { MemoryLogger } from "../../core/logger.js";
import { target } from "../../core/registry.js";
import { type DeviceLookup, Services } from "../../core/services.js";
import { EndIoResult, MapResult, Target } from "../../core/target.js";
import { createDeviceMapper } from "../../index.js";
import { NamedBacking, pattern, testMapper } from "../../testing/memory-backing.js";

describe("mapped device I/O through linear/striped/zero/error", () => {
  it("linear remaps with the offset", async () => {
    const { dm, backing } = testMapper();
    const mem = backing.memory("mem0", 1000);
    await dm.create("lin", { table: "0 100 linear mem0 50" });
    const h = dm.open("lin");
    const data = pattern(1, 4096);
    await h.write(10, data);
    const direct = Buffer.alloc(4096);
    await submitAndWait(mem, readBio(60, direct));
    expect(direct.equals(data)).toBe(true);
    expect((await h.read(10, 8)).equals(data)).toBe(true);
    await h.close();
    await dm.close();
  });

  it("fails I/O beyond the end of the device before it reaches a target", async () => {
    const { dm, backing } = testMapper();
    backing.memory("mem0", 1000);
    await dm.create("lin", { table: "0 100 linear mem0 0" });
    const h = dm.open("lin");
    await expect(h.read(99, 2)).rejects.toMatchObject({ status: "EIO" });
    await expect(h.read(99, 1)).resolves.toHaveLength(512);
    await h.close();
  });

  it("zero reads zeros and swallows writes; error fails reads and writes but not flushes", async () => {
    const { dm } = testMapper();
    await dm.create("z", { table: "0 64 zero\n64 64 error" });
    const h = dm.open("z");
    await h.write(0, pattern(2, 4096));
    expect((await h.read(0, 8)).every((b) => b === 0)).toBe(true);
    await expect(h.read(64, 1)).rejects.toMatchObject({ status: "EIO" });
    await expect(h.read(60, 8)).rejects.toMatchObject({ status: "EIO" });
    await expect(h.flush()).resolves.toBeUndefined();
    expect(dm.tableText("z")).toBe("0 64 zero \n64 64 error \n");
    await h.close();
  });

  it("refuses a table that references its own device", async () => {
    const { dm, backing } = testMapper();
    backing.memory("mem0", 100);
    await dm.create("a", { table: "0 10 linear mem0 0" });
    await dm.load("a", "0 10 linear /dev/mapper/a 0").then(
      () => expect.unreachable(),
      (e: DmError) => expect(e.message).toBe("linear: Device lookup failed: a table cannot reference its own device"),
    );
  });
});

/** A plugin with bugs: map throws on writes, endIo throws on reads. */
@target({ name: "buggy", version: [1, 0, 0], inject: [Services.DeviceLookup] })
class BuggyTarget extends Target {
  private device!: BlockDevice;
  constructor(private readonly devices: DeviceLookup) {
    super();
  }
  async ctr(args: string[]): Promise<void> {
    this.device = await this.devices.get(args[0]!, "rw");
  }
  map(bio: Bio): MapResult {
    if (bio.op === "write") throw new Error("unexpected write");
    bio.device = this.device;
    return MapResult.REMAPPED;
  }
  override endIo(): EndIoResult {
    throw new Error("cannot finish");
  }
}

describe("a target whose map or endIo throws", () => {
  it("fails that I/O with EIO, logs a target bug, and leaves the device able to suspend and go", async () => {
    const logger = new MemoryLogger();
    const backing = new NamedBacking();
    backing.memory("mem0", 64);
    const dm = createDeviceMapper({ backing, logger });
    dm.registry.register(BuggyTarget);
    await dm.create("b", { table: "0 64 buggy mem0" });
    const h = dm.open("b");
    await expect(h.write(0, pattern(1, 4096))).rejects.toMatchObject({ status: "EIO" });
    await expect(h.read(0, 8)).rejects.toMatchObject({ status: "EIO" });
    expect(
      logger.records.filter((r) => r.msg === "target bug").map((r) => (r.fields as { message: string }).message),
    ).toEqual(["map threw: unexpected write", "endIo threw: cannot finish"]);
    expect(dm.device("b").inFlight).toBe(0);
    await h.close();
    await dm.suspend("b"); // would wait forever for an io the exception left counted
    await dm.remove("b");
    await dm.close();
  });
});
