/**
 * The persistent exception store (dm-snap-persistent.c): constructor arguments, the byte-exact
 * on-disk format (docs/snapshot.md, "On-disk format"), loading (B3, B4), group commit, crash
 * consistency (R11), failures (R15, metadata write errors), invalidation (R7, R8), status numbers
 * and the merge operations. B and R numbers: docs/snapshot.md, "Race and bug tests".
 */
import { describe, expect, it } from "vitest";
import { Bio, BioFlags, type BioEndIo, writeBio, submitAndWait } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { MemoryLogger } from "../../core/logger.js";
import { readCowImage } from "../../targets/snapshot/cow-image.js";
import { type ExceptionStore, StoreError, createExceptionStore } from "../../targets/snapshot/store.js";
import { ControlledDevice, type CachedWrite } from "../../testing/controlled-device.js";

const META = BioFlags.PREFLUSH | BioFlags.FUA;
const isMetaWrite = (b: { op: string; flags: number }) => b.op === "write" && (b.flags & META) === META;
const metaWrites = (dev: ControlledDevice) => dev.log.filter(isMetaWrite);
/** Let every promise chain and synchronous device completion settle. */
const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

function makeStore(cow: BlockDevice, chunk = "8", type = "P", logger = new MemoryLogger()): ExceptionStore {
  return createExceptionStore([type, chunk], cow, { logger }).store;
}

async function load(cow: BlockDevice, chunk = "8", logger = new MemoryLogger()) {
  const store = makeStore(cow, chunk, "P", logger);
  const found: [number, number][] = [];
  const state = await store.readMetadata((o, n) => found.push([o, n]));
  return { store, found, state, logger };
}

function commit(store: ExceptionStore, oldChunk: number, newChunk: number, valid = true): Promise<boolean> {
  return new Promise((resolve) => store.commitException(oldChunk, newChunk, valid, resolve));
}

/** Prepare and commit `n` exceptions old = base+i, one batch (one metadata write unless an area fills). */
async function commitBatch(store: ExceptionStore, n: number, base = 0): Promise<[number, number][]> {
  const news = Array.from({ length: n }, () => store.prepareException()!);
  const results = await Promise.all(news.map((c, i) => commit(store, base + i, c)));
  expect(results.every(Boolean)).toBe(true);
  return news.map((c, i) => [base + i, c]);
}

function le64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
}

function errorOf(fn: () => unknown): StoreError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(StoreError);
    return err as StoreError;
  }
  throw new Error("did not throw");
}

