/**
 * delay (dm-delay.c 1.5.0): ctr errors with the kernel's messages, TABLE and INFO lines, and bios
 * held until the FakeClock passes their deadline, released in arrival order, per class (read /
 * write / flush), and all at once by a suspend.
 */
import { beforeEach, describe, expect, it, vi } from "vitest";
import { readBio, submitAndWait } from "../../core/bio.js";
import type { DeviceHandle, DeviceMapper } from "../../core/device-mapper.js";
import { createDeviceMapper } from "../../index.js";
import { FakeClock, settle } from "../support/fake-clock.js";
import { pattern } from "../../testing/memory-backing.js";
import {
  type IoRecord,
  type RecordingDevice,
  TrackingBacking,
  expectCtrError as expectCtrErrorIn,
} from "../support/recording-device.js";

let clock: FakeClock;
let backing: TrackingBacking;
let dm: DeviceMapper;
/** Every bio mem0..mem2 received, in order. */
let log: IoRecord[];
let mem: RecordingDevice[];

beforeEach(() => {
  clock = new FakeClock();
  backing = new TrackingBacking();
  dm = createDeviceMapper({ backing, clock });
  log = [];
  mem = [0, 1, 2].map((i) => backing.recorded(`mem${i}`, 1000, { log }));
});

/** A table line's ctr must fail with exactly this message (and errno), leaving nothing behind. */
const expectCtrError = (line: string, message: string, errno?: string) =>
  expectCtrErrorIn(dm, backing, line, message, errno);

/** A promise plus whether it has settled yet (checked after `settle()`). */
function track<T>(p: Promise<T>): { done: () => boolean; p: Promise<T> } {
  let done = false;
  const q = p.finally(() => {
    done = true;
  });
  q.catch(() => undefined);
  return { done: () => done, p: q };
}

async function delay(params: string, len = 100): Promise<DeviceHandle> {
  await dm.create("d", { table: `0 ${len} delay ${params}` });
  log.length = 0;
  return dm.open("d");
}

const info = () => dm.status("d")[0]!.params;
const seen = () => log.map((r) => `${r.device} ${r.op}@${r.sector}`);

describe("delay constructor", () => {
  it.each([
    ["", "Requires exactly 3, 6 or 9 arguments"],
    ["mem0 0", "Requires exactly 3, 6 or 9 arguments"],
    ["mem0 0 10 mem1", "Requires exactly 3, 6 or 9 arguments"],
    ["mem0 0 10 mem1 0", "Requires exactly 3, 6 or 9 arguments"],
    ["mem0 0 10 mem1 0 10 mem2", "Requires exactly 3, 6 or 9 arguments"],
    ["mem0 0 10 mem1 0 10 mem2 0 10 x", "Requires exactly 3, 6 or 9 arguments"],
    ["mem0 x 10", "Invalid device sector"],
    ["mem0 -1 10", "Invalid device sector"],
    ["mem0 0 x", "Invalid delay"],
    ["mem0 0 10ms", "Invalid delay"],
    ["mem0 0 -1", "Invalid delay"],
    ["mem0 0 4294967296", "Invalid delay"],
    ["mem0 0 10 mem1 x 10", "Invalid device sector"],
    ["mem0 0 10 mem1 0 x", "Invalid delay"],
    ["mem0 0 10 mem1 0 10 mem2 x 10", "Invalid device sector"],
    ["mem0 0 10 mem1 0 10 mem2 0 x", "Invalid delay"],
    // Offset and delay are checked before the device of their triple is looked up.
    ["nosuch x 10", "Invalid device sector"],
    ["nosuch 0 x", "Invalid delay"],
  ])("rejects '%s' with '%s'", async (args, message) => {
    await expectCtrError(`0 100 delay ${args}`, `delay: ${message}`);
  });

  it.each(["nosuch 0 10", "mem0 0 10 nosuch 0 10", "mem0 0 10 mem1 0 10 nosuch 0 10"])(
    "fails a missing device in '%s' with 'Device lookup failed' and the lookup's errno",
    async (args) => {
      await expectCtrError(`0 100 delay ${args}`, "delay: Device lookup failed: nosuch: no such test device", "ENOENT");
    },
  );

  it("checks every device area it maps", async () => {
    await expectCtrError(
      "0 10 delay mem0 0 0 mem1 995 0",
      "mem1 too small for target: start=995, len=10, dev_size=1000",
    );
    await expectCtrError(
      "0 10 delay mem0 0 0 mem1 0 0 mem2 991 0",
      "mem2 too small for target: start=991, len=10, dev_size=1000",
    );
  });

  it("registers as delay 1.5.0", () => {
    expect(dm.targets().find((t) => t.name === "delay")?.version).toEqual([1, 5, 0]);
  });
});

