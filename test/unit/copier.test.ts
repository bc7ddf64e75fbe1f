import { describe, expect, it } from "vitest";
import type { Bio } from "../../core/bio.js";
import { Copier, CopyFlags, type CopierClient, type CopyDest, type CopySource } from "../../core/copier.js";
import { MemoryLogger } from "../../core/logger.js";
import { ControlledDevice } from "../../testing/controlled-device.js";

/** Distinct bytes per sector so misplaced data shows up. */
function pattern(sectors: number, seed = 1): Buffer {
  const buf = Buffer.alloc(sectors * 512);
  for (let i = 0; i < buf.length; i++) buf[i] = (seed * 31 + Math.floor(i / 512) * 7 + i) & 0xff;
  return buf;
}

interface Result {
  readErr: boolean;
  mask: number;
}

/** copy() as a promise, plus a flag proving the callback did not run inside copy(). */
function copy(client: CopierClient, src: CopySource, dests: CopyDest[], flags = 0): Promise<Result> {
  let returned = false;
  const p = new Promise<Result>((resolve, reject) =>
    client.copy(
      src,
      dests,
      (readErr, mask) => (returned ? resolve({ readErr, mask }) : reject(new Error("callback ran inside copy()"))),
      { flags },
    ),
  );
  returned = true;
  return p;
}

const reads = (dev: ControlledDevice) => dev.log.filter((r) => r.op === "read");
const writes = (dev: ControlledDevice) => dev.log.filter((r) => r.op === "write");
const isRead = (b: Bio) => b.op === "read";
const newCopier = (opts: { subJobSectors?: number; maxInFlight?: number } = {}) =>
  new Copier({ logger: new MemoryLogger(), ...opts });

describe("Copier.copy", () => {
  it("copies a region to one destination, reading the source once", async () => {
    const src = new ControlledDevice(256);
    const dst = new ControlledDevice(256);
    src.writeSync(10, pattern(16));
    const r = await copy(newCopier().client(), { device: src, sector: 10, sectors: 16 }, [
      { device: dst, sector: 100 },
    ]);
    expect(r).toEqual({ readErr: false, mask: 0 });
    expect(dst.readSync(100, 16)).toEqual(pattern(16));
    expect(reads(src)).toHaveLength(1);
  });

  it("writes every destination from a single read of the source", async () => {
    const src = new ControlledDevice(64);
    const dests = [0, 1, 2].map(() => new ControlledDevice(64));
    src.writeSync(0, pattern(8, 5));
    const r = await copy(
      newCopier().client(),
      { device: src, sector: 0, sectors: 8 },
      dests.map((device, i) => ({ device, sector: i * 8 })),
    );
    expect(r).toEqual({ readErr: false, mask: 0 });
    dests.forEach((d, i) => expect(d.readSync(i * 8, 8)).toEqual(pattern(8, 5)));
    expect(reads(src)).toHaveLength(1);
  });

  it("splits a large copy into sub-jobs but calls back once", async () => {
    const src = new ControlledDevice(64);
    const dst = new ControlledDevice(64);
    src.writeSync(0, pattern(20));
    let calls = 0;
    await new Promise<void>((resolve) =>
      newCopier({ subJobSectors: 8 })
        .client()
        .copy({ device: src, sector: 0, sectors: 20 }, [{ device: dst, sector: 30 }], () => {
          calls++;
          resolve();
        }),
    );
    expect(reads(src).map((r) => [r.sector, r.sectors])).toEqual([
      [0, 8],
      [8, 8],
      [16, 4],
    ]);
    expect(writes(dst).map((r) => [r.sector, r.sectors])).toEqual([
      [30, 8],
      [38, 8],
      [46, 4],
    ]);
    expect(dst.readSync(30, 20)).toEqual(pattern(20));
    expect(calls).toBe(1);
  });

  it("bounds sub-jobs in flight across all clients of one Copier", async () => {
    const src = new ControlledDevice(256);
    const dst = new ControlledDevice(256);
    src.writeSync(0, pattern(80));
    const copier = newCopier({ subJobSectors: 4, maxInFlight: 3 });
    src.hold(isRead);
    const jobs = [
      copy(copier.client("a"), { device: src, sector: 0, sectors: 40 }, [{ device: dst, sector: 0 }]),
      copy(copier.client("b"), { device: src, sector: 40, sectors: 40 }, [{ device: dst, sector: 40 }]),
    ];
    await src.waitForHeld(3);
    let maxHeld = 0;
    // Release the oldest read each time: its writes complete at once, freeing a slot for the next read.
    while (src.held().length > 0) {
      maxHeld = Math.max(maxHeld, src.held().length);
      expect(copier.subJobsInFlight).toBe(src.held().length);
      src.held()[0]!.release();
    }
    expect(await Promise.all(jobs)).toEqual([
      { readErr: false, mask: 0 },
      { readErr: false, mask: 0 },
    ]);
    expect(maxHeld).toBe(3);
    expect(reads(src)).toHaveLength(20);
    expect(dst.readSync(0, 80)).toEqual(pattern(80));
  });

  it("reports a read error and writes nothing", async () => {
    const src = new ControlledDevice(64);
    const dst = new ControlledDevice(64);
    src.failNext(isRead, "EIO");
    const r = await copy(newCopier().client(), { device: src, sector: 0, sectors: 8 }, [{ device: dst, sector: 0 }]);
    expect(r).toEqual({ readErr: true, mask: 0 });
    expect(dst.log).toEqual([]);
  });

  it("stops issuing sub-jobs after an error unless IGNORE_ERROR", async () => {
    const run = async (flags: number) => {
      const src = new ControlledDevice(64);
      const dst = new ControlledDevice(64);
      src.failNext((b) => b.op === "read" && b.sector === 0, "EIO");
      const r = await copy(
        newCopier({ subJobSectors: 4, maxInFlight: 1 }).client(),
        { device: src, sector: 0, sectors: 12 },
        [{ device: dst, sector: 0 }],
        flags,
      );
      return { r, reads: reads(src).length, writes: writes(dst).map((w) => w.sector) };
    };
    expect(await run(0)).toEqual({ r: { readErr: true, mask: 0 }, reads: 1, writes: [] });
    expect(await run(CopyFlags.IGNORE_ERROR)).toEqual({ r: { readErr: true, mask: 0 }, reads: 3, writes: [4, 8] });
  });

  it("sets the write error bit of each failing destination only", async () => {
    const src = new ControlledDevice(64);
    const dests = [0, 1, 2, 3].map(() => new ControlledDevice(64));
    dests[1]!.failNext(() => true, "EIO");
    dests[3]!.failNext(() => true, "ENOSPC");
    const r = await copy(
      newCopier().client(),
      { device: src, sector: 0, sectors: 8 },
      dests.map((device) => ({ device, sector: 0 })),
    );
    expect(r).toEqual({ readErr: false, mask: 0b1010 });
    expect(writes(dests[0]!)[0]!.status).toBe("ok");
  });

  it("rejects a job with no or too many destinations", () => {
    const client = newCopier().client();
    const src = { device: new ControlledDevice(8), sector: 0, sectors: 1 };
    expect(() => client.copy(src, [], () => {})).toThrow(/destinations/);
    expect(() => client.copy(src, Array(9).fill({ device: src.device, sector: 0 }), () => {})).toThrow(/destinations/);
  });
});

