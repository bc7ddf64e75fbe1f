import { describe, expect, it } from "vitest";
import {
  BioError,
  BioFlags,
  flushBio,
  readBio,
  submitAndWait,
  writeBio,
  writeZeroesBio,
  type Bio,
} from "../../core/bio.js";
import { ControlledDevice } from "../../testing/controlled-device.js";

/** `sectors` sectors filled with `byte`. */
const fill = (byte: number, sectors = 1) => Buffer.alloc(sectors * 512, byte);
const isWrite = (b: Bio) => b.op === "write";

async function read(dev: ControlledDevice, sector: number, sectors = 1): Promise<Buffer> {
  const bio = await submitAndWait(dev, readBio(sector, Buffer.alloc(sectors * 512)));
  return bio.data;
}

describe("ControlledDevice basics", () => {
  it("stores and reads back data, completing synchronously", async () => {
    const dev = new ControlledDevice(64);
    await submitAndWait(dev, writeBio(3, fill(0xab, 2)));
    expect(await read(dev, 3, 2)).toEqual(fill(0xab, 2));
    expect(await read(dev, 0)).toEqual(fill(0));
    expect(dev.log.map((r) => `${r.op}@${r.sector}+${r.sectors}`)).toEqual(["write@3+2", "read@3+2", "read@0+1"]);
  });

  it("fails I/O beyond the end with EIO and unsupported write-zeroes with EOPNOTSUPP", async () => {
    const dev = new ControlledDevice(8, { supportsWriteZeroes: false });
    await expect(submitAndWait(dev, writeBio(7, fill(1, 2)))).rejects.toMatchObject({ status: "EIO" });
    await expect(submitAndWait(dev, writeZeroesBio(0, 1))).rejects.toMatchObject({ status: "EOPNOTSUPP" });
  });

  it("forwards to a backing device when wrapping one", async () => {
    const inner = new ControlledDevice(16);
    const outer = new ControlledDevice(inner);
    outer.hold(isWrite);
    const done = submitAndWait(outer, writeBio(1, fill(7)));
    await outer.waitForHeld(1);
    expect(inner.log).toHaveLength(0);
    outer.releaseAll();
    await done;
    expect(inner.readSync(1, 1)).toEqual(fill(7));
    expect(outer.log.map((r) => r.status)).toEqual(["ok"]);
  });
});

describe("hold rules", () => {
  it("parks matching bios and completes them in the order the test releases them", async () => {
    const dev = new ControlledDevice(64);
    dev.hold(isWrite);
    const writes = [0, 1, 2].map((i) => submitAndWait(dev, writeBio(i, fill(i + 1))));
    const held = await dev.waitForHeld(3);
    expect(held.map((h) => [h.op, h.sector, h.seq])).toEqual([
      ["write", 0, 1],
      ["write", 1, 2],
      ["write", 2, 3],
    ]);
    // Reads are not held, and do not see held writes.
    expect(await read(dev, 1)).toEqual(fill(0));
    held[2]!.release();
    held[0]!.release();
    held[1]!.release();
    await Promise.all(writes);
    expect(dev.log.filter((r) => r.op === "write").map((r) => r.sector)).toEqual([2, 0, 1]);
    expect(dev.held()).toEqual([]);
    expect(() => held[0]!.release()).toThrow(/already released/);
  });

  it("fails a held bio with the chosen status and leaves the data alone", async () => {
    const dev = new ControlledDevice(8);
    dev.hold(isWrite);
    const p = submitAndWait(dev, writeBio(0, fill(9)));
    const [io] = await dev.waitForHeld(1);
    io!.fail("ENOSPC");
    await expect(p).rejects.toBeInstanceOf(BioError);
    await expect(p).rejects.toMatchObject({ status: "ENOSPC" });
    expect(dev.readSync(0, 1)).toEqual(fill(0));
    expect(dev.log[0]).toMatchObject({ op: "write", status: "ENOSPC" });
  });

  it("waitForHeld with a predicate resolves only when enough matching bios are held", async () => {
    const dev = new ControlledDevice(64);
    dev.hold(() => true);
    let resolved: number[] | null = null;
    const waiting = dev.waitForHeld((io) => io.sector >= 10, 2).then((ios) => (resolved = ios.map((i) => i.sector)));
    void submitAndWait(dev, writeBio(10, fill(1)));
    void submitAndWait(dev, writeBio(1, fill(1)));
    await Promise.resolve();
    expect(resolved).toBeNull();
    void submitAndWait(dev, readBio(20, Buffer.alloc(512)));
    await waiting;
    expect(resolved).toEqual([10, 20]);
    // Already satisfied: resolves at once.
    expect((await dev.waitForHeld(3)).length).toBe(3);
    dev.releaseAll();
  });

  it("stopHolding lets new bios through but keeps already held ones", async () => {
    const dev = new ControlledDevice(8);
    const h = dev.hold(isWrite);
    const first = submitAndWait(dev, writeBio(0, fill(1)));
    dev.stopHolding(h);
    await submitAndWait(dev, writeBio(1, fill(2)));
    expect(dev.held()).toHaveLength(1);
    dev.releaseAll();
    await first;
    expect(dev.log.map((r) => r.sector)).toEqual([1, 0]);
  });
});