describe("delay status", () => {
  it.each([
    ["mem0 0 10", "mem0 0 10"],
    ["mem0 5 10 mem1 7 20", "mem0 5 10 mem1 7 20"],
    ["mem0 5 10 mem1 7 20 mem2 9 30", "mem0 5 10 mem1 7 20 mem2 9 30"],
    ["mem0 05 010", "mem0 5 10"],
  ])("TABLE for '%s' echoes the triples given: '%s'", async (args, table) => {
    await dm.create("d", { table: `0 100 delay ${args}` });
    expect(dm.tableText("d")).toBe(`0 100 delay ${table}\n`);
    expect(info()).toBe("0 0 0");
  });

  it("lists each device once in deps", async () => {
    await dm.create("d", { table: "0 100 delay mem0 0 10" });
    expect(dm.deps("d").map((d) => d.tableName)).toEqual(["mem0"]);
  });
});

describe("delay holds bios", () => {
  it("holds a read until the clock reaches its deadline, then maps it by the offset", async () => {
    const h = await delay("mem0 50 100");
    const r = track(h.read(5, 2));
    await settle();
    expect(r.done()).toBe(false);
    expect(info()).toBe("1 0 0");
    expect(log).toEqual([]);
    clock.advance(99);
    await settle();
    expect(r.done()).toBe(false);
    clock.advance(1);
    await r.p;
    expect(seen()).toEqual(["mem0 read@55"]);
    expect(info()).toBe("0 0 0");
    expect(clock.pending).toBe(0);
    await h.close();
  });

  it("holds writes with the write delay on the write device (6 arguments)", async () => {
    const h = await delay("mem0 0 100 mem1 10 30");
    const data = pattern(1, 512);
    const w = track(h.write(3, data));
    const r = track(h.read(3, 1));
    await settle();
    expect(info()).toBe("1 1 0");
    clock.advance(30);
    await w.p;
    expect(r.done()).toBe(false);
    expect(seen()).toEqual(["mem1 write@13"]);
    expect(info()).toBe("1 0 0");
    clock.advance(70);
    await r.p;
    expect(seen()).toEqual(["mem1 write@13", "mem0 read@3"]);
    const onDisk = Buffer.alloc(512);
    await submitAndWait(mem[1]!, readBio(13, onDisk));
    expect(onDisk.equals(data)).toBe(true);
    await h.close();
  });

  it("releases bios with the same delay in the order they arrived", async () => {
    const h = await delay("mem0 0 100");
    const ws = [1, 2, 3].map((i) => {
      const p = track(h.write(0, pattern(i, 512)));
      clock.advance(10);
      return p;
    });
    await settle();
    expect(info()).toBe("0 3 0");
    clock.advance(200);
    await Promise.all(ws.map((w) => w.p));
    expect(seen()).toEqual(["mem0 write@0", "mem0 write@0", "mem0 write@0"]);
    const onDisk = Buffer.alloc(512);
    await submitAndWait(mem[0]!, readBio(0, onDisk));
    expect(onDisk.equals(pattern(3, 512))).toBe(true);
    await h.close();
  });

  it("releases everything due at one expiry in arrival order, whatever the class", async () => {
    // The read (100 ms) arrives at t=0, the write (50 ms) at t=50: both are due at t=100.
    const h = await delay("mem0 0 100 mem1 0 50");
    const r = track(h.read(1, 1));
    clock.advance(50);
    const w = track(h.write(2, pattern(4, 512)));
    clock.advance(50);
    await Promise.all([r.p, w.p]);
    expect(seen()).toEqual(["mem0 read@1", "mem1 write@2"]);
    await h.close();
  });

  it("re-arms its timer for a later bio that expires first", async () => {
    const h = await delay("mem0 0 1000 mem1 0 10");
    const r = track(h.read(0, 1));
    const w = track(h.write(0, pattern(5, 512)));
    clock.advance(10);
    await w.p;
    expect(r.done()).toBe(false);
    clock.advance(989);
    await settle();
    expect(r.done()).toBe(false);
    clock.advance(1);
    await r.p;
    expect(seen()).toEqual(["mem1 write@0", "mem0 read@0"]);
    await h.close();
  });

  it("passes bios of a class with delay 0 straight through", async () => {
    const h = await delay("mem0 0 0 mem1 0 100");
    await h.read(0, 1); // no clock movement needed
    const w = track(h.write(0, pattern(6, 512)));
    await settle();
    expect(w.done()).toBe(false);
    expect(info()).toBe("0 1 0");
    clock.advance(100);
    await w.p;
    await h.close();
  });

  it("treats discards as writes", async () => {
    const h = await delay("mem0 0 0 mem1 0 40");
    const d = track(h.discard(0, 8));
    await settle();
    expect(info()).toBe("0 1 0");
    clock.advance(40);
    await d.p;
    expect(seen()).toEqual(["mem1 discard@0"]);
    await h.close();
  });
});