describe("createExceptionStore argument parsing", () => {
  const cow = new MemoryDevice(1 << 16);
  const msg = (args: string[], c: BlockDevice = cow, originLogicalBlockSize?: number) =>
    errorOf(() => createExceptionStore(args, c, originLogicalBlockSize ? { originLogicalBlockSize } : {})).message;

  it("reports every constructor error with the kernel's message and EINVAL", () => {
    expect(msg([])).toBe("Insufficient exception store arguments");
    expect(msg(["P"])).toBe("Insufficient exception store arguments");
    expect(msg(["X", "8"])).toBe("Exception store type is not P or N");
    expect(msg(["X", "junk"])).toBe("Exception store type is not P or N");
    for (const bad of ["abc", "-8", "8k", "0x8", "4294967296", ""]) expect(msg(["P", bad])).toBe("Invalid chunk size");
    expect(msg(["P", "12"])).toBe("Chunk size is not a power of 2");
    expect(msg(["N", "3"])).toBe("Chunk size is not a power of 2");
    expect(msg(["P", "4"], new MemoryDevice(1 << 16, { logicalBlockSize: 4096 }))).toBe(
      "Chunk size is not a multiple of device blocksize",
    );
    expect(msg(["P", "4"], cow, 4096)).toBe("Chunk size is not a multiple of device blocksize");
    expect(msg(["P", "4194304"])).toBe("Chunk size is too high");
    expect(msg(["P", "2147483648"])).toBe("Chunk size is too high");
    expect(msg(["persistent", "8"])).toBe("Unsupported persistent store option: ersistent");
    expect(msg(["PX", "8"])).toBe("Unsupported persistent store option: X");
    // The chunk size is checked before the store's own options.
    expect(msg(["persistent", "12"])).toBe("Chunk size is not a power of 2");
    expect(errorOf(() => createExceptionStore(["P", "12"], cow)).errno).toBe("EINVAL");
  });

  it("matches the type on its first letter only, case-insensitively", () => {
    const table = (args: string[]) => createExceptionStore(args, cow).store;
    expect(table(["P", "8"]).statusTable()).toBe(" P 8");
    expect(table(["p", "8"]).statusTable()).toBe(" P 8");
    expect(table(["PO", "16"]).statusTable()).toBe(" PO 16");
    expect(table(["po", "16"]).userspaceSupportsOverflow).toBe(true);
    expect(table(["POX", "16"]).statusTable()).toBe(" PO 16"); // only the option's first letter counts
    expect(table(["P", "8"]).userspaceSupportsOverflow).toBe(false);
    expect(table(["Nonsense", "8"]).kind).toBe("transient");
    expect(table(["P", "+8"]).chunkSize).toBe(8); // kstrtouint accepts a sign
    expect(table(["P", "2097152"]).chunkSize).toBe(2097152);
    expect(table(["P", "0"]).chunkSize).toBe(0);
    const { store, argsUsed } = createExceptionStore(["P", "8", "1", "discard_zeroes_cow"], cow);
    expect([store.kind, argsUsed]).toEqual(["persistent", 2]);
  });
});

