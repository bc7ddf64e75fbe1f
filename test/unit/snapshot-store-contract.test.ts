/**
 * The persistent exception store's contract where the engine's tests leave it loose (mutation
 * testing found these gaps, docs/testing.md "Mutation testing"): allocation at the end of the COW
 * device, the length of a run of free chunks, what the operator is told when a metadata write or
 * a commit callback fails, and the checks of the merge calls. The allocation tests hold for the
 * transient store too.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { type Bio, BioFlags } from "../../core/bio.js";
import { MemoryLogger } from "../../core/logger.js";
import { isMetadataChunk, readLe64, writeLe64 } from "../../targets/snapshot/cow-format.js";
import { type ExceptionStore, createExceptionStore } from "../../targets/snapshot/store.js";
import { ControlledDevice } from "../../testing/controlled-device.js";

const META = BioFlags.PREFLUSH | BioFlags.FUA;
const isMetaWrite = (b: { op: string; flags: number }) => b.op === "write" && (b.flags & META) === META;

async function load(cow: ControlledDevice, chunk = "1", logger = new MemoryLogger()) {
  const store = createExceptionStore(["P", chunk], cow, { logger }).store;
  const found: [number, number][] = [];
  const state = await store.readMetadata((o, n) => found.push([o, n]));
  return { store, found, state, logger };
}

function commit(store: ExceptionStore, oldChunk: number, newChunk: number): Promise<boolean> {
  return new Promise((resolve) => store.commitException(oldChunk, newChunk, true, resolve));
}

describe("allocation at the end of the COW device and at metadata areas (both stores)", () => {
  const open = async (type: "P" | "N", chunk: string, sizeSectors: number) => {
    const store = createExceptionStore([type, chunk], new ControlledDevice(sizeSectors), {
      logger: new MemoryLogger(),
    }).store;
    await store.readMetadata(() => {});
    return store;
  };

  it("allocates a last chunk that ends exactly at the end of the device, then none", async () => {
    const persistent = await open("P", "8", 6 * 8); // chunks 0..5: header, area 0, then 2..5
    expect([2, 3, 4, 5].map(() => persistent.prepareException())).toEqual([2, 3, 4, 5]);
    expect([persistent.prepareException(), persistent.consecutiveFree!(4)]).toEqual([null, 0]);
    const transient = await open("N", "8", 4 * 8);
    expect(transient.consecutiveFree!(8)).toBe(4);
    expect([0, 1, 2, 3].map(() => transient.prepareException())).toEqual([0, 1, 2, 3]);
    expect([transient.prepareException(), transient.consecutiveFree!(4)]).toEqual([null, 0]);
  });

  it("a transient store without a chunk size (B5) has no free chunk", async () => {
    expect((await open("N", "0", 64)).consecutiveFree!(4)).toBe(0);
  });

  it("consecutiveFree(max) is how many of the next allocations are consecutive chunks, at most max", async () => {
    // Model: the chunks prepareException hands out next. P with cs = 1: E = 32, areas at chunks 1, 34,
    // 67, ...; with cs = 2: E = 64, areas at chunks 1, 66, 131.
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom<["P" | "N", string]>(["P", "1"], ["P", "2"], ["N", "4"]),
        fc.integer({ min: 4, max: 300 }), // header and area 0 fit
        fc.integer({ min: 0, max: 160 }),
        fc.integer({ min: 1, max: 40 }),
        async ([type, chunk], sizeSectors, allocated, max) => {
          const twin = async () => {
            const store = await open(type, chunk, sizeSectors);
            for (let i = 0; i < allocated && store.prepareException() !== null; i++);
            return store;
          };
          const store = await twin();
          const next: number[] = [];
          for (let c = store.prepareException(); c !== null && next.length < max; c = store.prepareException()) {
            next.push(c);
          }
          let run = 0;
          while (run < next.length && (run === 0 || next[run] === next[run - 1]! + 1)) run++;
          expect((await twin()).consecutiveFree!(max)).toBe(run);
        },
      ),
      { numRuns: 300 },
    );
  });
});

describe("loading", () => {
  const reads = (dev: ControlledDevice) => dev.log.filter((r) => r.op === "read").map((r) => r.sector);

  it("reads ahead the areas that fit on the device, up to one that ends exactly at its end", async () => {
    const ends = new ControlledDevice(101); // cs = 1: areas at chunks 1, 34, 67 and 100 (the last sector)
    await load(ends);
    ends.log.length = 0;
    await load(ends);
    expect(reads(ends)).toEqual([0, 1, 34, 67, 100]);
    // cs = 2: areas at chunks 1, 66, 131 and 196; chunk 196 (sectors 392-393) is past the end.
    const short = new ControlledDevice(392);
    await load(short, "2");
    short.log.length = 0;
    await load(short, "2");
    expect(reads(short)).toEqual([0, 2, 132, 262]);
  });

  it("reads ahead at most 4 MiB of areas: 8 areas of 512 KiB, not 12", async () => {
    // cs = 1024 (512 KiB): E = 32768, area k at chunk 1 + 32769k; the device has room for 13 areas.
    const dev = new ControlledDevice((1 + 32769 * 12 + 1) * 1024);
    await load(dev, "1024");
    dev.log.length = 0;
    await load(dev, "1024");
    expect(reads(dev)).toEqual([0, ...Array.from({ length: 8 }, (_, k) => (1 + 32769 * k) * 1024)]);
  });

  it("drops stale records after the terminator, so appending a record never exposes them (B4)", async () => {
    const dev = new ControlledDevice(1 << 12);
    const first = await load(dev);
    const pairs: [number, number][] = [];
    for (const old of [10, 11, 12]) {
      const chunk = first.store.prepareException()!;
      expect(await commit(first.store, old, chunk)).toBe(true);
      pairs.push([old, chunk]);
    }
    // An older store's records behind the terminator (slot 3) of area 0 (chunk 1, cs = 1).
    const stale = Buffer.alloc(4 * 16);
    for (let i = 0; i < 4; i++) {
      stale.writeUInt32LE(900 + i, 16 * i);
      stale.writeUInt32LE(40 + i, 16 * i + 8);
    }
    dev.writeSync(1, Buffer.concat([dev.readSync(1, 1).subarray(0, 4 * 16), stale, Buffer.alloc(512 - 8 * 16)]));
    const second = await load(dev);
    expect(second.found).toEqual(pairs);
    const chunk = second.store.prepareException()!;
    expect(await commit(second.store, 13, chunk)).toBe(true);
    expect((await load(dev)).found).toEqual([...pairs, [13, chunk]]);
  });

  it("allocates after the highest COW chunk the records use, whatever their order", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev);
    store.prepareException();
    store.prepareException();
    // Records whose COW chunks go down (an image written by another program may hold them so).
    expect(await Promise.all([commit(store, 10, 6), commit(store, 11, 3)])).toEqual([true, true]);
    const again = await load(dev);
    expect(again.found).toEqual([
      [10, 6],
      [11, 3],
    ]);
    expect(again.store.prepareException()).toBe(7);
  });

  it("warns about the chunk size only when the table's differs from the header's", async () => {
    const dev = new ControlledDevice(1 << 14, { name: "cow1" });
    await load(dev, "8");
    expect((await load(dev, "8")).logger.records).toEqual([]);
    expect((await load(dev, "16")).logger.records).toEqual([
      {
        level: "warn",
        msg: "chunk size 8 in device metadata overrides table chunk size of 16.",
        fields: { cow: "cow1" },
      },
    ]);
  });
});

describe("what the operator is told", () => {
  it("a commit callback that throws is logged, and the callbacks after it still run", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store, logger } = await load(dev);
    const [a, b] = [store.prepareException()!, store.prepareException()!];
    store.commitException(1, a, true, () => {
      throw new Error("callback bug");
    });
    expect(await commit(store, 2, b)).toBe(true);
    expect(logger.records.filter((r) => r.level === "error")).toEqual([
      {
        level: "error",
        msg: "persistent snapshot: commit callback threw",
        fields: { error: "Error: callback bug" },
      },
    ]);
    expect((await load(dev)).found).toEqual([
      [1, a],
      [2, b],
    ]);
  });

  it("a failed metadata write is logged with the COW device and the error", async () => {
    const dev = new ControlledDevice(1 << 12, { name: "cow0" });
    const { store, logger } = await load(dev);
    dev.failNext(isMetaWrite);
    expect(await commit(store, 1, store.prepareException()!)).toBe(false);
    expect(logger.records.filter((r) => r.level === "warn")).toEqual([
      {
        level: "warn",
        msg: "persistent snapshot: metadata write failed",
        fields: { cow: "cow0", error: "cow0: write of chunk 1 failed: EIO" },
      },
    ]);
  });

  it("a failed header write when invalidating is logged with the COW device and the error", async () => {
    const dev = new ControlledDevice(1 << 12, { name: "cow2" });
    const { store, logger } = await load(dev, "8");
    dev.failNext((b) => b.op === "write" && b.sector === 0);
    await store.dropSnapshot();
    expect(logger.records).toEqual([
      {
        level: "warn",
        msg: "write header failed",
        fields: { cow: "cow2", error: "cow2: write of chunk 0 failed: EIO" },
      },
    ]);
  });
});

describe("merge calls", () => {
  it("a run of records to merge needs both the origin and the COW chunks consecutive", async () => {
    const { store } = await load(new ControlledDevice(1 << 12));
    const news = [store.prepareException()!, store.prepareException()!, store.prepareException()!]; // 2, 3, 4
    // Origin chunks 10, 11, 12 in a row, COW chunks 2, 3 and then 5 (not 4): a run of one.
    await Promise.all([commit(store, 10, news[0]!), commit(store, 11, news[1]!), commit(store, 12, 5)]);
    expect(await store.prepareMerge!()).toEqual({ count: 1, oldChunk: 12, newChunk: 5 });
    await store.commitMerge!(1);
    expect(await store.prepareMerge!()).toEqual({ count: 2, oldChunk: 11, newChunk: 3 });
  });

  it("commitMerge refuses a count that is not 1 to the records in the area, and writes nothing", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev);
    await Promise.all([commit(store, 7, store.prepareException()!), commit(store, 8, store.prepareException()!)]);
    dev.log.length = 0;
    for (const count of [0, -1, 3, 1.5, Number.NaN]) {
      await expect(store.commitMerge!(count)).rejects.toThrow(
        `persistent snapshot: cannot merge ${count} of 2 records`,
      );
    }
    expect(dev.log).toEqual([]);
    await store.commitMerge!(2);
    expect((await load(dev)).found).toEqual([]);
  });

  it("drain waits for a merge's metadata write in flight", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev);
    expect(await commit(store, 7, store.prepareException()!)).toBe(true);
    await expectDrainWaitsFor(dev, store, isMetaWrite, () => store.commitMerge!(1));
    expect((await load(dev)).found).toEqual([]);
  });
});

/**
 * `start` sends a write the store's drain must wait for; it is held (`held` matches it) until
 * drain has been seen waiting, then released, and both finish.
 */
