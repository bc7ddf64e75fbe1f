/**
 * Property: the thin pool metadata behaves like a plain model (devices as Maps of virtual block →
 * data block and time) under random sequences of create_thin, create_snap, delete, mapping and
 * unmapping (single blocks and runs, enough for trees of several levels), set_transaction_id, metadata snapshots, commits, reopens,
 * aborts and crashes:
 *
 * - lookups give the model's block, and "shared" exactly for blocks written before the device's
 *   last snapshot; device details (mapped blocks, transaction, times) are the model's;
 * - a data block is in use exactly while some device (or the held metadata snapshot) maps it;
 * - a crash (the device's volatile cache loses any subset of the writes since the last flush) or
 *   an abort brings back the last commit exactly: uncommitted changes vanish, nothing else does;
 * - every committed state passes the thin_check-style consistency check (node validity and
 *   occupancy, every reference count in both space maps equal to the references on disk).
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { checkPoolMetadata } from "../../targets/thin/metadata/check.js";
import { type ThinDevice, ThinPoolMetadata, WOULD_BLOCK } from "../../targets/thin/metadata/thin-metadata.js";
import { PersistentDataError } from "../../targets/thin/persistent-data/errors.js";
import { ControlledDevice } from "../../testing/controlled-device.js";

const DATA_BLOCK_SIZE = 128;
const DATA_BLOCKS = 100_000;
const METADATA_SECTORS = 16 * 2048; // 16 MiB
const DEVS = 5;
const VBLOCKS = 700;

interface Mapping {
  block: number;
  time: number;
}

interface Device {
  mappings: Map<number, Mapping>;
  trans: bigint;
  creationTime: number;
  snapTime: number;
}

interface State {
  time: number;
  trans: bigint;
  devices: Map<number, Device>;
  /** The mappings the held metadata snapshot keeps alive, or null. */
  held: Map<number, Map<number, Mapping>> | null;
}

function cloneDevices(devices: Map<number, Device>): Map<number, Device> {
  return new Map([...devices].map(([id, d]) => [id, { ...d, mappings: new Map(d.mappings) }]));
}

function cloneState(s: State): State {
  return { ...s, devices: cloneDevices(s.devices), held: s.held && new Map(s.held) };
}

type Op =
  | { op: "create"; dev: number }
  | { op: "snap"; dev: number; origin: number }
  | { op: "delete"; dev: number }
  | { op: "map"; dev: number; vblock: number }
  | { op: "mapRun"; dev: number; vblock: number; len: number }
  | { op: "unmap"; dev: number; vblock: number }
  | { op: "unmapRange"; dev: number; vblock: number; len: number }
  | { op: "setTid"; wrong: boolean }
  | { op: "reserve" }
  | { op: "release" }
  | { op: "commit" }
  | { op: "reopen" }
  | { op: "abort" }
  | { op: "crash"; seed: number };

const dev = fc.nat(DEVS - 1);
const vblock = fc.nat(VBLOCKS - 1);
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ op: fc.constant("create" as const), dev }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant("snap" as const), dev, origin: dev }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("delete" as const), dev }) },
  { weight: 30, arbitrary: fc.record({ op: fc.constant("map" as const), dev, vblock }) },
  {
    weight: 2,
    arbitrary: fc.record({ op: fc.constant("mapRun" as const), dev, vblock, len: fc.integer({ min: 1, max: 400 }) }),
  },
  { weight: 8, arbitrary: fc.record({ op: fc.constant("unmap" as const), dev, vblock }) },
  {
    weight: 1,
    arbitrary: fc.record({
      op: fc.constant("unmapRange" as const),
      dev,
      vblock,
      len: fc.integer({ min: 1, max: 200 }),
    }),
  },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("setTid" as const), wrong: fc.boolean() }) },
  { weight: 1, arbitrary: fc.constant({ op: "reserve" as const }) },
  { weight: 1, arbitrary: fc.constant({ op: "release" as const }) },
  { weight: 3, arbitrary: fc.constant({ op: "commit" as const }) },
  { weight: 1, arbitrary: fc.constant({ op: "reopen" as const }) },
  { weight: 1, arbitrary: fc.constant({ op: "abort" as const }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant("crash" as const), seed: fc.nat() }) },
);

/** Resolves with the errno of a PersistentDataError, or "ok". */
async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return "ok";
  } catch (err) {
    if (err instanceof PersistentDataError) return err.errno;
    throw err;
  }
}

async function withDevice(pmd: ThinPoolMetadata, id: number, fn: (td: ThinDevice) => Promise<void>): Promise<void> {
  const td = await pmd.openThin(id);
  try {
    await fn(td);
  } finally {
    td.close();
  }
}