describe("failNext", () => {
  it("fails only the next matching bio, when it is issued", async () => {
    const dev = new ControlledDevice(8);
    dev.failNext((b) => b.op === "read" && b.sector === 2, "EIO");
    await submitAndWait(dev, readBio(1, Buffer.alloc(512)));
    await expect(read(dev, 2)).rejects.toMatchObject({ status: "EIO" });
    await read(dev, 2);
    expect(dev.log.map((r) => r.status)).toEqual(["ok", "EIO", "ok"]);
    expect(dev.counters.failed).toBe(1);
  });
});

describe("volatile write cache", () => {
  it("reads see completed writes; crash keeps only flushed and FUA writes", async () => {
    const dev = new ControlledDevice(64, { volatileCache: true });
    dev.writeSync(9, fill(0x99)); // seed data is durable
    await submitAndWait(dev, writeBio(0, fill(0xa)));
    await submitAndWait(dev, flushBio());
    await submitAndWait(dev, writeBio(1, fill(0xb), BioFlags.FUA));
    await submitAndWait(dev, writeBio(2, fill(0xc)));
    await submitAndWait(dev, writeZeroesBio(9, 1));
    expect(await read(dev, 2)).toEqual(fill(0xc));
    expect(await read(dev, 9)).toEqual(fill(0));
    expect(dev.unflushed().map((w) => w.sector)).toEqual([2, 9]);

    const after = dev.crash();
    expect(after.readSync(0, 1)).toEqual(fill(0xa));
    expect(after.readSync(1, 1)).toEqual(fill(0xb));
    expect(after.readSync(2, 1)).toEqual(fill(0));
    expect(after.readSync(9, 1)).toEqual(fill(0x99));
    expect(after.log).toEqual([]);
    expect(dev.counters).toMatchObject({ flushes: 1, fuaWrites: 1, writes: 3, writeZeroes: 1 });
  });

  it("a flush covers only writes completed before it was submitted", async () => {
    const dev = new ControlledDevice(64, { volatileCache: true });
    dev.hold((b) => b.op === "flush" || b.sector === 5);
    await submitAndWait(dev, writeBio(4, fill(4)));
    const late = submitAndWait(dev, writeBio(5, fill(5))); // held: completes after the flush is submitted
    const flush = submitAndWait(dev, flushBio());
    const [w5, f] = await dev.waitForHeld(2);
    expect([w5!.sector, f!.op]).toEqual([5, "flush"]);
    w5!.release();
    f!.release();
    await Promise.all([late, flush]);
    const after = dev.crash();
    expect(after.readSync(4, 1)).toEqual(fill(4));
    expect(after.readSync(5, 1)).toEqual(fill(0));
  });

  it("PREFLUSH makes earlier writes durable but not the flagged write itself", async () => {
    const dev = new ControlledDevice(64, { volatileCache: true });
    await submitAndWait(dev, writeBio(0, fill(1)));
    await submitAndWait(dev, writeBio(1, fill(2), BioFlags.PREFLUSH));
    const after = dev.crash();
    expect(after.readSync(0, 2)).toEqual(Buffer.concat([fill(1), fill(0)]));
    expect(dev.counters.flushes).toBe(1);
  });

  it("crash({keep}) replays a chosen subset of unflushed writes in completion order", async () => {
    const dev = new ControlledDevice(64, { volatileCache: true });
    await submitAndWait(dev, writeBio(0, fill(1)));
    await submitAndWait(dev, writeBio(0, fill(2)));
    await submitAndWait(dev, writeBio(3, fill(3)));
    const [a, b, c] = dev.unflushed();
    expect(dev.crash({ keep: () => true }).readSync(0, 1)).toEqual(fill(2));
    expect(dev.crash({ keep: (w) => w.seq === a!.seq }).readSync(0, 1)).toEqual(fill(1));
    const partial = dev.crash({ keep: (w) => w.seq === c!.seq });
    expect(partial.readSync(0, 1)).toEqual(fill(0));
    expect(partial.readSync(3, 1)).toEqual(fill(3));
    expect(b!.sector).toBe(0);
  });

  it("a FUA write is not overwritten by an older unflushed write to the same sector", async () => {
    const dev = new ControlledDevice(64, { volatileCache: true });
    await submitAndWait(dev, writeBio(0, fill(1)));
    await submitAndWait(dev, writeBio(0, fill(2), BioFlags.FUA));
    expect(dev.crash().readSync(0, 1)).toEqual(fill(2));
    expect(dev.crash({ keep: () => true }).readSync(0, 1)).toEqual(fill(2));
  });

  it("the crashed device models the cache too, and the original keeps running", async () => {
    const dev = new ControlledDevice(64, { volatileCache: true });
    await submitAndWait(dev, writeBio(0, fill(1), BioFlags.FUA));
    const after = dev.crash();
    await submitAndWait(after, writeBio(1, fill(2)));
    expect(after.crash().readSync(0, 2)).toEqual(Buffer.concat([fill(1), fill(0)]));
    await submitAndWait(dev, writeBio(2, fill(3)));
    expect(dev.readSync(2, 1)).toEqual(fill(3));
  });
});