describe("on-disk format of a new store", () => {
  it("writes the header and zeroes area 0; usage is 16/2097152 16 for 4 KiB chunks", async () => {
    const dev = new ControlledDevice(2097152);
    dev.writeSync(8, Buffer.alloc(4096, 0xff)); // stale garbage in area 0
    const { store, state } = await load(dev, "8");
    expect(state).toBe("valid");
    const header = dev.readSync(0, 8);
    expect(header.subarray(0, 16).toString("hex")).toBe("536e417001000000010000000800000" + "0");
    expect(header.subarray(16).every((b) => b === 0)).toBe(true);
    expect(dev.readSync(8, 8).every((b) => b === 0)).toBe(true);
    // Area 0 first, then the header, both FUA (test/unit/snapshot-reused-cow.test.ts says why).
    expect(dev.log.filter((r) => r.op === "write").map((r) => [r.sector, r.sectors, r.flags])).toEqual([
      [8, 8, BioFlags.FUA],
      [0, 8, BioFlags.FUA],
    ]);
    const u = store.usage();
    expect(`${u.allocated}/${u.total} ${u.metadata}`).toBe("16/2097152 16");
    expect(store.statusTable()).toBe(" P 8");
  });

  it("uses max(32, COW block size) when the table chunk size is 0", async () => {
    expect((await load(new ControlledDevice(4096), "0")).store.chunkSize).toBe(32);
    expect((await load(new MemoryDevice(1 << 16, { logicalBlockSize: 32768 }), "0")).store.chunkSize).toBe(64);
  });

  it("allocates from chunk 2 and skips metadata chunks (cs=8: E=256, stride 257)", async () => {
    const { store } = await load(new MemoryDevice(1 << 16), "8");
    const got = Array.from({ length: 600 }, () => store.prepareException()!);
    expect(got.slice(0, 3)).toEqual([2, 3, 4]);
    expect(got[255]).toBe(257); // the last data chunk of area 0
    expect(got[256]).toBe(259); // 258 = area 1 is skipped
    expect(got[511]).toBe(514);
    expect(got[512]).toBe(516); // 515 = area 2
    expect(got).not.toContain(258);
    expect(got).not.toContain(515);
    expect(got.every((c, i) => i === 0 || c > got[i - 1]!)).toBe(true);
  });

  it("refuses allocation when the next chunk does not fit entirely (ENOSPC → null)", async () => {
    const { store } = await load(new MemoryDevice(5 * 8 + 7), "8"); // 5 whole chunks + a partial one
    expect([store.prepareException(), store.prepareException(), store.prepareException()]).toEqual([2, 3, 4]);
    expect(store.prepareException()).toBeNull();
  });

  it("puts record j of area i at byte (1 + i·(E+1))·CB + 16·j as two le64", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "1"); // CB = 512, E = 32, stride 33
    const pairs = await commitBatch(store, 40, 1000); // area 0 full (32), area 1 holds 8
    expect(pairs[31]).toEqual([1031, 33]);
    expect(pairs[32]).toEqual([1032, 35]); // chunk 34 = area 1
    const at = (i: number, j: number) => (1 + i * 33) * 512 + 16 * j;
    const image = dev.readSync(0, 200);
    for (let k = 0; k < 40; k++) {
      const [i, j] = k < 32 ? [0, k] : [1, k - 32];
      const [o, n] = pairs[k]!;
      expect(image.subarray(at(i, j), at(i, j) + 16)).toEqual(Buffer.concat([le64(o), le64(n)]));
    }
    expect(image.subarray(at(1, 8), at(2, 0)).every((b) => b === 0)).toBe(true); // terminator and rest
  });

  it("zeroes the next area before committing a full one, and covers it with the PREFLUSH", async () => {
    const dev = new ControlledDevice(1 << 12);
    dev.writeSync(34, Buffer.alloc(512, 0xaa)); // stale area 1 (chunk 34)
    const { store } = await load(dev, "1");
    dev.log.length = 0;
    await commitBatch(store, 32);
    expect(dev.log.filter((r) => r.op === "write").map((r) => [r.sector, r.flags])).toEqual([
      [34, 0],
      [1, META],
    ]);
    expect(dev.readSync(34, 1).every((b) => b === 0)).toBe(true);
    expect(store.usage().metadata).toBe(3); // areas 0 and 1 + header, cs=1
  });

  it("reproduces snapshot.rst's worked example 397896/2097152 1560", async () => {
    const dev = new MemoryDevice(2097152);
    const { store } = await load(dev, "8");
    for (let done = 0; done < 49542; done += 500) await commitBatch(store, Math.min(500, 49542 - done), done);
    const u = store.usage();
    expect(`${u.allocated}/${u.total} ${u.metadata}`).toBe("397896/2097152 1560");
    const img = await readCowImage(dev);
    expect(img.areas).toHaveLength(194);
    expect(img.areas.at(-1)).toEqual({ index: 193, chunk: 49602, records: 134, full: false });
    expect(img.usage).toEqual(u);
  });
});