/** Everything the pool says agrees with the model. */
async function compare(pmd: ThinPoolMetadata, s: State, allocated: Set<number>): Promise<void> {
  expect(await pmd.deviceIds()).toEqual([...s.devices.keys()].sort((a, b) => a - b));
  expect(pmd.transactionId).toBe(s.trans);
  for (const [id, d] of s.devices) {
    await withDevice(pmd, id, async (td) => {
      expect(td.details()).toEqual({
        mappedBlocks: d.mappings.size,
        transactionId: d.trans,
        creationTime: d.creationTime,
        snapshottedTime: d.snapTime,
      });
      const wrong: string[] = [];
      for (let v = 0; v < VBLOCKS; v++) {
        const m = d.mappings.get(v);
        const want = m && { block: m.block, shared: d.snapTime > m.time };
        const got = await td.findBlock(v);
        if (JSON.stringify(got) !== JSON.stringify(want)) wrong.push(`dev ${id} block ${v}: ${JSON.stringify(got)}`);
        const quick = td.tryFindBlock(v);
        if (quick !== WOULD_BLOCK && JSON.stringify(quick) !== JSON.stringify(want))
          wrong.push(`dev ${id} block ${v}: try`);
      }
      expect(wrong).toEqual([]);
      const keys = [...d.mappings.keys()].sort((a, b) => a - b);
      expect(await td.highestMappedBlock()).toBe(keys.at(-1));
    });
  }
  const inUse = new Set<number>();
  for (const d of s.devices.values()) for (const m of d.mappings.values()) inUse.add(m.block);
  for (const maps of s.held?.values() ?? []) for (const m of maps.values()) inUse.add(m.block);
  const wrongCounts: number[] = [];
  for (const b of allocated) if ((await pmd.dataBlockCount(b)) > 0 !== inUse.has(b)) wrongCounts.push(b);
  expect(wrongCounts).toEqual([]);
}

/** The committed state on disk passes the consistency check and holds the model's mappings. */
async function checkCommitted(device: ControlledDevice, s: State): Promise<void> {
  const report = await checkPoolMetadata(device);
  expect(report.errors).toEqual([]);
  const onDisk = [...report.mappings].map(([id, m]) => [id, [...m].sort((a, b) => a[0] - b[0])]);
  const model = [...s.devices]
    .map(([id, d]) => [id, [...d.mappings].sort((a, b) => a[0] - b[0])])
    .sort((a, b) => (a[0] as number) - (b[0] as number));
  expect(onDisk).toEqual(model);
}

function keepSome(seed: number): (w: { seq: number }) => boolean {
  return (w) => (Math.imul(w.seq ^ seed, 2654435761) >>> 16) % 3 !== 0;
}

type ChangeOp = Extract<
  Op,
  { op: "create" | "snap" | "delete" | "map" | "mapRun" | "unmap" | "unmapRange" | "setTid" }
>;

function isChange(o: Op): o is ChangeOp {
  return ["create", "snap", "delete", "map", "mapRun", "unmap", "unmapRange", "setTid"].includes(o.op);
}

/** Apply a change to the pool and to the model. */
async function applyChange(pmd: ThinPoolMetadata, s: State, o: ChangeOp, allocated: Set<number>): Promise<void> {
  const d = "dev" in o ? s.devices.get(o.dev) : undefined;
  switch (o.op) {
    case "create":
      expect(await outcome(pmd.createThin(o.dev))).toBe(d ? "EEXIST" : "ok");
      if (!d) s.devices.set(o.dev, { mappings: new Map(), trans: s.trans, creationTime: s.time, snapTime: s.time });
      break;
    case "snap": {
      const origin = s.devices.get(o.origin);
      expect(await outcome(pmd.createSnap(o.dev, o.origin))).toBe(d ? "EEXIST" : origin ? "ok" : "ENODATA");
      if (d || !origin) break;
      s.time++;
      origin.snapTime = s.time;
      s.devices.set(o.dev, {
        mappings: new Map(origin.mappings),
        trans: s.trans,
        creationTime: s.time,
        snapTime: s.time,
      });
      break;
    }
    case "delete":
      expect(await outcome(pmd.deleteThin(o.dev))).toBe(d ? "ok" : "ENODATA");
      s.devices.delete(o.dev);
      break;
    case "map":
      if (!d) {
        expect(await outcome(pmd.openThin(o.dev))).toBe("ENODATA");
        break;
      }
      await withDevice(pmd, o.dev, async (td) => {
        const b = await pmd.allocDataBlock();
        allocated.add(b);
        await td.insertBlock(o.vblock, b);
        d.mappings.set(o.vblock, { block: b, time: s.time });
      });
      break;
    case "mapRun":
      if (!d) break;
      await withDevice(pmd, o.dev, async (td) => {
        for (let v = o.vblock; v < Math.min(o.vblock + o.len, VBLOCKS); v++) {
          const b = await pmd.allocDataBlock();
          allocated.add(b);
          await td.insertBlock(v, b);
          d.mappings.set(v, { block: b, time: s.time });
        }
      });
      break;
    case "unmap":
      if (!d) break;
      await withDevice(pmd, o.dev, async (td) => {
        expect(await outcome(td.removeBlock(o.vblock))).toBe(d.mappings.delete(o.vblock) ? "ok" : "ENODATA");
      });
      break;
    case "unmapRange":
      if (!d) break;
      await withDevice(pmd, o.dev, async (td) => {
        await td.removeRange(o.vblock, o.vblock + o.len);
        for (let v = o.vblock; v < o.vblock + o.len; v++) d.mappings.delete(v);
      });
      break;
    case "setTid":
      if (o.wrong) {
        expect(await outcome(pmd.setTransactionId(s.trans + 7n, 1n))).toBe("EINVAL");
      } else {
        await pmd.setTransactionId(s.trans, s.trans + 1n);
        s.trans++;
      }
      break;
  }
}

