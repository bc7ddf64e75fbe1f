/**
 * Suspend / resume / reload while I/O is in flight, ordered deterministically by holding and
 * releasing individual I/Os on a ControlledDevice. Checks: suspend waits for in-flight bios, bios
 * arriving meanwhile queue in order and never fail, no bio is lost, duplicated or completed twice,
 * and nothing submitted after the barrier overtakes what was submitted before it.
 */
import { describe, expect, it } from "vitest";
import { Bio, BioFlags, type BioEndIo, type BioStatus, MapResult, Target, target } from "../../index.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";

/** Submits bios to a mapped device and records each completion (throws on a double one). */
class Tracker implements BioEndIo {
  readonly done = new Map<Bio, BioStatus>();
  readonly order: number[] = [];
  bioDone(bio: Bio): void {
    if (this.done.has(bio)) throw new Error("completed twice");
    this.done.set(bio, bio.status);
    this.order.push(bio.sector);
  }
  write(dev: { submit(b: Bio): void }, sector: number, seed: number, flags = 0): Bio {
    const bio = new Bio("write", sector, 8, pattern(seed, 4096), flags, this);
    bio.submitTo(dev);
    return bio;
  }
}

/** Resolves on the next turn of the event loop: lets pending promise chains run, no timing. */
const settle = () => new Promise<void>((r) => setImmediate(r));

async function setup() {
  const { dm, backing } = testMapper();
  const a = backing.add("a", new ControlledDevice(4096, { name: "a" }));
  const b = backing.add("b", new ControlledDevice(4096, { name: "b" }));
  await dm.create("md", { table: "0 1024 linear a 0" });
  return { dm, a, b, md: dm.device("md") };
}

describe("suspend quiesces I/O", () => {
  it("waits for in-flight bios, queues new ones in order, and releases them on resume", async () => {
    const { dm, a, md } = await setup();
    const t = new Tracker();
    a.hold();
    const early = [t.write(md, 0, 1), t.write(md, 8, 2)];
    await a.waitForHeld(2);

    let suspended = false;
    const suspending = dm.suspend("md").then(() => (suspended = true));
    await settle();
    expect(suspended).toBe(false); // two writes are still in flight

    const late = [t.write(md, 16, 3), t.write(md, 24, 4), t.write(md, 32, 5)];
    expect(md.queued).toBe(3);
    expect(a.held()).toHaveLength(2); // the late ones never reached the device

    for (const io of a.held().reverse()) io.release(); // complete out of order
    await suspending;
    expect(suspended).toBe(true);
    expect(early.every((b) => t.done.get(b) === "ok")).toBe(true);
    expect(late.some((b) => t.done.has(b))).toBe(false);

    await dm.resume("md");
    const reached = await a.waitForHeld(3);
    expect(reached.map((io) => io.sector)).toEqual([16, 24, 32]); // FIFO
    a.releaseAll();
    expect(late.every((b) => t.done.get(b) === "ok")).toBe(true);
    expect(t.done.size).toBe(5);
    expect(a.readSync(16, 8).equals(pattern(3, 4096))).toBe(true);
  });

  it("reload under load: old-table bios finish on the old device, queued ones go to the new table", async () => {
    const { dm, a, b, md } = await setup();
    const t = new Tracker();
    a.hold();
    const before = [t.write(md, 0, 10), t.write(md, 8, 11)];
    await a.waitForHeld(2);

    await dm.load("md", "0 2048 linear b 100");
    const third = t.write(md, 16, 12); // the live table still serves I/O after a load
    await a.waitForHeld(3);

    const resuming = dm.resume("md"); // suspends (waits for the 3 held), swaps, resumes
    await settle();
    const after = [t.write(md, 24, 13), t.write(md, 1500, 14)]; // 1500 only fits the new table
    expect(md.queued).toBe(2);
    a.releaseAll();
    await resuming;

    expect([...before, third].every((x) => t.done.get(x) === "ok")).toBe(true);
    expect(after.every((x) => t.done.get(x) === "ok")).toBe(true);
    expect(b.readSync(100 + 24, 8).equals(pattern(13, 4096))).toBe(true);
    expect(b.readSync(100 + 1500, 8).equals(pattern(14, 4096))).toBe(true);
    expect(a.readSync(16, 8).equals(pattern(12, 4096))).toBe(true);
    expect(a.readSync(24, 8).every((x) => x === 0)).toBe(true); // nothing after the barrier hit the old device
    expect(dm.tableText("md")).toBe("0 2048 linear b 100\n");
  });

  it("a PREFLUSH write flushes first, and a suspend between flush and data defers the data", async () => {
    const { dm, a, md } = await setup();
    const t = new Tracker();
    a.hold((bio) => bio.op === "flush");
    const w = t.write(md, 40, 20, BioFlags.PREFLUSH | BioFlags.FUA);
    const [flush] = await a.waitForHeld(1);
    const suspending = dm.suspend("md");
    await settle(); // suspend has blocked new I/O and waits for the flush
    flush!.release();
    await suspending; // the flush half finished; the data half is queued behind the suspend
    expect(t.done.has(w)).toBe(false);
    expect(md.queued).toBe(1);
    await dm.resume("md");
    expect(t.done.get(w)).toBe("ok");
    const writes = a.log.filter((r) => r.op !== "read");
    expect(writes.map((r) => r.op)).toEqual(["flush", "write"]);
    expect(writes[1]!.flags & BioFlags.PREFLUSH).toBe(0);
    expect(writes[1]!.flags & BioFlags.FUA).toBe(BioFlags.FUA);
  });

  it("remove fails queued bios with EIO exactly once and waits for in-flight ones", async () => {
    const { dm, a, md } = await setup();
    const t = new Tracker();
    await dm.suspend("md");
    const queued = t.write(md, 0, 30);
    await dm.remove("md");
    expect(t.done.get(queued)).toBe("EIO");
    const afterRemove = t.write(md, 0, 31);
    expect(t.done.get(afterRemove)).toBe("ENXIO");
    expect(a.log).toHaveLength(0);
  });
});