describe("loading", () => {
  it("reports every stored exception back and continues allocating after them", async () => {
    const dev = new ControlledDevice(1 << 12);
    const first = await load(dev, "1");
    const pairs = [...(await commitBatch(first.store, 70, 500)), ...(await commitBatch(first.store, 3, 900))];
    const again = await load(dev, "1");
    expect(again.state).toBe("valid");
    expect(again.found).toEqual(pairs);
    expect(again.store.usage()).toEqual(first.store.usage());
    expect(again.store.prepareException()).toBe(first.store.prepareException());
  });

  it("lets the header's chunk size win, warning only when the table gave one", async () => {
    const dev = new ControlledDevice(1 << 14);
    const pairs = await commitBatch((await load(dev, "8")).store, 5);
    const table16 = await load(dev, "16");
    expect(table16.store.chunkSize).toBe(8);
    expect(table16.found).toEqual(pairs);
    expect(table16.store.statusTable()).toBe(" P 8");
    expect(table16.logger.records.map((r) => r.msg)).toContain(
      "chunk size 8 in device metadata overrides table chunk size of 16.",
    );
    const table0 = await load(dev, "0");
    expect(table0.store.chunkSize).toBe(8);
    expect(table0.found).toEqual(pairs);
    expect(table0.logger.records.filter((r) => r.level === "warn")).toEqual([]);
  });

  it("loads an invalidated store as 'invalid' without reading its exceptions", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "8");
    await commitBatch(store, 3);
    await store.dropSnapshot();
    const again = await load(dev, "8");
    expect(again.state).toBe("invalid");
    expect(again.found).toEqual([]);
  });

  it("rejects a corrupt magic, an unknown version, a bad on-disk chunk size and read errors", async () => {
    const withHeader = (magic: number, version: number, cs: number) => {
      const dev = new ControlledDevice(1 << 12);
      const h = Buffer.alloc(16);
      [magic, 1, version, cs].forEach((v, i) => h.writeUInt32LE(v, 4 * i));
      dev.writeSync(0, Buffer.concat([h, Buffer.alloc(496)]));
      return dev;
    };
    await expect(load(withHeader(0x12345678, 1, 8))).rejects.toMatchObject({
      message: "Invalid or corrupt snapshot",
      errno: "ENXIO",
    });
    await expect(load(withHeader(0x70416e53, 2, 8))).rejects.toMatchObject({
      message: "unable to handle snapshot disk version 2",
      errno: "EINVAL",
    });
    await expect(load(withHeader(0x70416e53, 1, 12))).rejects.toMatchObject({
      message: "invalid on-disk chunk size 12: Chunk size is not a power of 2.",
      errno: "EINVAL",
    });
    const broken = withHeader(0x70416e53, 1, 8);
    broken.failNext((b) => b.op === "read" && b.sector === 8);
    await expect(load(broken)).rejects.toBeInstanceOf(StoreError);
    await expect(load(withHeader(0x70416e53, 1, 8))).resolves.toMatchObject({ state: "valid", found: [] });
  });

  it("reads ahead, ignoring errors in areas it turns out not to need", async () => {
    const dev = new ControlledDevice(1 << 12);
    const pairs = await commitBatch((await load(dev, "1")).store, 40); // current area: 1
    dev.failNext((b) => b.op === "read" && b.sector === 67); // area 2
    dev.log.length = 0;
    expect((await load(dev, "1")).found).toEqual(pairs);
    expect(dev.log.filter((r) => r.op === "read").map((r) => r.sector)).toEqual([
      0,
      1,
      ...Array.from({ length: 12 }, (_, k) => 1 + 33 * (k + 1)),
    ]);
    const broken = new ControlledDevice(1 << 12);
    broken.writeSync(0, dev.readSync(0, 1 << 12));
    broken.failNext((b) => b.op === "read" && b.sector === 34); // area 1 is needed
    await expect(load(broken, "1")).rejects.toMatchObject({ errno: "EIO" });
  });

  it("B3: after exactly E data chunks behind area 0, the next allocation is E+3, not the metadata chunk E+2", async () => {
    const dev = new ControlledDevice(1 << 14);
    const pairs = await commitBatch((await load(dev, "8")).store, 256);
    expect(pairs.at(-1)).toEqual([255, 257]);
    const again = await load(dev, "8");
    expect(again.found).toHaveLength(256);
    expect(again.store.prepareException()).toBe(259);
  });

  it("B4: a reloaded partly filled area keeps its records when one more is added", async () => {
    const dev = new ControlledDevice(1 << 12);
    const pairs = await commitBatch((await load(dev, "1")).store, 37); // area 1 partly filled
    const second = await load(dev, "1");
    pairs.push(...(await commitBatch(second.store, 1, 100)));
    const third = await load(dev, "1");
    expect(third.found).toEqual(pairs);
  });
});