async function expectDrainWaitsFor(
  dev: ControlledDevice,
  store: { drain(): Promise<void> },
  held: (bio: Bio) => boolean,
  start: () => Promise<unknown>,
): Promise<void> {
  dev.hold(held);
  const started = start();
  const [write] = await dev.waitForHeld(1);
  let drained = false;
  const draining = store.drain().then(() => (drained = true));
  await new Promise<void>((resolve) => setImmediate(resolve));
  expect(drained).toBe(false);
  write!.release();
  await draining;
  await started;
}

describe("drain", () => {
  it("waits for an invalidation's header write in flight", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "8");
    await expectDrainWaitsFor(
      dev,
      store,
      (b) => b.op === "write" && b.sector === 0,
      () => store.dropSnapshot(),
    );
    expect(dev.readSync(0, 1).readUInt32LE(4)).toBe(0); // valid = 0 on disk
  });
});

describe("invalidation of a store that was never read", () => {
  it("dropSnapshot writes no header over a COW device it has not loaded, or could not", async () => {
    const fresh = new ControlledDevice(1 << 12);
    await createExceptionStore(["P", "8"], fresh).store.dropSnapshot();
    expect(fresh.log).toEqual([]);

    const corrupt = new ControlledDevice(1 << 12);
    corrupt.writeSync(0, Buffer.alloc(4096, 0x5a));
    const store = createExceptionStore(["P", "8"], corrupt).store;
    await expect(store.readMetadata(() => {})).rejects.toThrow("Invalid or corrupt snapshot");
    await store.dropSnapshot();
    expect(corrupt.log.filter((r) => r.op === "write")).toEqual([]);
    expect(corrupt.readSync(0, 8).every((b) => b === 0x5a)).toBe(true);
  });
});

describe("on-disk format helpers (cow-format.ts)", () => {
  it("area 0 at chunk 1 is a metadata chunk, the header and data chunks are not", () => {
    expect([0, 1, 2, 32, 33, 34, 35].map((c) => isMetadataChunk(32, c))).toEqual([
      false,
      true,
      false,
      false,
      false,
      true,
      false,
    ]);
  });

  it("le64 values past 2^32 round-trip, as the kernel writes them", () => {
    const buf = Buffer.alloc(8);
    buf.writeBigUInt64LE(2n ** 40n + 5n);
    expect(readLe64(buf, 0)).toBe(2 ** 40 + 5);
    const back = Buffer.alloc(8);
    writeLe64(back, 0, 2 ** 40 + 5);
    expect(back).toEqual(buf);
  });
});