/**
 * A target that parks writes (as multipath does with no usable path) and pushes them back with
 * REQUEUE when suspended: with --noflush they survive the suspend and go to the next table; with
 * a normal suspend the requeue turns into EIO (dm.c: dm_handle_requeue).
 */
@target({ name: "parking", version: [1, 0, 0] })
class ParkingTarget extends Target {
  parked: Bio[] = [];
  ctr(): void {}
  map(bio: Bio): MapResult {
    this.parked.push(bio);
    return MapResult.SUBMITTED;
  }
  override presuspend(): void {
    for (const bio of this.parked.splice(0)) bio.complete("DM_REQUEUE");
  }
}

describe("noflush suspend and REQUEUE", () => {
  it("requeued bios survive a noflush reload and complete on the new table, in order", async () => {
    const { dm, backing } = testMapper();
    dm.registry.register(ParkingTarget);
    const dev = backing.add("a", new ControlledDevice(4096));
    await dm.create("mp", { table: "0 64 parking" });
    const md = dm.device("mp");
    const t = new Tracker();
    const bios = [t.write(md, 0, 1), t.write(md, 8, 2), t.write(md, 16, 3)];
    await dm.load("mp", "0 64 linear a 0");
    await dm.resume("mp", { noflush: true });
    expect(bios.every((b) => t.done.get(b) === "ok")).toBe(true);
    expect(dev.readSync(8, 8).equals(pattern(2, 4096))).toBe(true);
    expect(new Set(t.order).size).toBe(3);
  });

  it("without noflush a REQUEUE fails the bio with EIO", async () => {
    const { dm } = testMapper();
    dm.registry.register(ParkingTarget);
    await dm.create("mp", { table: "0 64 parking" });
    const t = new Tracker();
    const bio = t.write(dm.device("mp"), 0, 1);
    await dm.suspend("mp");
    expect(t.done.get(bio)).toBe("EIO");
  });
});

describe("internal suspend (used by snapshot handover)", () => {
  it("drains in-flight I/O, holds new I/O, nests with a user suspend, and releases on the last resume", async () => {
    const { dm, a, md } = await setup();
    const t = new Tracker();
    a.hold();
    const inflight = t.write(md, 0, 40);
    await a.waitForHeld(1);
    let drained = false;
    const internal = md.live!.internalSuspend().then(() => (drained = true));
    await settle();
    expect(drained).toBe(false);
    const queued = t.write(md, 8, 41);
    expect(md.queued).toBe(1);
    a.releaseAll();
    await internal;
    expect(t.done.get(inflight)).toBe("ok");
    // A user suspend/resume cycle in between must not release I/O held by the internal suspend.
    await dm.suspend("md");
    await dm.resume("md");
    expect(md.queued).toBe(1);
    expect(md.live!.suspended).toBe(false);
    md.live!.internalResume();
    await a.waitForHeld(1);
    a.releaseAll();
    expect(t.done.get(queued)).toBe("ok");
    expect(() => md.live!.internalResume()).toThrow(/internal resume without internal suspend/);
  });
});