describe("group commit", () => {
  it("waits for every prepared exception, then writes once", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "8");
    const c = [store.prepareException()!, store.prepareException()!, store.prepareException()!];
    const done: boolean[] = [];
    store.commitException(10, c[0]!, true, (ok) => done.push(ok));
    store.commitException(11, c[1]!, true, (ok) => done.push(ok));
    await settle();
    expect([metaWrites(dev).length, done]).toEqual([0, []]);
    store.commitException(12, c[2]!, true, (ok) => done.push(ok));
    expect(done).toEqual([]); // never called back from inside commitException
    await settle();
    expect([metaWrites(dev).length, done]).toEqual([1, [true, true, true]]);
  });

  it("writes everything committed during an in-flight metadata write with exactly one more write", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "8");
    dev.hold(isMetaWrite);
    const order: number[] = [];
    const first = store.prepareException()!;
    store.commitException(100, first, true, () => order.push(-1));
    const [w1] = await dev.waitForHeld(1);
    const news = Array.from({ length: 16 }, () => store.prepareException()!);
    news.forEach((n, i) => store.commitException(200 + i, n, true, (ok) => ok && order.push(i)));
    await settle();
    expect(dev.held()).toHaveLength(1);
    expect(order).toEqual([]);
    w1!.release();
    const [w2] = await dev.waitForHeld(1);
    expect(order).toEqual([-1]); // the first write's callback, and nothing recorded only by w2
    const data = w2!.bio.data;
    expect(data.subarray(0, 16)).toEqual(Buffer.concat([le64(100), le64(first)]));
    news.forEach((n, i) =>
      expect(data.subarray(16 * (i + 1), 16 * (i + 2))).toEqual(Buffer.concat([le64(200 + i), le64(n)])),
    );
    expect(data.subarray(16 * 17, 16 * 18).every((b) => b === 0)).toBe(true);
    w2!.release();
    await settle();
    expect(order).toEqual([-1, ...news.map((_, i) => i)]);
    expect(metaWrites(dev)).toHaveLength(2);
    expect(dev.held()).toHaveLength(0);
  });

  it("keeps callbacks in commit order across a full area and a following partial one", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "1");
    dev.log.length = 0;
    dev.hold(isMetaWrite);
    const order: number[] = [];
    const c0 = store.prepareException()!;
    store.commitException(0, c0, true, () => order.push(0));
    await dev.waitForHeld(1);
    for (let i = 1; i < 40; i++) {
      const n = store.prepareException()!;
      store.commitException(i, n, true, (ok) => ok && order.push(i));
    }
    while (order.length < 40) {
      await settle();
      dev.releaseAll();
    }
    expect(order).toEqual(Array.from({ length: 40 }, (_, i) => i));
    // w(area 0, 1 record), zero area 1, w(area 0 full), w(area 1)
    expect(dev.log.filter((r) => r.op === "write").map((r) => [r.sector, r.flags])).toEqual([
      [1, META],
      [34, 0],
      [1, META],
      [34, META],
    ]);
    expect((await load(dev, "1")).found).toHaveLength(40);
  });

  it("a 1000-exception burst with 16 concurrent committers uses few metadata writes", async () => {
    const dev = new ControlledDevice(1 << 14);
    const { store } = await load(dev, "8");
    const { writes } = await runWorkload(store, dev, { total: 1000, workers: 16, seed: 7 });
    const count = metaWrites(dev).length;
    console.log(`1000-exception burst, 16 committers: ${count} metadata writes (${writes} data writes)`);
    expect(count).toBeLessThan(1000 / 8);
    expect((await load(dev, "8")).found).toHaveLength(1000);
  });
});

/** Deterministic PRNG (mulberry32). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const pattern = (oldChunk: number, bytes: number) => {
  const b = Buffer.alloc(bytes, (oldChunk % 251) + 1);
  b.writeUInt32LE(oldChunk, 0);
  return b;
};

/**
 * `workers` loops: allocate, "copy" (write the chunk's data, then a random number of event-loop
 * turns so copies finish out of order), and commit through an in-order gate (dm-snap.c: copy_callback).
 */