async function runOps(ops: Op[]): Promise<void> {
  let device = new ControlledDevice(METADATA_SECTORS, { volatileCache: true });
  let pmd = await ThinPoolMetadata.open(device, { dataBlockSize: DATA_BLOCK_SIZE, format: true });
  await pmd.resizeDataDev(DATA_BLOCKS);
  await pmd.commit();
  let s: State = { time: 0, trans: 0n, devices: new Map(), held: null };
  let committed = cloneState(s);
  const allocated = new Set<number>();

  for (const o of ops) {
    if (isChange(o)) {
      await applyChange(pmd, s, o, allocated);
      continue;
    }
    switch (o.op) {
      case "reserve":
        expect(await outcome(pmd.reserveMetadataSnap())).toBe(s.held ? "EBUSY" : "ok");
        // Reserving commits what came before; the new held root is only durable with the next commit.
        committed = cloneState(s);
        if (!s.held) s.held = new Map([...s.devices].map(([id, dd]) => [id, new Map(dd.mappings)]));
        break;
      case "release":
        expect(await outcome(pmd.releaseMetadataSnap())).toBe(s.held ? "ok" : "EINVAL");
        s.held = null;
        break;
      case "commit":
        await pmd.commit();
        committed = cloneState(s);
        break;
      case "reopen":
        await pmd.close();
        committed = cloneState(s);
        pmd = await ThinPoolMetadata.open(device, { dataBlockSize: DATA_BLOCK_SIZE });
        await compare(pmd, s, allocated);
        break;
      case "abort":
        await pmd.abort();
        s = cloneState(committed);
        break;
      case "crash":
        device = device.crash({ keep: keepSome(o.seed) });
        pmd = await ThinPoolMetadata.open(device, { dataBlockSize: DATA_BLOCK_SIZE });
        s = cloneState(committed);
        await checkCommitted(device, s);
        await compare(pmd, s, allocated);
        break;
    }
  }
  await compare(pmd, s, allocated);
  await pmd.commit();
  await checkCommitted(device, s);
  // After the last commit, a crash changes nothing.
  const crashed = device.crash();
  await checkCommitted(crashed, s);
  await compare(await ThinPoolMetadata.open(crashed, { dataBlockSize: DATA_BLOCK_SIZE }), s, allocated);
}

describe("thin pool metadata against a model", () => {
  it("lookups, details, data block use, crashes and aborts", async () => {
    await fc.assert(fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 300, size: "max" }), runOps), {
      numRuns: 30,
    });
  }, 600_000);
});

const changeArb = opArb.filter(isChange);

describe("a crash in the middle of a commit", () => {
  it("finds the previous commit until the superblock is on disk, the new one from then on", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(changeArb, { minLength: 1, maxLength: 80, size: "max" }),
        fc.array(changeArb, { minLength: 1, maxLength: 80, size: "max" }),
        fc.nat(),
        async (before, after, seed) => {
          const device = new ControlledDevice(METADATA_SECTORS, { volatileCache: true });
          const pmd = await ThinPoolMetadata.open(device, { dataBlockSize: DATA_BLOCK_SIZE, format: true });
          await pmd.resizeDataDev(DATA_BLOCKS);
          const s: State = { time: 0, trans: 0n, devices: new Map(), held: null };
          const allocated = new Set<number>();
          for (const o of before) await applyChange(pmd, s, o, allocated);
          await pmd.commit();
          const old = cloneState(s);
          for (const o of after) await applyChange(pmd, s, o, allocated);

          // Every write and flush of the commit is held, then let through one at a time in a
          // random order; before each, the power fails with a random part of the cache lost.
          const hold = device.hold((bio) => bio.op === "write" || bio.op === "flush");
          let done = false;
          const committing = pmd.commit().then(() => (done = true));
          let step = seed;
          let superblockWritten = false;
          for (;;) {
            await Promise.race([device.waitForHeld(1), committing]);
            if (done) break;
            step = (Math.imul(step, 1103515245) + 12345) >>> 0;
            await checkCommitted(device.crash({ keep: keepSome(step) }), superblockWritten ? s : old);
            const held = device.held();
            const io = held[step % held.length]!;
            if (io.op === "write" && io.sector === 0) superblockWritten = true;
            io.release();
          }
          device.stopHolding(hold);
          await committing;
          await checkCommitted(device.crash({ keep: () => false }), s);
        },
      ),
      { numRuns: 20 },
    );
  }, 600_000);
});