describe("delay flush class", () => {
  it("uses the read triple for flushes with 3 arguments", async () => {
    const h = await delay("mem0 0 25");
    const f = track(h.flush());
    await settle();
    expect(info()).toBe("0 0 1");
    clock.advance(24);
    await settle();
    expect(f.done()).toBe(false);
    clock.advance(1);
    await f.p;
    expect(seen()).toEqual(["mem0 flush@0"]);
    await h.close();
  });

  it("uses the write triple for flushes with 6 arguments", async () => {
    const h = await delay("mem0 0 0 mem1 0 25");
    const f = track(h.flush());
    clock.advance(25);
    await f.p;
    expect(seen()).toEqual(["mem1 flush@0"]);
    await h.close();
  });

  it("uses the third triple for flushes with 9 arguments", async () => {
    const h = await delay("mem0 0 0 mem1 0 0 mem2 0 30");
    await h.write(0, pattern(7, 512)); // writes are not delayed
    const f = track(h.flush());
    await settle();
    expect(info()).toBe("0 0 1");
    clock.advance(30);
    await f.p;
    expect(seen()).toEqual(["mem1 write@0", "mem2 flush@0"]);
    await h.close();
  });

  it("delays a PREFLUSH write first as a flush, then its data as a write", async () => {
    const h = await delay("mem0 0 0 mem1 0 10 mem2 0 30");
    const w = track(h.write(4, pattern(8, 512), { preflush: true }));
    await settle();
    expect(info()).toBe("0 0 1");
    clock.advance(30);
    await settle();
    expect(seen()).toEqual(["mem2 flush@0"]);
    expect(info()).toBe("0 1 0");
    expect(w.done()).toBe(false);
    clock.advance(10);
    await w.p;
    expect(seen()).toEqual(["mem2 flush@0", "mem1 write@4"]);
    await h.close();
  });
});

describe("delay and suspend", () => {
  it("submits every held bio at presuspend, in order, without waiting for the clock", async () => {
    const h = await delay("mem0 0 500 mem1 0 1000");
    const r = track(h.read(1, 1));
    const w = track(h.write(2, pattern(9, 512)));
    const f = track(h.flush());
    await settle();
    expect(info()).toBe("1 1 1");
    await dm.suspend("d");
    await Promise.all([r.p, w.p, f.p]);
    expect(seen()).toEqual(["mem0 read@1", "mem1 write@2", "mem1 flush@0"]);
    expect(info()).toBe("0 0 0");
    expect(clock.pending).toBe(0);
    await dm.resume("d");
    await h.close();
  });

  it("delays again after resume", async () => {
    const h = await delay("mem0 0 100");
    await dm.suspend("d");
    await dm.resume("d");
    const r = track(h.read(0, 1));
    await settle();
    expect(r.done()).toBe(false);
    clock.advance(100);
    await r.p;
    await h.close();
  });

  it("releases held bios when a reload swaps the table", async () => {
    const h = await delay("mem0 0 100");
    const r = track(h.read(0, 1));
    await settle();
    await dm.load("d", "0 100 linear mem0 0");
    await dm.resume("d");
    await r.p;
    expect(clock.pending).toBe(0);
    await h.close();
  });

  it("releases held bios when the device is removed", async () => {
    const h = await delay("mem0 0 100");
    const r = track(h.read(0, 1));
    await settle();
    await h.close();
    await dm.remove("d");
    await r.p;
    expect(clock.pending).toBe(0);
    expect(backing.openHandles).toBe(0);
  });
});

describe("delay on the system clock", () => {
  it("holds a bio for 2^32 - 1 ms: the wait is chained past Node's 2^31 - 1 ms timer limit, not re-armed every millisecond", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "Date"] }); // they keep Node's limit: longer waits fire after 1 ms
    try {
      const real = createDeviceMapper({ backing }); // the default clock: systemClock
      await real.create("long", { table: "0 100 delay mem0 0 4294967295" });
      const h = real.open("long");
      const setTimeoutSpy = vi.spyOn(globalThis, "setTimeout");
      const r = track(h.read(0, 1));
      await settle();
      await vi.advanceTimersByTimeAsync(1000);
      expect(r.done()).toBe(false);
      expect(setTimeoutSpy.mock.calls.length).toBeLessThanOrEqual(1); // one armed timer, no re-arming
      await vi.advanceTimersByTimeAsync(2 ** 32 - 1 - 1000 - 1);
      expect(r.done()).toBe(false);
      // 2^32 - 1 ms = 2 x (2^31 - 1) + 1: three links in all
      expect(setTimeoutSpy.mock.calls.length).toBeLessThanOrEqual(3);
      await vi.advanceTimersByTimeAsync(1);
      await r.p;
      await h.close();
      await real.remove("long");
    } finally {
      vi.useRealTimers();
    }
  });
});