describe("CopierClient callbacks", () => {
  it("run one at a time, in completion order, exactly once each", async () => {
    const src = new ControlledDevice(64);
    const dst = new ControlledDevice(64);
    dst.hold((b) => b.op === "write");
    const client = newCopier().client();
    const order: string[] = [];
    let inCallback = false;
    let reentered = false;
    const all = ["A", "B", "C"].map(
      (name, i) =>
        new Promise<void>((resolve) =>
          client.copy({ device: src, sector: i * 8, sectors: 8 }, [{ device: dst, sector: i * 8 }], () => {
            if (inCallback) reentered = true;
            inCallback = true;
            order.push(name);
            // A job started from a callback must not call back re-entrantly, even on a synchronous device.
            client.copy({ device: src, sector: 0, sectors: 1 }, [{ device: src, sector: 40 + i }], () =>
              order.push(`${name}'`),
            );
            inCallback = false;
            resolve();
          }),
        ),
    );
    const [a, b, c] = await dst.waitForHeld(3);
    c!.release();
    a!.release();
    b!.release();
    await Promise.all(all);
    await client.destroy();
    expect(order).toEqual(["C", "A", "B", "C'", "A'", "B'"]);
    expect(reentered).toBe(false);
  });

  it("a throwing callback is logged and the next callbacks still run", async () => {
    const logger = new MemoryLogger();
    const client = new Copier({ logger }).client("snap");
    const dev = new ControlledDevice(16);
    const ran: number[] = [];
    client.copy({ device: dev, sector: 0, sectors: 1 }, [{ device: dev, sector: 1 }], () => {
      throw new Error("boom");
    });
    client.copy({ device: dev, sector: 0, sectors: 1 }, [{ device: dev, sector: 2 }], () => ran.push(2));
    await client.destroy();
    expect(ran).toEqual([2]);
    expect(logger.records[0]).toMatchObject({ level: "error", fields: { client: "snap" } });
  });
});