async function runWorkload(
  store: ExceptionStore,
  cow: BlockDevice,
  opts: { total: number; workers: number; seed: number; onAck?: (oldChunk: number) => void },
): Promise<{ allocs: number[]; writes: number }> {
  const random = rng(opts.seed);
  const allocs: number[] = [];
  const ready = new Map<number, () => void>();
  let nextCommit = 0;
  let writes = 0;
  const gate = (seq: number, fn: () => void) => {
    ready.set(seq, fn);
    for (let f; (f = ready.get(nextCommit)); nextCommit++) {
      ready.delete(nextCommit);
      f();
    }
  };
  const cs = store.chunkSize;
  const worker = async () => {
    while (allocs.length < opts.total) {
      const seq = allocs.length;
      const chunk = store.prepareException()!;
      allocs.push(chunk);
      const oldChunk = 10_000 + seq;
      await submitAndWait(cow, writeBio(chunk * cs, pattern(oldChunk, cs * 512)));
      writes++;
      for (let t = Math.floor(random() * 4); t > 0; t--) await settle();
      const ok = await new Promise<boolean>((resolve) =>
        gate(seq, () => store.commitException(oldChunk, chunk, true, resolve)),
      );
      expect(ok).toBe(true);
      opts.onAck?.(oldChunk);
    }
  };
  await Promise.all(Array.from({ length: opts.workers }, worker));
  return { allocs, writes };
}

/** Passes bios through to a ControlledDevice, calling `onEvent` before each submission and after each completion. */
class Tap implements BlockDevice, BioEndIo {
  readonly tableName = "tap";
  readonly displayName = "tap";
  readonly readOnly = false;
  readonly supportsDiscard = false;
  readonly supportsWriteZeroes = false;
  constructor(
    readonly inner: ControlledDevice,
    private readonly onEvent: () => void,
  ) {}
  get sizeSectors() {
    return this.inner.sizeSectors;
  }
  get logicalBlockSize() {
    return this.inner.logicalBlockSize;
  }
  submit(bio: Bio): void {
    this.onEvent();
    const clone = new Bio(bio.op, bio.sector, bio.sectors, bio.data, bio.flags, this);
    clone.owner = bio;
    clone.submitTo(this.inner);
  }
  bioDone(clone: Bio): void {
    this.onEvent();
    (clone.owner as Bio).complete(clone.status);
  }
  async close(): Promise<void> {}
}

describe("crash consistency (R11)", () => {
  const keeps: [string, ((w: CachedWrite) => boolean) | undefined][] = [
    ["no unflushed write", undefined],
    ["every unflushed write", () => true],
    ["odd unflushed writes", (w) => w.seq % 2 === 1],
  ];

  it("after a crash at any point, the records are a prefix of the commit order, with durable data and no leak", async () => {
    const dev = new ControlledDevice(1 << 10, { volatileCache: true });
    const acked = new Set<number>();
    const points: { image: ControlledDevice; acked: Set<number> }[] = [];
    const tap = new Tap(dev, () => {
      for (const [, keep] of keeps) points.push({ image: dev.crash(keep ? { keep } : {}), acked: new Set(acked) });
    });
    const { store } = await load(tap, "1"); // E = 32: the run crosses two area boundaries
    const { allocs } = await runWorkload(store, tap, { total: 80, workers: 5, seed: 3, onAck: (o) => acked.add(o) });
    const nextAfterAll = store.prepareException();
    expect(points.length).toBeGreaterThan(3 * 200);
    let sawPartial = 0;
    for (const { image, acked: ackedThen } of points) {
      const { found, state } = await load(image, "1");
      expect(state).toBe("valid");
      const k = found.length;
      expect(found).toEqual(allocs.slice(0, k).map((n, i) => [10_000 + i, n])); // in-order prefix
      expect(found.every(([o, n]) => image.readSync(n, 1).equals(pattern(o, 512)))).toBe(true); // data durable
      expect([...ackedThen].every((o) => o - 10_000 < k)).toBe(true); // acknowledged ⇒ recorded
      const reloaded = (await load(image, "1")).store;
      expect(reloaded.prepareException()).toBe(k < allocs.length ? allocs[k] : nextAfterAll); // nothing leaked
      if (k > 0 && k < allocs.length) sawPartial++;
    }
    expect(sawPartial).toBeGreaterThan(100);
  });

  it("copies finishing in reverse order still commit and survive in allocation order", async () => {
    const dev = new ControlledDevice(1 << 10, { volatileCache: true });
    const { store } = await load(dev, "1");
    const allocs = Array.from({ length: 10 }, () => store.prepareException()!);
    for (let i = 9; i >= 0; i--) await submitAndWait(dev, writeBio(allocs[i]!, pattern(i, 512)));
    const crashedBefore = dev.crash();
    const results = allocs.map((n, i) => commit(store, i, n));
    expect(await Promise.all(results)).toEqual(Array(10).fill(true));
    expect((await load(crashedBefore, "1")).found).toEqual([]);
    const after = dev.crash();
    expect((await load(after, "1")).found).toEqual(allocs.map((n, i) => [i, n]));
    for (const [i, n] of allocs.entries()) expect(after.readSync(n, 1)).toEqual(pattern(i, 512));
  });
});

