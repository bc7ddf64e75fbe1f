/**
 * snapshot / snapshot-origin behaviour through the targets (dm-snap.c: snapshot_ctr, snapshot_map,
 * origin_map; docs/snapshot.md, and its "Race and bug tests" entries B1–B5, R7, R8, R16, R19, R21,
 * R22): constructor checks, table sizing, reload, invalidation and overflow, COW throttling,
 * several snapshots of one origin, flush and discard routing, table/status text, and the on-disk
 * bytes the targets produce.
 *
 * Backing devices are ControlledDevices (RAM, with per-I/O hold/fail and an I/O log) or RAM disks;
 * nothing here sleeps: waits are for held I/O or for a turn of the event loop.
 */
import { afterEach, describe, expect, it } from "vitest";
import { BioFlags, SECTOR_SIZE, readBio, submitAndWait } from "../../core/bio.js";
import type { DeviceHandle, DeviceMapper } from "../../core/device-mapper.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { MemoryLogger } from "../../core/logger.js";
import { createDeviceMapper } from "../../index.js";
import { areaLocation, exceptionsPerArea } from "../../targets/snapshot/cow-format.js";
import { cowImageChunks, readCowImage } from "../../targets/snapshot/cow-image.js";
import { ExceptionTable } from "../../targets/snapshot/exception-table.js";
import type { SnapshotTarget } from "../../targets/snapshot/snapshot.js";
import { type BioPredicate, ControlledDevice } from "../../testing/controlled-device.js";
import { NamedBacking, pattern } from "../../testing/memory-backing.js";

const CS = 8; // 4 KiB chunks: E = 256 records per area, stride 257
const META = BioFlags.PREFLUSH | BioFlags.FUA;
const isMetaWrite: BioPredicate = (b) => b.op === "write" && (b.flags & META) === META;
/** Data writes to a COW device: copies and snapshot writes (no flags), never sector 0. */
const isCopyWrite: BioPredicate = (b) => b.op === "write" && b.flags === 0 && b.sector > 0;
const bytes = (sectors: number) => sectors * SECTOR_SIZE;
/** One turn of the event loop: every promise chain and synchronous completion has settled. */
const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

/** "SnAp", valid, version 1, chunk size; the rest of the header chunk is zero. */
function headerHex(valid: 0 | 1, cs = CS): string {
  const b = Buffer.alloc(16);
  b.writeUInt32LE(0x70416e53, 0);
  b.writeUInt32LE(valid, 4);
  b.writeUInt32LE(1, 8);
  b.writeUInt32LE(cs, 12);
  return b.toString("hex");
}

function record(oldChunk: number, newChunk: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64LE(BigInt(oldChunk), 0);
  b.writeBigUInt64LE(BigInt(newChunk), 8);
  return b;
}

function expectHeader(cow: ControlledDevice, valid: 0 | 1, cs = CS): void {
  const chunk = cow.readSync(0, cs);
  expect(chunk.subarray(0, 16).toString("hex")).toBe(headerHex(valid, cs));
  expect(chunk.subarray(16).every((b) => b === 0)).toBe(true);
}

interface World {
  dm: DeviceMapper;
  backing: NamedBacking;
  logger: MemoryLogger;
  /** Opened handles, closed before the devices are removed. */
  handles: DeviceHandle[];
  open(name: string): DeviceHandle;
  controlled(name: string, sectors: number): ControlledDevice;
  /** Target object of a device's (single-target) live table. */
  snapshot(name: string): SnapshotTarget;
  status(name: string): string;
}

const worlds: World[] = [];

function world(opts: { cowThreshold?: number } = {}): World {
  const backing = new NamedBacking();
  const logger = new MemoryLogger();
  const dm = createDeviceMapper({ backing, logger, snapshot: { cowThreshold: opts.cowThreshold } });
  const w: World = {
    dm,
    backing,
    logger,
    handles: [],
    open(name) {
      const h = dm.open(name);
      w.handles.push(h);
      return h;
    },
    controlled(name, sectors) {
      return backing.add(name, new ControlledDevice(sectors, { name }));
    },
    snapshot(name) {
      return dm.device(name).live!.targets[0] as unknown as SnapshotTarget;
    },
    status(name) {
      return dm.status(name)[0]!.params;
    },
  };
  worlds.push(w);
  return w;
}

afterEach(async () => {
  for (const w of worlds.splice(0)) {
    for (const h of w.handles) await h.close();
    await w.dm.close();
  }
});

/**
 * The documented way to take a snapshot of a live origin (docs/snapshot.md): the COW device starts
 * zeroed (a fresh ControlledDevice is), suspend the origin, create the snapshot, resume the origin.
 */
async function takeSnapshot(w: World, name: string, table: string, origin = "base"): Promise<void> {
  await w.dm.suspend(origin);
  try {
    await w.dm.create(name, { table });
  } finally {
    await w.dm.resume(origin);
  }
}

interface Stack extends World {
  origin: ControlledDevice;
  cow: ControlledDevice;
  base: DeviceHandle;
  snap: DeviceHandle;
  /** The origin's contents when the snapshot was taken. */
  before: Buffer;
}

interface StackOptions {
  originSectors?: number;
  cowSectors?: number;
  store?: string;
  cs?: number;
  features?: string;
  cowThreshold?: number;
}

async function stack(opts: StackOptions = {}): Promise<Stack> {
  const { originSectors = 2048, cowSectors = 4096, store = "P", cs = CS, features = "" } = opts;
  const w = world({ cowThreshold: opts.cowThreshold });
  const origin = w.controlled("origin", originSectors);
  const cow = w.controlled("cow", cowSectors);
  const before = pattern(1, bytes(originSectors));
  origin.writeSync(0, before);
  await w.dm.create("base", { table: `0 ${originSectors} snapshot-origin origin` });
  await takeSnapshot(w, "snap", `0 ${originSectors} snapshot origin cow ${store} ${cs}${features}`);
  return Object.assign(w, { origin, cow, base: w.open("base"), snap: w.open("snap"), before });
}

const ctrError = (w: World, table: string) =>
  w.dm.create("x", { table }).then(
    () => "created",
    (e: Error) => e.message,
  );