describe("CopierClient.zero", () => {
  it("uses write-zeroes bios where the device supports them", async () => {
    const dev = new ControlledDevice(64);
    dev.writeSync(0, pattern(16));
    let result: Result | null = null;
    const done = new Promise<void>((resolve) =>
      newCopier({ subJobSectors: 8 })
        .client()
        .zero([{ device: dev, sector: 2 }], 12, (readErr, mask) => {
          result = { readErr, mask };
          resolve();
        }),
    );
    expect(result).toBeNull(); // the device completed synchronously, the callback still waits
    await done;
    expect(result).toEqual({ readErr: false, mask: 0 });
    expect(dev.log.map((r) => [r.op, r.sector, r.sectors])).toEqual([
      ["write-zeroes", 2, 8],
      ["write-zeroes", 10, 4],
    ]);
    expect(dev.readSync(2, 12)).toEqual(Buffer.alloc(12 * 512));
    expect(dev.readSync(0, 2)).toEqual(pattern(16).subarray(0, 1024));
    expect(dev.readSync(14, 2)).toEqual(pattern(16).subarray(14 * 512));
  });

  it("writes zero buffers where write-zeroes is unsupported", async () => {
    const plain = new ControlledDevice(64, { supportsWriteZeroes: false });
    const fancy = new ControlledDevice(64);
    plain.writeSync(0, pattern(8));
    const client = newCopier().client();
    await new Promise<void>((resolve) =>
      client.zero(
        [
          { device: plain, sector: 0 },
          { device: fancy, sector: 0 },
        ],
        8,
        () => resolve(),
      ),
    );
    expect(plain.log.map((r) => r.op)).toEqual(["write"]);
    expect(fancy.log.map((r) => r.op)).toEqual(["write-zeroes"]);
    expect(plain.readSync(0, 8)).toEqual(Buffer.alloc(8 * 512));
  });

  it("falls back to zero buffers when an advertised write-zeroes is refused", async () => {
    const dev = new ControlledDevice(64);
    dev.writeSync(0, pattern(8));
    dev.failNext((b) => b.op === "write-zeroes", "EOPNOTSUPP");
    let mask = -1;
    await new Promise<void>((resolve) =>
      newCopier()
        .client()
        .zero([{ device: dev, sector: 0 }], 8, (_r, m) => {
          mask = m;
          resolve();
        }),
    );
    expect(mask).toBe(0);
    expect(dev.log.map((r) => `${r.op} ${r.status}`)).toEqual(["write-zeroes EOPNOTSUPP", "write ok"]);
    expect(dev.readSync(0, 8)).toEqual(Buffer.alloc(8 * 512));
  });
});

describe("prepareCallback / doCallback", () => {
  it("fires through the same serialised path, later, with the given result", async () => {
    const src = new ControlledDevice(64);
    const dst = new ControlledDevice(64);
    dst.hold(() => true);
    const client = newCopier().client();
    const order: string[] = [];
    client.copy({ device: src, sector: 0, sectors: 8 }, [{ device: dst, sector: 0 }], () => order.push("copy"));
    const handle = client.prepareCallback((readErr, mask) => order.push(`prepared ${readErr} ${mask}`));
    await dst.waitForHeld(1);
    client.doCallback(handle, false, 0b10);
    expect(order).toEqual([]); // never inside doCallback
    dst.releaseAll();
    await client.destroy();
    expect(order).toEqual(["prepared false 2", "copy"]);
    expect(() => client.doCallback(handle, false, 0)).toThrow(/twice/);
  });
});

describe("CopierClient.destroy", () => {
  it("waits for outstanding jobs, then refuses new ones", async () => {
    const src = new ControlledDevice(64);
    const dst = new ControlledDevice(64);
    dst.hold(() => true);
    const client = newCopier().client();
    let called = false;
    client.copy({ device: src, sector: 0, sectors: 8 }, [{ device: dst, sector: 0 }], () => (called = true));
    await dst.waitForHeld(1);
    let destroyed = false;
    const p = client.destroy().then(() => (destroyed = true));
    await Promise.resolve();
    expect(destroyed).toBe(false);
    dst.releaseAll();
    await p;
    expect(called).toBe(true);
    expect(client.jobsOutstanding).toBe(0);
    expect(() => client.copy({ device: src, sector: 0, sectors: 1 }, [{ device: dst, sector: 0 }], () => {})).toThrow(
      /destroyed/,
    );
  });
});