describe("failures", () => {
  it("R15: a commit with valid=false fails its whole batch and every later commit, without hanging", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "8");
    const c = [store.prepareException()!, store.prepareException()!, store.prepareException()!];
    const results = [commit(store, 1, c[0]!), commit(store, 2, c[1]!, false), commit(store, 3, c[2]!)];
    expect(await Promise.all(results)).toEqual([false, false, false]);
    const later = store.prepareException()!;
    expect(await commit(store, 4, later)).toBe(false);
    expect(metaWrites(dev)).toHaveLength(0);
    expect((await load(dev, "8")).found).toEqual([]);
  });

  it("a metadata write error clears valid: that batch and all later callbacks fail, nothing more is written", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "8");
    expect(await commit(store, 1, store.prepareException()!)).toBe(true);
    dev.failNext(isMetaWrite);
    const a = store.prepareException()!;
    const b = store.prepareException()!;
    expect(await Promise.all([commit(store, 2, a), commit(store, 3, b)])).toEqual([false, false]);
    expect(await commit(store, 4, store.prepareException()!)).toBe(false);
    expect(dev.log.filter((r) => isMetaWrite(r)).map((r) => r.status)).toEqual(["ok", "EIO"]);
    expect((await load(dev, "8")).found).toEqual([[1, 2]]);
  });

  it("an error zeroing the next area also clears valid", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "1");
    dev.failNext((b) => b.op === "write" && b.sector === 34);
    const news = Array.from({ length: 32 }, () => store.prepareException()!);
    const results = await Promise.all(news.map((n, i) => commit(store, i, n)));
    expect(results.every((ok) => !ok)).toBe(true);
    expect(metaWrites(dev)).toHaveLength(0);
  });

  it("rejects use before readMetadata and commits without a prepared exception", async () => {
    const store = makeStore(new MemoryDevice(1 << 12));
    expect(() => store.prepareException()).toThrow(/before readMetadata/);
    await store.readMetadata(() => {});
    expect(() => store.commitException(1, 2, true, () => {})).toThrow(/without a prepared exception/);
  });
});