// ---------------------------------------------------------------------------------------------

describe("constructor (B1, B2, B5)", () => {
  it("B1: the COW device cannot be the origin, however it is spelled", async () => {
    const w = world();
    w.controlled("o", 256);
    w.controlled("c", 256);
    expect(await ctrError(w, "0 256 snapshot o o P 8")).toBe(
      "snapshot: COW device cannot be the same as origin device",
    );
    // A mapped device named by path and by major:minor is one device.
    await w.dm.create("lower", { table: "0 256 linear o 0" });
    const devno = `253:${w.dm.info("lower").minor}`;
    expect(await ctrError(w, `0 256 snapshot /dev/mapper/lower ${devno} P 8`)).toBe(
      "snapshot: COW device cannot be the same as origin device",
    );
    expect(w.dm.list()).toEqual(["lower"]);
    expect(await ctrError(w, "0 256 snapshot o c P 8")).toBe("created");
  });

  it("B2: the exception table is sized from the COW device alone, never from the origin", async () => {
    const sizes: number[] = [];
    for (const originSectors of [64, 65536]) {
      for (const cowSectors of [16384, 65536, 1 << 23]) {
        const w = world();
        w.controlled("o", originSectors);
        w.controlled("c", cowSectors);
        await w.dm.create("s", { table: `0 ${originSectors} snapshot o c P ${CS}` });
        sizes.push(w.snapshot("s").complete.capacity);
      }
    }
    // COW chunks 2048, 8192, 2^20 (capped at 2^18 buckets like the kernel's 2 MiB), whatever the origin.
    expect(sizes).toEqual([2048, 8192, 262144, 2048, 8192, 262144]);
    // The same rule on the ExceptionTable options path: only cowChunks is an input.
    expect([0, 10, 2048, 1 << 20].map((n) => ExceptionTable.initialCapacity(n))).toEqual([64, 64, 2048, 262144]);
    expect(new ExceptionTable({ cowChunks: 8192 }).capacity).toBe(8192);
  });

  it("B5: a transient store with chunk size 0 fails with 'Chunk size not set' and leaves nothing behind", async () => {
    const w = world();
    const origin = w.controlled("o", 256);
    w.controlled("c", 256);
    await w.dm.create("base", { table: "0 256 snapshot-origin o" });
    expect(await ctrError(w, "0 256 snapshot o c N 0")).toBe("snapshot: Chunk size not set");
    expect(await ctrError(w, "0 256 snapshot o c n 0")).toBe("snapshot: Chunk size not set");
    expect(w.dm.list()).toEqual(["base"]);
    // No half-registered snapshot: origin writes need no copy.
    await w.dm.suspend("base");
    await w.dm.resume("base");
    await w.open("base").write(0, pattern(2, 4096));
    expect(origin.counters.reads).toBe(0);
    expect(origin.readSync(0, 8).equals(pattern(2, 4096))).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------

describe("reactivation of a persistent snapshot (B3, B4)", () => {
  it("B3: after exactly E data chunks behind area 0, the reloaded snapshot allocates E+3, never the metadata chunk E+2", async () => {
    const E = exceptionsPerArea(CS); // 256
    const s = await stack({ originSectors: 4096, cowSectors: 8192 });
    for (let c = 0; c < E; c++) await s.base.write(c * CS, pattern(1000 + c, 512));
    expect(s.status("snap")).toBe(`${(E + 3) * CS}/8192 ${3 * CS}`);
    await s.snap.close();
    await s.dm.remove("snap");
    await takeSnapshot(s, "snap2", `0 4096 snapshot origin cow P ${CS}`);
    expect(s.status("snap2")).toBe(`${(E + 3) * CS}/8192 ${3 * CS}`);
    await s.base.write(E * CS, pattern(9999, 512)); // origin chunk E: one more exception
    const img = await readCowImage(s.cow);
    expect(img.problems).toEqual([]);
    expect(img.records).toHaveLength(E + 1);
    expect(img.records.at(-1)).toEqual({ area: 1, slot: 0, oldChunk: E, newChunk: E + 3 });
    expect(s.cow.readSync((E + 2) * CS, 1).subarray(0, 32)).toEqual(
      Buffer.concat([record(E, E + 3), Buffer.alloc(16)]),
    );
    // The saved chunk is in E+3 and the snapshot reads it back.
    const snap2 = s.open("snap2");
    expect((await snap2.read(E * CS, CS)).equals(s.before.subarray(bytes(E * CS), bytes((E + 1) * CS)))).toBe(true);
    expect((await snap2.read(0, 4096)).equals(s.before)).toBe(true);
  });

  it("B4: reactivate with a partly filled area, keep writing, reactivate again: every record and chunk survives", async () => {
    const s = await stack();
    const model = Buffer.from(s.before); // what the snapshot should read
    for (const c of [4, 1, 9]) await s.base.write(c * CS + 3, pattern(c, 512));
    await s.snap.write(20 * CS, pattern(20, bytes(CS))); // whole chunk
    pattern(20, bytes(CS)).copy(model, bytes(20 * CS));
    const firstGeneration = (await readCowImage(s.cow)).records.map((r) => [r.oldChunk, r.newChunk]);
    expect(firstGeneration).toEqual([
      [4, 2],
      [1, 3],
      [9, 4],
      [20, 5],
    ]);

    let name = "snap";
    await s.snap.close();
    for (const [gen, chunks] of [
      [1, [30, 2, 31]],
      [2, [40]],
    ] as const) {
      await s.dm.remove(name);
      name = `snap-gen${gen}`;
      await takeSnapshot(s, name, `0 2048 snapshot origin cow P 0`);
      const snap = s.open(name);
      for (const c of chunks) {
        await s.base.write(c * CS, pattern(100 + c, 1024)); // origin writes: copies where needed
        await snap.write(c * CS + 5, pattern(200 + c, 512)); // and snapshot writes on top
        pattern(200 + c, 512).copy(model, bytes(c * CS + 5));
      }
      await snap.close();
    }
    await s.dm.remove(name);
    await takeSnapshot(s, "last", `0 2048 snapshot origin cow P 8`);
    const img = await readCowImage(s.cow);
    expect(img.problems).toEqual([]);
    expect(img.records.map((r) => [r.oldChunk, r.newChunk])).toEqual([
      ...firstGeneration,
      [30, 6],
      [2, 7],
      [31, 8],
      [40, 9],
    ]);
    expect((await s.open("last").read(0, 2048)).equals(model)).toBe(true);
    expect(s.status("last")).toBe(`${10 * CS}/4096 ${2 * CS}`);
  });
});

// ---------------------------------------------------------------------------------------------

describe("invalidation (R7, R8) and failures", () => {
  it("R7: invalidation while a commit is in flight writes exactly SnAp/valid=0/version=1/cs; the area chunk stays intact", async () => {
    const s = await stack({ cowSectors: 3 * CS }); // header, area 0, one data chunk
    const held = s.cow.hold(isMetaWrite);
    const w1 = s.base.write(0, pattern(2, 512)); // chunk 0: copy, then a commit that stays in flight
    const [commitWrite] = await s.cow.waitForHeld(1);
    expect(commitWrite!.sector).toBe(CS);
    await s.base.write(5 * CS, pattern(3, 512)); // chunk 5: COW full → invalidated; the write itself succeeds
    expect(s.status("snap")).toBe("Invalid");
    await settle();
    expectHeader(s.cow, 0);
    s.cow.stopHolding(held);
    commitWrite!.release();
    await w1; // origin writes are retried, never failed
    const area = s.cow.readSync(CS, CS);
    expect(area.subarray(0, 16)).toEqual(record(0, 2));
    expect(area.subarray(16).every((b) => b === 0)).toBe(true);
    expectHeader(s.cow, 0); // the area write did not touch the header
    expect(s.origin.readSync(0, 1).equals(pattern(2, 512))).toBe(true);
    expect(s.origin.readSync(5 * CS, 1).equals(pattern(3, 512))).toBe(true);
    // The next activation reads that header and loads the snapshot as invalid.
    await s.dm.remove("snap", { force: true });
    await takeSnapshot(s, "again", "0 2048 snapshot origin cow P 8");
    expect(s.status("again")).toBe("Invalid");
  });

  it("R8: a snapshot invalidated from inside another snapshot's copy callback completes, with no deadlock", async () => {
    const w = world();
    const origin = w.controlled("origin", 2048);
    const cow1 = w.controlled("cow1", 2048);
    const cow2 = w.controlled("cow2", 2 * CS); // header + area 0: no room for data
    origin.writeSync(0, pattern(1, bytes(2048)));
    await w.dm.create("base", { table: "0 2048 snapshot-origin origin" });
    // s1 transient: its commit (and so the retry of the origin write) runs inside the copy callback.
    await takeSnapshot(w, "s1", `0 2048 snapshot origin cow1 N ${CS}`);
    await w.dm.create("s2");
    await w.dm.load("s2", `0 2048 snapshot origin cow2 P ${CS}`); // registered, not active yet
    const held = cow1.hold((b) => b.op === "write"); // transient: the copy goes to COW chunk 0
    const base = w.open("base");
    const write = base.write(3, pattern(2, 512));
    const [copy] = await cow1.waitForHeld(1);
    await w.dm.resume("s2");
    // s2 becomes active while the origin write waits on s1's copy
    expect(w.status("s2")).toBe(`${2 * CS}/${2 * CS} ${2 * CS}`);
    cow1.stopHolding(held);
    copy!.release(); // copy callback → s1 complete → origin write retried → s2 needs a chunk: invalidated
    await write;
    expect(w.status("s2")).toBe("Invalid");
    expect(w.logger.records.map((r) => r.msg)).toContain("Invalidating snapshot: Unable to allocate exception.");
    await settle();
    expectHeader(cow2, 0);
    expect(w.status("s1")).toBe(`${CS}/2048 0`);
    expect((await w.open("s1").read(0, CS)).equals(pattern(1, bytes(2048)).subarray(0, bytes(CS)))).toBe(true);
    expect(origin.readSync(3, 1).equals(pattern(2, 512))).toBe(true);
  });

  it("a COW write error invalidates; the state survives reactivation and the origin never sees an error", async () => {
    const s = await stack();
    const events = s.dm.info("snap").eventNr;
    s.cow.failNext(isCopyWrite);
    await s.base.write(3 * CS, pattern(2, 512));
    expect(s.status("snap")).toBe("Invalid");
    expect(s.dm.info("snap").eventNr).toBe(events + 1);
    expect(s.logger.records.map((r) => r.msg)).toContain("Invalidating snapshot: Error reading/writing.");
    await expect(s.snap.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
    await expect(s.snap.write(0, pattern(3, 512))).rejects.toMatchObject({ status: "EIO" });
    // The origin goes on working, with no more copies for the invalid snapshot.
    const copiesBefore = s.cow.counters.writes;
    for (let c = 0; c < 20; c++) await s.base.write(c * CS, pattern(10 + c, 1024));
    expect(s.cow.counters.writes).toBe(copiesBefore);
    expect(s.origin.counters.failed).toBe(0);
    expect(s.origin.readSync(3 * CS, 2).equals(pattern(13, 1024))).toBe(true);
    await settle();
    expectHeader(s.cow, 0);
    // Reactivation: still invalid (header valid=0), logged, all I/O fails.
    await s.dm.remove("snap", { force: true });
    s.handles.length = 1;
    await takeSnapshot(s, "snap2", "0 2048 snapshot origin cow P 8");
    expect(s.status("snap2")).toBe("Invalid");
    expect(s.logger.records.map((r) => r.msg)).toContain("Snapshot is marked invalid.");
    await expect(s.open("snap2").read(0, 8)).rejects.toMatchObject({ status: "EIO" });
    await s.base.write(0, pattern(4, 512));
    expect(s.origin.counters.failed).toBe(0);
  });

  it("an origin read error during a copy and a metadata write error both invalidate; waiting writes complete", async () => {
    for (const fault of ["origin read", "metadata write"] as const) {
      const s = await stack();
      if (fault === "origin read") s.origin.failNext((b) => b.op === "read");
      else s.cow.failNext(isMetaWrite);
      const snapWrite = s.snap.write(6 * CS + 1, pattern(5, 512)); // partial chunk: needs the copy
      const originWrite = s.base.write(6 * CS + 2, pattern(6, 512)); // queues on the same exception
      await expect(snapWrite).rejects.toMatchObject({ status: "EIO" });
      await originWrite;
      expect(s.status("snap")).toBe("Invalid");
      expect(s.origin.readSync(6 * CS + 2, 1).equals(pattern(6, 512))).toBe(true);
      await settle();
      expectHeader(s.cow, 0);
    }
  });

  it("status words: Invalid for P on a full COW (snapshot write), Overflow only for PO", async () => {
    for (const [store, word] of [
      ["P", "Invalid"],
      ["PO", "Overflow"],
      ["N", "Invalid"],
    ] as const) {
      const s = await stack({ store, cowSectors: store === "N" ? CS : 3 * CS }); // room for one data chunk
      await s.snap.write(0, pattern(7, bytes(CS)));
      await expect(s.snap.write(CS, pattern(8, bytes(CS)))).rejects.toMatchObject({ status: "EIO" });
      expect(s.status("snap")).toBe(word);
    }
  });
});

// ---------------------------------------------------------------------------------------------

describe("overflow (R19)", () => {
  it("R19: a PO store that fills on snapshot writes overflows, keeps its data readable and its header valid; an origin write then invalidates", async () => {
    const k = 3;
    const s = await stack({ store: "PO", cowSectors: (2 + k) * CS });
    const model = Buffer.from(s.before);
    for (let c = 0; c < k; c++) {
      await s.snap.write(c * 4 * CS + 1, pattern(30 + c, 512)); // partial writes: copy, then write
      pattern(30 + c, 512).copy(model, bytes(c * 4 * CS + 1));
    }
    expect(s.status("snap")).toBe(`${(2 + k) * CS}/${(2 + k) * CS} ${2 * CS}`);
    await expect(s.snap.write(50 * CS, pattern(40, 512))).rejects.toMatchObject({ status: "EIO" }); // chunk k+1
    expect(s.status("snap")).toBe("Overflow");
    expect(s.logger.records.map((r) => r.msg)).toContain("Snapshot overflowed: Unable to allocate exception.");
    // Reads still work, from the COW and from the origin; every write now fails, even to copied chunks.
    expect((await s.snap.read(0, 2048)).equals(model)).toBe(true);
    await expect(s.snap.write(1, pattern(41, 512))).rejects.toMatchObject({ status: "EIO" });
    await settle();
    expectHeader(s.cow, 1);
    // Origin writes to chunks the snapshot already has need nothing.
    await s.base.write(4 * CS, pattern(42, 512));
    expect(s.status("snap")).toBe("Overflow");
    // An origin write that needs a new chunk invalidates, PO or not; the write itself succeeds.
    await s.base.write(60 * CS, pattern(43, 512));
    expect(s.status("snap")).toBe("Invalid");
    await settle();
    expectHeader(s.cow, 0);
    expect(s.origin.readSync(60 * CS, 1).equals(pattern(43, 512))).toBe(true);
    expect(s.origin.counters.failed).toBe(0);
  });
});

// ---------------------------------------------------------------------------------------------

describe("origin registry (R6)", () => {
  it("R6: a snapshot constructor waiting on its COW device does not hold up origin writes", async () => {
    const s = await stack();
    const cow2 = s.controlled("cow2", 4096);
    const held = cow2.hold((b) => b.op === "read");
    await s.dm.create("snap2");
    const loading = s.dm.load("snap2", `0 2048 snapshot origin cow2 P ${CS}`);
    await cow2.waitForHeld(1); // the ctr is reading the header
    // Origin writes, with copies into the existing snapshot, go on meanwhile.
    for (let c = 0; c < 4; c++) await s.base.write(c * CS, pattern(60 + c, 512));
    expect(s.status("snap")).toBe(`${6 * CS}/4096 ${2 * CS}`);
    cow2.stopHolding(held);
    cow2.releaseAll();
    await loading;
    await s.dm.resume("snap2");
    expect(s.status("snap2")).toBe(`${2 * CS}/4096 ${2 * CS}`);
    expect((await s.snap.read(0, 2048)).equals(s.before)).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------

describe("COW throttling (R16)", () => {
  it("R16: with threshold 2, stalled copies, queued origin and snapshot writes and a snapshot ctr in between, everything completes", async () => {
    const s = await stack({ cowThreshold: 2 });
    const held = s.cow.hold(isCopyWrite);
    const writes = Array.from({ length: 12 }, (_, c) => s.base.write(c * CS + 1, pattern(50 + c, 512)));
    const snapWrites = [s.snap.write(40 * CS + 2, pattern(70, 512)), s.snap.write(41 * CS, pattern(71, bytes(CS)))];
    await s.cow.waitForHeld(3);
    await settle();
    // Three copies in flight (threshold + 1); every other writer parked before taking anything.
    expect(s.cow.held()).toHaveLength(3);
    expect(s.snapshot("snap").inProgress).toBe(3);
    // A snapshot constructor (registry change) while writers are parked.
    s.controlled("cow2", 4096);
    await s.dm.create("snap2");
    await s.dm.load("snap2", `0 2048 snapshot origin cow2 P ${CS}`);
    s.cow.stopHolding(held);
    s.cow.releaseAll();
    await Promise.all([...writes, ...snapWrites]);
    expect(s.snapshot("snap").inProgress).toBe(0);
    await s.dm.resume("snap2");
    // Point-in-time data intact; every origin write landed.
    const model = Buffer.from(s.before);
    pattern(70, 512).copy(model, bytes(40 * CS + 2));
    pattern(71, bytes(CS)).copy(model, bytes(41 * CS));
    expect((await s.snap.read(0, 2048)).equals(model)).toBe(true);
    for (let c = 0; c < 12; c++) expect(s.origin.readSync(c * CS + 1, 1).equals(pattern(50 + c, 512))).toBe(true);
    expect(s.status("snap")).toBe(`${(2 + 14) * CS}/4096 ${2 * CS}`);
  });
});

// ---------------------------------------------------------------------------------------------

describe("origins without snapshots and huge tables (R21, R22)", () => {
  it("R21: an origin with no snapshots takes a huge write whole, before any snapshot and after the last one goes", async () => {
    const w = world();
    const sectors = 1 << 17; // 64 MiB
    const origin = w.controlled("origin", sectors);
    w.controlled("cow", 4096);
    await w.dm.create("base", { table: `0 ${sectors} snapshot-origin origin` });
    const base = w.open("base");
    const big = pattern(3, bytes(sectors));
    await base.write(0, big);
    expect(origin.log.filter((r) => r.op === "write").map((r) => [r.sector, r.sectors])).toEqual([[0, sectors]]);
    // With a snapshot, writes are cut at its chunk size…
    await takeSnapshot(w, "snap", `0 ${sectors} snapshot origin cow P ${CS}`);
    origin.log.length = 0;
    await base.write(CS - 2, pattern(4, bytes(4)));
    expect(origin.log.filter((r) => r.op === "write").map((r) => [r.sector, r.sectors])).toEqual([
      [CS - 2, 2],
      [CS, 2],
    ]);
    // …while a chunk in the range still needs its copy; once both chunks have their exceptions,
    // the same write goes whole (nothing to copy anywhere in it).
    origin.log.length = 0;
    await base.write(CS - 2, pattern(5, bytes(4)));
    expect(origin.log.filter((r) => r.op === "write").map((r) => [r.sector, r.sectors])).toEqual([[CS - 2, 4]]);
    // A range ending in a chunk not yet copied: the settled part goes in one piece, the chunk that
    // needs its copy alone, and the snapshot keeps that chunk's old data.
    origin.log.length = 0;
    await base.write(CS - 2, pattern(6, bytes(CS + 4)));
    expect(origin.log.filter((r) => r.op === "write").map((r) => [r.sector, r.sectors])).toEqual([
      [CS - 2, CS + 2],
      [2 * CS, 2],
    ]);
    // An uncopied chunk first (chunk 3; 4–6 copied): it goes alone, then the settled rest in one piece.
    await base.write(4 * CS, pattern(7, bytes(3 * CS)));
    origin.log.length = 0;
    await base.write(3 * CS, pattern(8, bytes(4 * CS)));
    // (Log order is completion order: the settled piece finishes while chunk 3 is still copied.)
    const pieces = origin.log.filter((r) => r.op === "write").map((r) => [r.sector, r.sectors]);
    expect(pieces.sort((a, b) => a[0]! - b[0]!)).toEqual([
      [3 * CS, CS],
      [4 * CS, 3 * CS],
    ]);
    const snap = w.open("snap");
    expect((await snap.read(2 * CS, 2)).equals(big.subarray(bytes(2 * CS), bytes(2 * CS + 2)))).toBe(true);
    expect((await snap.read(3 * CS, 4 * CS)).equals(big.subarray(bytes(3 * CS), bytes(7 * CS)))).toBe(true);
    await snap.close();
    // …and once the last snapshot is gone (origin resumed), not at all.
    await w.dm.remove("snap");
    await w.dm.suspend("base");
    await w.dm.resume("base");
    origin.log.length = 0;
    await base.write(0, big);
    expect(origin.log.filter((r) => r.op === "write").map((r) => [r.sector, r.sectors])).toEqual([[0, sectors]]);
    expect(origin.readSync(sectors - 8, 8).equals(big.subarray(bytes(sectors - 8)))).toBe(true);
  });

  it("R22: removing a snapshot holding 10^6 exceptions yields to the event loop", async () => {
    const w = world();
    const cs = 64; // E = 2048: 489 metadata areas for 10^6 exceptions
    const n = 1_000_000;
    const originChunks = 1 << 20;
    // Scattered origin chunks (an odd multiplier is a bijection mod 2^20): no two records form a run.
    const image = cowImageChunks({
      chunkSize: cs,
      exceptions: n,
      oldChunk: (i) => Math.imul(i, 0x9e3779b1) & (originChunks - 1),
    });
    let next = image.next();
    const chunks: { chunk: number; data: Buffer }[] = [];
    for (; !next.done; next = image.next()) chunks.push(next.value);
    const cow = w.controlled("cow", next.value.minSectors);
    for (const c of chunks) cow.writeSync(c.chunk * cs, c.data);
    w.controlled("origin", originChunks * cs);
    await w.dm.create("base", { table: `0 ${originChunks * cs} snapshot-origin origin` });
    await takeSnapshot(w, "snap", `0 ${originChunks * cs} snapshot origin cow P ${cs}`);
    const table = w.snapshot("snap").complete;
    expect(table.size).toBe(n);
    expect(table.entryCount).toBe(n);
    expect(w.status("snap")).toBe(`${next.value.nextFree * cs}/${next.value.minSectors} ${(489 + 1) * cs}`);
    let turns = 0;
    let counting = true;
    const tick = () => {
      turns++;
      if (counting) setImmediate(tick);
    };
    setImmediate(tick);
    turns = 0;
    await w.dm.remove("snap");
    counting = false;
    expect(turns).toBeGreaterThanOrEqual(1);
    expect(table.size).toBe(0);
  });
});

// ---------------------------------------------------------------------------------------------

describe("several snapshots of one origin", () => {
  it("snapshots with chunk sizes 8, 16 and 32 each keep their own point in time", async () => {
    const w = world();
    const sectors = 4096;
    const origin = w.controlled("origin", sectors);
    origin.writeSync(0, pattern(1, bytes(sectors)));
    await w.dm.create("base", { table: `0 ${sectors} snapshot-origin origin` });
    const base = w.open("base");
    const model = Buffer.from(pattern(1, bytes(sectors)));
    const images: [string, Buffer][] = [];
    // Writes of odd sizes at odd offsets, crossing chunk boundaries of every size.
    const edits: [number, number][] = [
      [5, 20],
      [60, 70],
      [200, 9],
      [1000, 300],
      [31, 2],
      [3980, 96],
    ];
    for (const [i, cs] of [8, 16, 32].entries()) {
      w.controlled(`cow${cs}`, 8192);
      await takeSnapshot(w, `s${cs}`, `0 ${sectors} snapshot origin cow${cs} P ${cs}`);
      images.push([`s${cs}`, Buffer.from(model)]);
      for (const [j, [at, len]] of edits.entries()) {
        const data = pattern(100 * i + j + 2, bytes(len));
        await base.write(at + 7 * i, data);
        data.copy(model, bytes(at + 7 * i));
      }
    }
    for (const [name, image] of images) expect((await w.open(name).read(0, sectors)).equals(image), name).toBe(true);
    expect((await base.read(0, sectors)).equals(model)).toBe(true);
    // A snapshot write lands in that snapshot only.
    await w.open("s16").write(100, pattern(99, 512));
    pattern(99, 512).copy(images[1]![1], bytes(100));
    for (const [name, image] of images) expect((await w.open(name).read(0, sectors)).equals(image), name).toBe(true);
    expect(w.dm.tableText("s32")).toBe(`0 ${sectors} snapshot origin cow32 P 32\n`);
  });

  it("origin writes beyond a snapshot's length, or to a snapshot loaded but never resumed, copy nothing", async () => {
    const w = world();
    const origin = w.controlled("origin", 2048);
    w.controlled("short", 4096);
    w.controlled("idle", 4096);
    await w.dm.create("base", { table: "0 2048 snapshot-origin origin" });
    await takeSnapshot(w, "short", `0 1024 snapshot origin short P ${CS}`);
    await w.dm.create("idle");
    await w.dm.load("idle", `0 2048 snapshot origin idle P ${CS}`);
    const base = w.open("base");
    await base.write(1500, pattern(2, 512));
    expect(origin.counters.reads).toBe(0);
    expect(w.status("short")).toBe(`${2 * CS}/4096 ${2 * CS}`);
    await base.write(10, pattern(3, 512));
    expect(w.status("short")).toBe(`${3 * CS}/4096 ${2 * CS}`);
    expect(origin.counters.reads).toBe(1);
    await w.dm.resume("idle");
    expect(w.status("idle")).toBe(`${2 * CS}/4096 ${2 * CS}`);
  });

  it("an origin write needing a copy in 3 snapshots of one chunk size reads the origin chunk once", async () => {
    const w = world();
    const origin = w.controlled("origin", 2048);
    origin.writeSync(0, pattern(1, bytes(2048)));
    await w.dm.create("base", { table: "0 2048 snapshot-origin origin" });
    const cows = [1, 2, 3].map((i) => w.controlled(`cow${i}`, 4096));
    for (const i of [1, 2, 3]) await takeSnapshot(w, `s${i}`, `0 2048 snapshot origin cow${i} P ${CS}`);
    origin.log.length = 0;
    await w.open("base").write(7 * CS + 3, pattern(2, 512));
    const reads = origin.log.filter((r) => r.op === "read");
    expect(reads.map((r) => [r.sector, r.sectors])).toEqual([[7 * CS, CS]]);
    for (const [i, cow] of cows.entries()) {
      expect(
        cow.readSync(2 * CS, CS).equals(pattern(1, bytes(2048)).subarray(bytes(7 * CS), bytes(8 * CS))),
        `cow${i + 1}`,
      ).toBe(true);
      expect(w.status(`s${i + 1}`)).toBe(`${3 * CS}/4096 ${2 * CS}`);
    }
  });
});

// ---------------------------------------------------------------------------------------------

describe("flush and discard", () => {
  it("a snapshot flush goes to the COW device, an origin flush to the origin", async () => {
    const s = await stack();
    const flushes = () => [s.origin.counters.flushes, s.cow.counters.flushes];
    const [o0, c0] = flushes();
    await s.snap.flush();
    expect(flushes()).toEqual([o0, c0! + 1]);
    await s.base.flush();
    expect(flushes()).toEqual([o0! + 1, c0! + 1]);
  });

  it("snapshot-origin advertises no discard, and neither does a snapshot without discard_zeroes_cow", async () => {
    const s = await stack();
    expect(s.dm.device("base").supportsDiscard).toBe(false);
    expect(s.dm.device("snap").supportsDiscard).toBe(false);
    await expect(s.base.discard(0, CS)).rejects.toMatchObject({ status: "EOPNOTSUPP" });
    await expect(s.snap.discard(0, CS)).rejects.toMatchObject({ status: "EOPNOTSUPP" });
    expect(s.origin.counters.discards + s.origin.counters.reads + s.cow.counters.discards).toBe(0);
    expect(s.status("snap")).toBe(`${2 * CS}/4096 ${2 * CS}`);
  });

  it("discard_zeroes_cow: whole-chunk discards zero the COW copy, partial ones go to the COW, unmapped ones complete without a copy", async () => {
    const s = await stack({ features: " 1 discard_zeroes_cow" });
    expect(s.dm.tableText("snap")).toBe("0 2048 snapshot origin cow P 8 1 discard_zeroes_cow\n");
    expect(s.dm.device("snap").supportsDiscard).toBe(true);
    expect(s.dm.device("base").supportsDiscard).toBe(false);
    await s.base.write(3 * CS, pattern(2, 512)); // chunk 3 → COW chunk 2
    await s.base.write(4 * CS, pattern(3, 512)); // chunk 4 → COW chunk 3
    const status = s.status("snap");
    expect(status).toBe(`${4 * CS}/4096 ${2 * CS}`);

    // Whole chunk with an exception: zeroed in the COW, reads as zeros, the exception stays.
    await s.snap.discard(3 * CS, CS);
    expect(s.cow.readSync(2 * CS, CS).every((b) => b === 0)).toBe(true);
    expect((await s.snap.read(3 * CS, CS)).every((b) => b === 0)).toBe(true);
    expect(s.status("snap")).toBe(status);
    expect(s.origin.readSync(3 * CS, 1).equals(pattern(2, 512))).toBe(true);

    // Part of a chunk with an exception: passed to the COW location.
    s.cow.log.length = 0;
    await s.snap.discard(4 * CS + 1, 2);
    expect(s.cow.log.map((r) => [r.op, r.sector, r.sectors])).toEqual([["discard", 3 * CS + 1, 2]]);

    // No exception: completes at once, no copy, nothing reaches either device.
    s.cow.log.length = 0;
    s.origin.log.length = 0;
    await s.snap.discard(10 * CS, CS);
    await s.snap.discard(11 * CS + 2, 3);
    expect([s.cow.log, s.origin.log]).toEqual([[], []]);
    expect(s.status("snap")).toBe(status);
    expect((await s.snap.read(10 * CS, 2 * CS)).equals(s.before.subarray(bytes(10 * CS), bytes(12 * CS)))).toBe(true);
  });

  // Guards the split of discards at the snapshot's chunk size (Target.maxDiscardSectors): without
  // it one multi-chunk discard was remapped to a single COW range, zeroing unrelated chunks.
  it("discard_zeroes_cow: a discard spanning several chunks treats each chunk on its own and never touches other exceptions' COW chunks", async () => {
    // The kernel never hands the snapshot a discard crossing a chunk: snapshot_io_hints sets
    // max_discard_sectors = discard_granularity = chunk size, so the block layer splits first.
    const s = await stack({ features: " 1 discard_zeroes_cow" });
    await s.base.write(3 * CS, pattern(2, 512)); // chunk 3 → COW chunk 2
    await s.base.write(10 * CS, pattern(3, 512)); // chunk 10 → COW chunk 3
    await s.base.write(4 * CS, pattern(4, 512)); // chunk 4 → COW chunk 4
    const chunk10 = s.before.subarray(bytes(10 * CS), bytes(11 * CS));
    await s.snap.discard(3 * CS, 2 * CS); // chunks 3 and 4, both whole
    expect(s.cow.readSync(3 * CS, CS).equals(chunk10)).toBe(true); // chunk 10's copy is untouched
    expect((await s.snap.read(10 * CS, CS)).equals(chunk10)).toBe(true);
    expect((await s.snap.read(3 * CS, 2 * CS)).every((b) => b === 0)).toBe(true);
  });

  it("discard_passdown_origin: clone 1 reaches the origin device directly (no COW), clone 0 the COW", async () => {
    const s = await stack({ features: " 2 discard_zeroes_cow discard_passdown_origin" });
    expect(s.dm.tableText("snap")).toBe(
      "0 2048 snapshot origin cow P 8 2 discard_zeroes_cow discard_passdown_origin\n",
    );
    await s.base.write(3 * CS, pattern(2, 512)); // chunk 3 → COW chunk 2
    s.cow.log.length = 0;
    s.origin.log.length = 0;
    await s.snap.discard(10 * CS, CS); // no exception
    expect(s.origin.log.map((r) => [r.op, r.sector, r.sectors])).toEqual([["discard", 10 * CS, CS]]);
    expect(s.cow.log).toEqual([]);
    expect(s.status("snap")).toBe(`${3 * CS}/4096 ${2 * CS}`);
    s.origin.log.length = 0;
    await s.snap.discard(3 * CS, CS); // with an exception: COW chunk zeroed and the origin discarded
    expect(s.origin.log.map((r) => [r.op, r.sector, r.sectors])).toEqual([["discard", 3 * CS, CS]]);
    expect(s.cow.readSync(2 * CS, CS).every((b) => b === 0)).toBe(true);
    expect(s.cow.log.map((r) => r.op)).toEqual(["write-zeroes"]);
  });
});

// ---------------------------------------------------------------------------------------------

describe("table and status text", () => {
  it("prints tables as the kernel does: store word, chunk size from the header, features in canonical order", async () => {
    const w = world();
    w.controlled("o", 2048);
    const cases: [string, string, string][] = [
      ["P 8", "P 8", `${2 * CS}/4096 ${2 * CS}`],
      ["p 8", "P 8", `${2 * CS}/4096 ${2 * CS}`],
      ["PO 16", "PO 16", "32/4096 32"],
      ["po 16", "PO 16", "32/4096 32"],
      ["P 0", "P 32", "64/4096 64"],
      ["N 8", "N 8", "0/4096 0"],
      ["Nanything 8", "N 8", "0/4096 0"],
      ["P 8 1 discard_zeroes_cow", "P 8 1 discard_zeroes_cow", "16/4096 16"],
      [
        "P 8 2 discard_passdown_origin discard_zeroes_cow",
        "P 8 2 discard_zeroes_cow discard_passdown_origin",
        "16/4096 16",
      ],
      ["PO 8 0", "PO 8", "16/4096 16"],
    ];
    for (const [i, [args, table, status]] of cases.entries()) {
      w.controlled(`c${i}`, 4096);
      await w.dm.create(`s${i}`, { table: `0 2048 snapshot o c${i} ${args}` });
      expect(w.dm.tableText(`s${i}`), args).toBe(`0 2048 snapshot o c${i} ${table}\n`);
      expect(w.dm.status(`s${i}`), args).toEqual([{ start: 0, length: 2048, type: "snapshot", params: status }]);
    }
    await w.dm.create("base", { table: "0 2048 snapshot-origin o" });
    expect(w.dm.tableText("base")).toBe("0 2048 snapshot-origin o\n");
    expect(w.dm.status("base")).toEqual([{ start: 0, length: 2048, type: "snapshot-origin", params: "" }]);
    const types = Object.fromEntries(w.dm.targets().map((t) => [t.name, t.version.join(".")]));
    expect(types).toMatchObject({ snapshot: "1.16.0", "snapshot-origin": "1.9.0" });
  });

  it("reports constructor errors with the kernel's strings", async () => {
    const w = world();
    w.controlled("o", 256);
    w.controlled("c", 256);
    const cases: [string, string][] = [
      ["o c P", "requires 4 or more arguments"],
      ["o c P 8 3 discard_zeroes_cow discard_passdown_origin x", "Invalid number of feature arguments"],
      ["o c P 8 2 discard_zeroes_cow", "Invalid number of feature arguments"],
      ["o c P 8 x", "Invalid number of feature arguments"],
      ["o c P 8 1 discard_passdown_origin", "discard_passdown_origin feature depends on discard_zeroes_cow"],
      ["nosuch c P 8", "Cannot get origin device"],
      ["o nosuch P 8", "Cannot get COW device"],
      ["o c X 8", "Couldn't create exception store"],
      ["o c P 6", "Couldn't create exception store"],
      ["o c P -8", "Couldn't create exception store"],
      ["o c persistent 8", "Couldn't create exception store"],
      ["o c N 0", "Chunk size not set"],
    ];
    for (const [args, message] of cases)
      expect(await ctrError(w, `0 256 snapshot ${args}`), args).toBe(`snapshot: ${message}`);
    expect(await ctrError(w, "0 256 snapshot-origin")).toBe("snapshot-origin: origin: incorrect number of arguments");
    expect(await ctrError(w, "0 256 snapshot-origin nosuch")).toBe("snapshot-origin: Cannot get target device");
    expect(w.dm.list()).toEqual([]);
  });

  // The kernel checks the chunk size against both devices' logical block sizes.
  it("the chunk size must be a multiple of the origin's logical block size too", async () => {
    const w = world();
    w.backing.add("o4k", new MemoryDevice(2048, { tableName: "o4k", displayName: "o4k", logicalBlockSize: 4096 }));
    w.controlled("c", 2048);
    expect(await ctrError(w, "0 2048 snapshot o4k c P 4")).toBe("snapshot: Couldn't create exception store");
  });

  // The kernel (parse_snapshot_features) says "Unrecognised feature requested", compares names with
  // strcasecmp, and parses the features before it looks up either device (snapshot_ctr's order).
  it("an unknown feature is 'Unrecognised feature requested'", async () => {
    const w = world();
    w.controlled("o", 256);
    w.controlled("c", 256);
    expect(await ctrError(w, "0 256 snapshot o c P 8 1 bogus")).toBe("snapshot: Unrecognised feature requested");
  });

  it("feature names match case-insensitively", async () => {
    const w = world();
    w.controlled("o", 256);
    w.controlled("c", 256);
    await w.dm.create("s", { table: "0 256 snapshot o c P 8 1 Discard_Zeroes_Cow" });
    expect(w.dm.tableText("s")).toBe("0 256 snapshot o c P 8 1 discard_zeroes_cow\n");
  });

  it("features are checked before the devices are looked up", async () => {
    const w = world();
    w.controlled("c", 256);
    expect(await ctrError(w, "0 256 snapshot nosuch c P 8 1 discard_passdown_origin")).toBe(
      "snapshot: discard_passdown_origin feature depends on discard_zeroes_cow",
    );
  });
});

// ---------------------------------------------------------------------------------------------

describe("kernel-compatible COW bytes", () => {
  it("a COW image built through the targets on a RAM disk matches the hand-computed layout byte for byte", async () => {
    const w = world();
    const origin = w.controlled("origin", 2048);
    const before = pattern(1, bytes(2048));
    origin.writeSync(0, before);
    const cow = w.backing.add("ram", new MemoryDevice(64 * CS, { tableName: "ram", displayName: "ram" }));
    await w.dm.create("base", { table: "0 2048 snapshot-origin origin" });
    await takeSnapshot(w, "snap", `0 2048 snapshot origin ram P ${CS}`);
    const base = w.open("base");
    const snap = w.open("snap");
    // Commit order = allocation order: old 5 → 2, old 2 → 3, old 9 → 4 (origin writes), old 7 → 5
    // (whole-chunk snapshot write, no copy), old 1 → 6 (partial snapshot write: copy, then write).
    await base.write(5 * CS + 1, pattern(2, 512));
    await base.write(2 * CS, pattern(3, bytes(CS)));
    await base.write(9 * CS + 7, pattern(4, 512));
    const full = pattern(5, bytes(CS));
    await snap.write(7 * CS, full);
    await snap.write(1 * CS + 4, pattern(6, 1024));
    const disk = (await submitAndWait(cow, readBio(0, Buffer.alloc(bytes(64 * CS))))).data;

    // Header: chunk 0.
    const header = Buffer.alloc(4096);
    Buffer.from("536e4170" + "01000000" + "01000000" + "08000000", "hex").copy(header);
    expect(disk.subarray(0, 4096).equals(header)).toBe(true);
    // Area 0: chunk 1, five 16-byte little-endian records in commit order, then zeros.
    const area = Buffer.alloc(4096);
    Buffer.from(
      "0500000000000000" +
        "0200000000000000" +
        "0200000000000000" +
        "0300000000000000" +
        "0900000000000000" +
        "0400000000000000" +
        "0700000000000000" +
        "0500000000000000" +
        "0100000000000000" +
        "0600000000000000",
      "hex",
    ).copy(area);
    expect(disk.subarray(4096, 8192).equals(area)).toBe(true);
    // Data chunks 2..6.
    const originChunk = (c: number) => before.subarray(bytes(c * CS), bytes((c + 1) * CS));
    const cowChunk = (n: number) => disk.subarray(n * 4096, (n + 1) * 4096);
    expect(cowChunk(2).equals(originChunk(5))).toBe(true);
    expect(cowChunk(3).equals(originChunk(2))).toBe(true);
    expect(cowChunk(4).equals(originChunk(9))).toBe(true);
    expect(cowChunk(5).equals(full)).toBe(true);
    const chunk1 = Buffer.from(originChunk(1));
    pattern(6, 1024).copy(chunk1, bytes(4));
    expect(cowChunk(6).equals(chunk1)).toBe(true);
    expect(disk.subarray(7 * 4096).every((b) => b === 0)).toBe(true);

    // The image reader agrees, and so do the status numbers.
    const img = await readCowImage(cow);
    expect(img).toMatchObject({
      state: "valid",
      chunkSize: CS,
      exceptionsPerArea: 256,
      areas: [{ index: 0, chunk: areaLocation(256, 0), records: 5, full: false }],
      nextFree: 7,
      usage: { total: 64 * CS, allocated: 7 * CS, metadata: 2 * CS },
      problems: [],
    });
    expect(img.records.map((r) => [r.oldChunk, r.newChunk])).toEqual([
      [5, 2],
      [2, 3],
      [9, 4],
      [7, 5],
      [1, 6],
    ]);
    expect(w.status("snap")).toBe(`${7 * CS}/${64 * CS} ${2 * CS}`);
  });
});