describe("invalidation (R7, R8)", () => {
  it("R7: dropSnapshot writes exactly SnAp/valid=0/version=1/cs while an area commit is in flight", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "8");
    dev.hold(isMetaWrite);
    const n = store.prepareException()!;
    const result = commit(store, 77, n);
    await dev.waitForHeld(1);
    await store.dropSnapshot(); // completes although the commit's write is still held (R8)
    const header = dev.readSync(0, 8);
    expect(header.subarray(0, 16).toString("hex")).toBe("536e4170000000000100000008000000");
    expect(header.subarray(16).every((b) => b === 0)).toBe(true);
    expect(dev.log.at(-1)).toMatchObject({ op: "write", sector: 0, sectors: 8 });
    dev.releaseAll();
    expect(await result).toBe(false); // the store was invalid when the write completed
    expect(dev.readSync(8, 8).subarray(0, 16)).toEqual(Buffer.concat([le64(77), le64(n)])); // area intact
    expect((await load(dev, "8")).state).toBe("invalid");
  });

  it("R8: invalidating from inside a commit callback completes at once", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "8");
    dev.hold(isMetaWrite);
    let dropped: Promise<void> | undefined;
    store.commitException(1, store.prepareException()!, true, () => {
      dropped = store.dropSnapshot();
    });
    const [w1] = await dev.waitForHeld(1);
    const second = commit(store, 2, store.prepareException()!); // queued behind w1
    w1!.release();
    await settle();
    await dropped;
    expect(dev.readSync(0, 1).readUInt32LE(4)).toBe(0);
    expect(await second).toBe(false);
    expect(metaWrites(dev)).toHaveLength(1);
  });

  it("drain waits for the metadata write in flight", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "8");
    dev.hold(isMetaWrite);
    const result = commit(store, 1, store.prepareException()!);
    await dev.waitForHeld(1);
    let drained = false;
    const draining = store.drain().then(() => (drained = true));
    await settle();
    expect(drained).toBe(false);
    dev.releaseAll();
    await draining;
    expect(await result).toBe(true);
  });

  it("a failed header write is only a warning", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store, logger } = await load(dev, "8");
    dev.failNext((b) => b.op === "write" && b.sector === 0);
    await expect(store.dropSnapshot()).resolves.toBeUndefined();
    expect(logger.records.map((r) => r.msg)).toContain("write header failed");
  });
});

describe("merge", () => {
  it("merges consecutive runs backwards, reading back the previous area, until 2cs/total 2cs", async () => {
    const dev = new ControlledDevice(1 << 14);
    const { store } = await load(dev, "8");
    await commitBatch(store, 259); // area 0: old 0..255 → 2..257; area 1: old 256..258 → 259..261
    expect(await store.prepareMerge!()).toEqual({ count: 3, oldChunk: 258, newChunk: 261 });
    dev.log.length = 0;
    await store.commitMerge!(3);
    expect(dev.log.map((r) => [r.op, r.sector, r.flags])).toEqual([["write", 258 * 8, META]]);
    expect(dev.readSync(258 * 8, 8).every((b) => b === 0)).toBe(true);
    expect(store.usage()).toEqual({ total: 1 << 14, allocated: 259 * 8, metadata: 3 * 8 });
    dev.log.length = 0;
    expect(await store.prepareMerge!()).toEqual({ count: 256, oldChunk: 255, newChunk: 257 });
    expect(dev.log.map((r) => [r.op, r.sector])).toEqual([["read", 8]]); // area 0 read back
    await store.commitMerge!(256);
    const u = store.usage();
    expect(`${u.allocated}/${u.total} ${u.metadata}`).toBe(`16/${1 << 14} 16`);
    expect(await store.prepareMerge!()).toBe(0);
    expect((await load(dev, "8")).found).toEqual([]);
  });

  it("stops a run at the first non-consecutive record", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "1");
    const olds = [5, 6, 7, 20, 21];
    const news = olds.map(() => store.prepareException()!); // 2..6
    await Promise.all(olds.map((o, i) => commit(store, o, news[i]!)));
    expect(await store.prepareMerge!()).toEqual({ count: 2, oldChunk: 21, newChunk: 6 });
    await store.commitMerge!(2);
    expect((await load(dev, "1")).found).toEqual([
      [5, 2],
      [6, 3],
      [7, 4],
    ]);
    expect(await store.prepareMerge!()).toEqual({ count: 3, oldChunk: 7, newChunk: 4 });
    expect(store.usage().allocated).toBe(1 + 3 + 1);
  });

  it("keeps the records when the merge commit fails", async () => {
    const dev = new ControlledDevice(1 << 12);
    const { store } = await load(dev, "1");
    await commitBatch(store, 2);
    dev.failNext(isMetaWrite);
    await expect(store.commitMerge!(1)).rejects.toBeInstanceOf(StoreError);
    expect(await store.prepareMerge!()).toEqual({ count: 2, oldChunk: 1, newChunk: 3 });
  });
});
