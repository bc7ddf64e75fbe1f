/**
 * snapshot-merge (docs/snapshot.md, "The merge loop"; R9, R10, R13, R20 in its "Race and bug
 * tests"): the origin's device is reloaded with a `snapshot-merge` table that takes over a
 * snapshot's store, reads as that snapshot at once, and copies the snapshot's chunks back onto the
 * origin in the background.
 *
 * Deterministic like the other race tests: device I/O that matters is held on ControlledDevices
 * and released (or failed) in a scripted order; origin and COW model volatile write caches where a
 * crash is taken. No sleeps: `settleAll()` only lets promise chains run, and completion is awaited
 * through the device's event (the merge raises one when it finishes or fails).
 *
 * "Disable check" says how a test was seen to fail with the mechanism it guards switched off
 * locally (see the report of the change that added this file).
 */
import { describe, expect, it } from "vitest";
import { type Bio, SECTOR_SIZE } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { readCowImage } from "../../targets/snapshot/cow-image.js";
import type { SnapshotMergeTarget } from "../../targets/snapshot/merge.js";
import type { SnapshotTarget } from "../../targets/snapshot/snapshot.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import { testMapper } from "../../testing/memory-backing.js";
import {
  IDLE,
  type IoRec,
  type Rig,
  chunkOf,
  cowSectorsFor,
  engineState,
  pattern,
  settleAll,
  snapshotRig,
  writesOf,
  dataWrite,
  expectDone,
  metadataWrite,
} from "../support/snapshot-rig.js";

const CS = 8;
const CHUNK = CS * SECTOR_SIZE;

/** `<allocated>/<total> <metadata>` as numbers. */
function usage(dm: DeviceMapper, name: string): { allocated: number; total: number; metadata: number } {
  const params = dm.status(name)[0]!.params;
  const m = /^(\d+)\/(\d+) (\d+)$/.exec(params);
  if (!m) throw new Error(`${name}: status is '${params}'`);
  return { allocated: Number(m[1]), total: Number(m[2]), metadata: Number(m[3]) };
}

function overlay(base: Buffer, atSector: number, data: Buffer): Buffer {
  const out = Buffer.from(base);
  data.copy(out, atSector * SECTOR_SIZE);
  return out;
}

/** The merge table for snapshot `snap` of the rig's origin. */
const mergeTable = (size: number, snap: string, store = "P", cs = CS) =>
  `0 ${size} snapshot-merge origin cow-${snap} ${store} ${cs}`;

/** lvconvert --merge on an active origin: load the merge table on the origin's device, suspend the snapshot, resume the origin. */
async function startMerge(r: Rig, size: number, snap: string, store = "P", cs = CS): Promise<SnapshotMergeTarget> {
  await r.dm.load("base", mergeTable(size, snap, store, cs));
  await r.dm.suspend(snap);
  await r.dm.resume("base");
  return r.target<SnapshotMergeTarget>("base");
}

/** Resolves once the device's event number moves past `from` (the merge raises one when it stops). */
async function mergeStopped(dm: DeviceMapper, name: string, from: number): Promise<void> {
  await dm.device(name).waitEvent(from);
}

async function readAll(r: Rig, name: string, sectors: number): Promise<Buffer> {
  const rec = r.io.read(r.dm.device(name), 0, sectors);
  const done = await rec.promise;
  expect(done.status, `read of ${name}`).toBe("ok");
  return done.data;
}

/**
 * The basic rig: snapshot `s` of a 256-sector origin; origin writes to chunks 1-2 (their old data
 * goes to the COW), snapshot writes to chunks 5-7. Records in allocation order: (1,2) (2,3) (5,4)
 * (6,5) (7,6); the merge takes them from the end in two batches: chunks 5-7, then 1-2.
 */
async function basicRig(
  opts: { originOptions?: { volatileCache?: boolean }; cowOptions?: { volatileCache?: boolean } } = {},
) {
  const SIZE = 256;
  const r = await snapshotRig({
    originSectors: SIZE,
    snaps: [{ name: "s", cs: CS, ...(opts.cowOptions ? { cowOptions: opts.cowOptions } : {}) }],
    ...(opts.originOptions ? { originOptions: opts.originOptions } : {}),
  });
  expectDone([await r.io.write(r.base, 1 * CS, pattern(201, 2 * CHUNK)).promise]);
  for (const c of [5, 6, 7]) expectDone([await r.io.write(r.snaps.s!, c * CS, pattern(300 + c, CHUNK)).promise]);
  const snapView = await readAll(r, "s", SIZE);
  return { r, SIZE, snapView };
}

describe("snapshot-merge: the device reads as the snapshot while the merge copies it back", () => {
  it("reads as the snapshot at once, counts down to allocated == metadata, raises an event, then reloads as snapshot-origin", async () => {
    const { r, SIZE, snapView } = await basicRig();
    expect(r.dm.status("s")[0]!.params).toBe(`${7 * CS}/${r.cows.s!.sizeSectors} ${2 * CS}`);
    const hold = r.origin.hold((b) => b.op === "write"); // the first batch's copy
    const md = r.dm.device("base");
    const ev = md.eventNr;
    const t = await startMerge(r, SIZE, "s");
    expect(r.dm.tableText("base")).toBe(`0 ${SIZE} snapshot-merge origin cow-s P ${CS}\n`);
    const [copy] = await r.origin.waitForHeld(1);
    expect([copy!.sector, copy!.sectors]).toEqual([5 * CS, 3 * CS]); // chunks 5-7 in one copy
    // The handed-over snapshot's store is the merge's now; the old snapshot device fails its I/O.
    expect(r.dm.status("s")[0]!.params).toBe("Invalid");
    expect(usage(r.dm, "base")).toEqual({ allocated: 7 * CS, total: r.cows.s!.sizeSectors, metadata: 2 * CS });
    // Before anything is copied the origin's device already reads as the snapshot.
    expect((await readAll(r, "base", SIZE)).equals(snapView)).toBe(true);
    expect(t.mergeRunning).toBe(true);
    expect(md.eventNr).toBe(ev);

    const counts: number[] = [];
    r.origin.stopHolding(hold);
    r.origin.hold((b) => b.op === "write"); // keep stepping: one batch at a time
    for (;;) {
      const held = r.origin.held();
      if (held.length === 0) break;
      held[0]!.release();
      await settleAll();
      counts.push(usage(r.dm, "base").allocated);
    }
    await mergeStopped(r.dm, "base", ev);
    expect(counts).toEqual([4 * CS, 2 * CS]); // 5 records, 2 after the first batch, none after the second
    expect(usage(r.dm, "base")).toEqual({ allocated: 2 * CS, total: r.cows.s!.sizeSectors, metadata: 2 * CS });
    expect(md.eventNr).toBe(ev + 1);
    expect(t.mergeRunning).toBe(false);
    expect(t.mergedBatches).toBe(2);
    expect(r.origin.readSync(0, SIZE).equals(snapView)).toBe(true);
    expect((await readCowImage(r.cows.s!)).records).toEqual([]);
    expect(engineState(t)).toEqual(IDLE);

    // Done: the device goes back to a plain snapshot-origin table and keeps the data.
    await r.dm.load("base", `0 ${SIZE} snapshot-origin origin`);
    await r.dm.resume("base");
    await r.dm.remove("s");
    expect((await readAll(r, "base", SIZE)).equals(snapView)).toBe(true);
    expect(r.io.errors).toEqual([]);
  });

  it("constructor checks: one merge per origin, persistent stores only, the handover pairing", async () => {
    const SIZE = 256;
    const r = await snapshotRig({
      originSectors: SIZE,
      snaps: [
        { name: "a", cs: CS },
        { name: "b", cs: CS },
        { name: "n", cs: CS, store: "N" },
      ],
    });
    await expect(r.dm.load("base", mergeTable(SIZE, "n", "N"))).rejects.toThrow(
      "snapshot-merge: Snapshot exception store does not support snapshot-merge.",
    );
    await r.dm.load("base", mergeTable(SIZE, "a"));
    // A second merge table elsewhere while the first waits for its resume: the first is already merging.
    await r.dm.create("other");
    await expect(r.dm.load("other", mergeTable(SIZE, "b"))).rejects.toThrow(
      "snapshot-merge: A snapshot is already merging.",
    );
    // A third table on a's COW.
    await expect(r.dm.load("other", `0 ${SIZE} snapshot origin cow-a P ${CS}`)).rejects.toThrow(
      "snapshot: Snapshot cow pairing for exception table handover failed",
    );
    // Handover refused until the source is suspended.
    await expect(r.dm.resume("base")).rejects.toThrow("Unable to perform snapshot handover until source is suspended.");
    expect(r.dm.targets().find((x) => x.name === "snapshot-merge")?.version).toEqual([1, 5, 0]);
    // Reactivation with a transient store has nothing to merge from (the kernel would crash at resume).
    r.backing.add("cow-t", new ControlledDevice(64, { name: "cow-t" }));
    await expect(r.dm.load("other", `0 ${SIZE} snapshot-merge origin cow-t N ${CS}`)).rejects.toThrow(
      "snapshot-merge: Snapshot exception store does not support snapshot-merge.",
    );
  });

  it("flushes go to the origin and the COW device; discards (with discard_zeroes_cow) complete as no-ops", async () => {
    const SIZE = 256;
    const r = await snapshotRig({ originSectors: SIZE, snaps: [{ name: "s", cs: CS }] });
    await r.io.write(r.snaps.s!, 0, pattern(5, CHUNK)).promise;
    await r.dm.load("base", `0 ${SIZE} snapshot-merge origin cow-s P ${CS} 1 discard_zeroes_cow`);
    await r.dm.suspend("s");
    const hold = r.origin.hold((b) => b.op === "write");
    await r.dm.resume("base");
    await r.origin.waitForHeld(1);
    const [of, cf] = [r.origin.counters.flushes, r.cows.s!.counters.flushes];
    const flush = r.io.flush(r.base);
    await settleAll();
    expectDone([flush]);
    expect([r.origin.counters.flushes - of, r.cows.s!.counters.flushes - cf]).toEqual([1, 1]);
    const [od, cd] = [r.origin.counters.discards, r.cows.s!.counters.discards];
    const discard = r.io.submit(r.base, "discard", 0, 16);
    await settleAll();
    expectDone([discard]);
    expect([r.origin.counters.discards - od, r.cows.s!.counters.discards - cd]).toEqual([0, 0]);
    expect(r.dm.tableText("base")).toBe(`0 ${SIZE} snapshot-merge origin cow-s P ${CS} 1 discard_zeroes_cow\n`);
    r.origin.stopHolding(hold);
    r.origin.releaseAll();
    await settleAll();
    expect(r.origin.readSync(0, CS).equals(pattern(5, CHUNK))).toBe(true);
  });
});

/**
 * R10: a batch of three consecutive chunks (4-6) is being copied; writes to its first and third
 * chunk arrive during the copy. Other I/O during the merge goes where the kernel sends it.
 * Guards: `map` holds writes inside [firstMergingChunk, +numMergingChunks) and releases them to the
 * origin only after the batch's metadata commit; the merging snapshot is skipped by `originWrite`
 * and never allocates.
 * Disable checks: holding only writes to `firstMergingChunk` (the pre-8a2d528620e2 behaviour) lets
 * the write to chunk 6 go to its COW copy while the batch is being copied: it completes at once
 * (the read of chunk 6 already returns it) and would be lost when the chunk's exception is dropped.
 * Letting `originWrite` consider the merging snapshot makes the write to chunk 20 create an
 * exception in the merging store: a copy into COW chunk 6 and a metadata write show up.
 */
describe("R10: the merging batch holds writes to any of its chunks; the merging store never allocates", () => {
  it("writes to the 1st and 3rd chunk of a 3-chunk batch are held until the commit, then land on the origin", async () => {
    const SIZE = 256;
    const r = await snapshotRig({ originSectors: SIZE, snaps: [{ name: "s", cs: CS }] });
    await r.io.write(r.base, 10 * CS, pattern(410, CHUNK)).promise; // chunk 10 → COW chunk 2 (old data)
    for (const c of [4, 5, 6]) await r.io.write(r.snaps.s!, c * CS, pattern(400 + c, CHUNK)).promise; // → COW chunks 3-5
    const snapView = await readAll(r, "s", SIZE);
    const originBefore = r.origin.readSync(0, SIZE);

    const copyHold = r.origin.hold((b) => b.op === "write" && b.sectors === 3 * CS);
    const ev = r.dm.device("base").eventNr;
    const t = await startMerge(r, SIZE, "s");
    let allocations = 0;
    const store = t.store as { prepareException(): number | null };
    const prepare = store.prepareException.bind(store);
    store.prepareException = () => {
      allocations++;
      return prepare();
    };
    const allocated: number[] = [usage(r.dm, "base").allocated];
    const [copy] = await r.origin.waitForHeld(1);
    expect([copy!.sector, copy!.sectors]).toEqual([4 * CS, 3 * CS]);
    const originLog = r.origin.log.length;
    const cowLog = r.cows.s!.log.length;

    const w6 = r.io.write(r.base, 6 * CS + 2, pattern(61, 2 * SECTOR_SIZE)); // 3rd chunk of the batch
    const w4 = r.io.write(r.base, 4 * CS, pattern(62, SECTOR_SIZE)); // 1st chunk
    let fuaWhenW6Done = -1;
    w6.onDone = () => (fuaWhenW6Done = r.cows.s!.counters.fuaWrites);
    const fuaBefore = r.cows.s!.counters.fuaWrites;
    // A write to chunk 10 (an exception outside the batch) goes to its COW copy; one to chunk 20
    // (no exception) goes to the origin, and the merging snapshot makes no exception for it.
    const w10 = r.io.write(r.base, 10 * CS + 1, pattern(63, SECTOR_SIZE));
    const w20 = r.io.write(r.base, 20 * CS, pattern(64, CHUNK));
    // Reads of chunks not merged yet come from the COW device, also inside the batch.
    const r6 = r.io.read(r.base, 6 * CS, CS);
    const r10 = r.io.read(r.base, 10 * CS, CS);
    await settleAll();
    expectDone([w10, w20, r6, r10]);
    expect(r6.data.equals(chunkOf(snapView, CS, 6))).toBe(true);
    expect(r10.data.equals(overlay(chunkOf(snapView, CS, 10), 1, pattern(63, SECTOR_SIZE)))).toBe(true);
    expect([w6.completions, w4.completions]).toEqual([0, 0]);
    expect(writesOf(r.origin, originLog)).toEqual([`${20 * CS}+${CS}`]); // nothing in the batch's range
    expect(writesOf(r.cows.s!, cowLog)).toEqual([`${2 * CS + 1}+1`]); // w10 at COW chunk 2
    allocated.push(usage(r.dm, "base").allocated);

    r.origin.stopHolding(copyHold);
    copy!.release();
    await mergeStopped(r.dm, "base", ev);
    await settleAll();
    expectDone([w6, w4]);
    // The held writes reached the origin after the batch's metadata commit (a FUA write on the COW).
    expect(fuaWhenW6Done).toBe(fuaBefore + 1);
    const log = writesOf(r.origin, originLog);
    expect(log.indexOf(`${6 * CS + 2}+2`)).toBeGreaterThan(log.indexOf(`${4 * CS}+${3 * CS}`));
    allocated.push(usage(r.dm, "base").allocated);
    expect(allocated).toEqual([6 * CS, 6 * CS, 2 * CS]);
    expect(allocations).toBe(0);

    let want: Buffer = Buffer.from(snapView);
    want = overlay(want, 6 * CS + 2, pattern(61, 2 * SECTOR_SIZE));
    want = overlay(want, 4 * CS, pattern(62, SECTOR_SIZE));
    want = overlay(want, 10 * CS + 1, pattern(63, SECTOR_SIZE));
    want = overlay(want, 20 * CS, pattern(64, CHUNK));
    expect(r.origin.readSync(0, SIZE).equals(want)).toBe(true);
    expect(originBefore.equals(r.origin.readSync(0, SIZE))).toBe(false);
    expect(engineState(t)).toEqual(IDLE);
    expect(r.io.errors).toEqual([]);
  });
});

/**
 * R9: snapshot X (16 KiB chunks) merges while snapshot Y (4 KiB chunks) of the same origin stays.
 * X's records: (4, 2) from an origin write to sectors 64-71 (X chunk 4 = Y chunks 8-9; Y copies
 * chunk 8 only), then (2, 3) from a snapshot write to X chunk 2 (Y chunks 4-5, which Y never
 * copied). The merge takes X chunk 2 first, then X chunk 4. Every COW data write of Y is held.
 * Guards: before each batch the merge makes every other snapshot preserve the batch's origin
 * range (`originWriteExtent`, stepping by the smallest chunk size) and waits, on the global
 * pending-exception-done count, until none of them has a pending exception there.
 * Disable check: without `originWriteExtent` no copy of Y's is triggered before a batch: the merge
 * writes X's data over sectors 32-47 at once (Y would then read it instead of the original), and
 * the test's wait for Y's held copies never returns.
 */
describe("R9: before a batch overwrites origin chunks, every other snapshot preserves them", () => {
  it("the merge waits for the other snapshot's copies of each batch; that snapshot keeps the pre-merge data", async () => {
    const SIZE = 256;
    const r = await snapshotRig({
      originSectors: SIZE,
      snaps: [
        { name: "x", cs: 16 },
        { name: "y", cs: CS },
      ],
    });
    await r.io.write(r.base, 64, pattern(901, CHUNK)).promise; // X chunk 4, Y chunk 8
    await r.io.write(r.snaps.x!, 32, pattern(902, 2 * CHUNK)).promise; // X chunk 2 (Y chunks 4, 5 untouched)
    const xView = await readAll(r, "x", SIZE);
    const yView = await readAll(r, "y", SIZE);
    const ty = r.target<SnapshotTarget>("y");
    const ev = r.dm.device("base").eventNr;
    await r.dm.load("base", mergeTable(SIZE, "x", "P", 16));
    await r.dm.suspend("x");
    const yHold = r.cows.y!.hold(dataWrite);
    const originLog = r.origin.log.length;
    await r.dm.resume("base");
    const t = r.target<SnapshotMergeTarget>("base");
    expect(t.maxIoLen).toBe(CS); // the smallest chunk size of the origin's snapshots

    // Batch 1 = X chunk 2 (sectors 32-47, the newest record): Y must copy its chunks 4 and 5 first.
    const first = await r.cows.y!.waitForHeld(2);
    await settleAll();
    expect(writesOf(r.origin, originLog)).toEqual([]);
    expect(engineState(ty).pending).toBe(2);
    first[0]!.release();
    await settleAll();
    expect(writesOf(r.origin, originLog)).toEqual([]); // still waiting for chunk 5
    first[1]!.release();
    // Batch 2 = X chunk 4 (sectors 64-79): Y copied chunk 8 with the origin write; chunk 9 now.
    const [y9] = await r.cows.y!.waitForHeld(1);
    await settleAll();
    // The first batch's copy reached the origin only once Y's exceptions for chunks 4, 5 were committed.
    expect(writesOf(r.origin, originLog)).toEqual(["32+16"]);
    expect(engineState(ty).pending).toBe(1);
    r.cows.y!.stopHolding(yHold);
    y9!.release();
    await mergeStopped(r.dm, "base", ev);
    await settleAll();
    expect(writesOf(r.origin, originLog)).toEqual(["32+16", "64+16"]);
    expect(r.origin.readSync(0, SIZE).equals(xView)).toBe(true);
    expect((await readAll(r, "y", SIZE)).equals(yView)).toBe(true);
    expect([...[4, 5, 8, 9]].map((c) => ty.complete.lookup(c) >= 0)).toEqual([true, true, true, true]);
    expect(engineState(ty)).toEqual(IDLE);
    expect(r.io.errors).toEqual([]);
  });
});

/**
 * R20: merge with volatile write caches on the origin and the COW device, holding every write and
 * flush both get, and crash after each one completes. The snapshot has 262 exceptions: area 0
 * holds (1,2) (2,3) from origin writes and chunks 100-353 written through the snapshot (COW chunks
 * 4-257), area 1 holds chunks 354-359 (COW 259-264). So the merge takes three batches (354-359,
 * then back in area 0, read from disk: 100-353 in one 1 MiB copy, then 1-2), and crosses from
 * area 1 back to area 0. Writes through the merging device go to chunk 355 (held in the first
 * batch), chunk 101 (its COW copy until the second batch) and chunk 40 (no exception), then a
 * flush.
 * Each crashed pair (origin and COW each either durable data only, or with their whole cache
 * written back) is reactivated the way LVM does after a crash (the snapshot-merge table loaded
 * directly, reading the metadata), the merge runs to the end, and the origin must hold the
 * snapshot's data, plus every write made through the merging device once the flush after them
 * has completed.
 * Guards: the origin flush after each batch's copy and before `commitMerge` drops its records.
 * Disable check: without the flush, the crash right after the first metadata commit (origin:
 * durable data only) reactivates with chunks 354-359 no longer recorded and the origin still
 * holding its old data for them.
 */
describe("R20: crash at every flush point of a merge", () => {
  it("resumes on reactivation with no data lost", async () => {
    const SIZE = 512 * CS;
    const r = await snapshotRig({
      originSectors: SIZE,
      snaps: [{ name: "s", cs: CS, cowOptions: { volatileCache: true } }],
      originOptions: { volatileCache: true },
    });
    expectDone([await r.io.write(r.base, 1 * CS, pattern(201, 2 * CHUNK)).promise]);
    const seq = Array.from({ length: 260 }, (_, i) => 100 + i);
    expectDone(await Promise.all(seq.map((c) => r.io.write(r.snaps.s!, c * CS, pattern(300 + c, CHUNK)).promise)));
    const before = await readCowImage(r.cows.s!.crash({ keep: () => true }));
    expect(before.records).toHaveLength(262);
    expect(before.records.slice(-6).map((x) => [x.oldChunk, x.newChunk])).toEqual(
      seq.slice(-6).map((c, i) => [c, 259 + i]),
    );
    const snapView = await readAll(r, "s", SIZE);
    // Make the starting point durable.
    expectDone([await r.io.flush(r.base).promise, await r.io.flush(r.snaps.s!).promise]);
    expect([r.origin.unflushed(), r.cows.s!.unflushed()]).toEqual([[], []]);
    const devices = [r.origin, r.cows.s!];
    const holds = devices.map((d) => d.hold((b) => b.op !== "read"));
    const ev = r.dm.device("base").eventNr;
    const merge = await startMerge(r, SIZE, "s");

    const writes = [
      { sector: 355 * CS + 3, data: pattern(71, 2 * SECTOR_SIZE) },
      { sector: 101 * CS, data: pattern(72, SECTOR_SIZE) },
      { sector: 40 * CS, data: pattern(73, CHUNK) },
    ];
    const recs = writes.map((w) => r.io.write(r.base, w.sector, w.data));
    let flush: IoRec | null = null;
    const final = writes.reduce((buf, w) => overlay(buf, w.sector, w.data), snapView);

    let reactivations = 0;
    const check = async (where: string) => {
      const flushed = flush?.status === "ok";
      for (const keepOrigin of [false, true]) {
        for (const keepCow of [false, true]) {
          const label = `${where} (origin ${keepOrigin ? "cache written back" : "durable only"}, COW ${keepCow ? "cache written back" : "durable only"})`;
          const origin = r.origin.crash(keepOrigin ? { keep: () => true } : {});
          const cow = r.cows.s!.crash(keepCow ? { keep: () => true } : {});
          const img = await readCowImage(cow);
          expect(img.problems, label).toEqual([]);
          expect(img.state, label).toBe("valid");
          const { dm, backing } = testMapper();
          backing.add("origin", origin);
          backing.add("cow", cow);
          await dm.create("base", { table: `0 ${SIZE} snapshot-merge origin cow P ${CS}` });
          await mergeStopped(dm, "base", 0);
          expect(dm.status("base")[0]!.params, label).toBe(`${2 * CS}/${cow.sizeSectors} ${2 * CS}`);
          const got = origin.readSync(0, SIZE);
          for (let c = 0; c < SIZE / CS; c++) {
            const have = chunkOf(got, CS, c);
            // Writes are there once the flush after them completed; until then they may be lost.
            const ok = have.equals(chunkOf(final, CS, c)) || (!flushed && have.equals(chunkOf(snapView, CS, c)));
            expect(ok, `${label}: chunk ${c}`).toBe(true);
          }
          await dm.close();
          reactivations++;
        }
      }
    };

    await check("merge started");
    const points: string[] = [];
    for (let step = 0; step < 1000; step++) {
      if (!flush && recs.every((x) => x.completions > 0)) flush = r.io.flush(r.base);
      await settleAll();
      const io = devices.flatMap((d) => d.held())[0];
      if (!io) break; // nothing left to release: the merge has stopped and every write is done
      const where = `after ${r.origin.held().includes(io) ? "origin" : "COW"} ${io}`;
      io.release();
      await settleAll();
      points.push(where);
      await check(where);
    }
    devices.forEach((d, i) => d.stopHolding(holds[i]!));
    await mergeStopped(r.dm, "base", ev);
    await settleAll();
    expectDone([...recs, flush!]);
    expect(merge.mergedBatches).toBe(3);
    expect(r.origin.readSync(0, SIZE).equals(final)).toBe(true);
    // 3 batches × (copy writes, origin flush, metadata write), the three writes, the flush's two
    // halves; the 1 MiB copy of the second batch is written in 16 pieces of 64 KiB (the copier's
    // sub-jobs), each a crash point of its own.
    expect(points).toHaveLength(29);
    console.log(`R20: ${points.length} crash points, ${reactivations} reactivations:\n  ${points.join("\n  ")}`);
    expect(r.io.errors).toEqual([]);
  });
});

/**
 * R13 (with R12): snapshot Y of the same origin is reloaded (handover) while X merges and while an
 * origin write through the merging device waits on a copy of a third snapshot Z (16 KiB chunks, so
 * its copies are not shared with Y's). X's first batch
 * (chunks 2-4) waits for Y to preserve those chunks, and Y's copies are held.
 * Guards: a snapshot's resume finds the origin's device through the merging snapshot when no
 * snapshot-origin is registered, suspends it internally (origin writes drain), stops the merge
 * (the batch, with the copies it triggered in Y, finishes), swaps the stores, restarts the merge
 * and resumes the device.
 * Disable checks: without stopping the merge the swap runs as soon as the origin write has drained,
 * while the batch still waits for the three copies it started in Y's old table (the swap spy sees
 * mergeRunning true, and the resume fails with "snapshot handover with 3 pending exceptions");
 * without the merging-snapshot lookup nothing is suspended or stopped: the swap runs at once, with
 * the origin write still in flight, and fails the same way.
 */
describe("R13: handover of another snapshot while a merge runs and origin writes are in flight", () => {
  it("the merge pauses across the swap and continues; Y keeps its data in the store it now owns", async () => {
    const SIZE = 256;
    const r = await snapshotRig({
      originSectors: SIZE,
      snaps: [
        { name: "x", cs: CS },
        { name: "y", cs: CS },
        { name: "z", cs: 16 },
      ],
    });
    await r.io.write(r.base, 10 * CS, pattern(810, CHUNK)).promise; // every snapshot copies chunk 10
    for (const c of [2, 3, 4]) await r.io.write(r.snaps.x!, c * CS, pattern(800 + c, CHUNK)).promise;
    await r.io.write(r.snaps.y!, 21 * CS, pattern(821, CHUNK)).promise; // Y has chunk 21, X and Z do not
    const xView = await readAll(r, "x", SIZE);
    const yView = await readAll(r, "y", SIZE);
    const zView = await readAll(r, "z", SIZE);
    const ev = r.dm.device("base").eventNr;
    const yHold = r.cows.y!.hold(dataWrite);
    const merge = await startMerge(r, SIZE, "x");
    const batchCopies = await r.cows.y!.waitForHeld(3); // Y preserves chunks 2-4 for the first batch
    await settleAll(); // (Z's copies of them are not held)
    const zHold = r.cows.z!.hold(dataWrite);
    const w21 = r.io.write(r.base, 21 * CS, pattern(822, CHUNK)); // origin write: waits for Z's copy of its chunk 10
    const [copy21] = await r.cows.z!.waitForHeld(1);
    expect(merge.mergeRunning).toBe(true);

    // Reload Y: a new table on Y's COW, suspend the old one, resume.
    await r.dm.load("y", `0 ${SIZE} snapshot origin cow-y P ${CS}`);
    const dest = r.dm.device("y").inactive!.targets[0] as SnapshotTarget;
    const swaps: { mergeRunning: boolean; srcPending: number; baseInFlight: number }[] = [];
    const raw = dest as unknown as { takeOverExceptions(src: SnapshotTarget): void };
    const takeOver = raw.takeOverExceptions.bind(dest);
    raw.takeOverExceptions = (src) => {
      swaps.push({
        mergeRunning: merge.mergeRunning,
        srcPending: src.pending.size,
        baseInFlight: r.dm.device("base").inFlight,
      });
      takeOver(src);
    };
    await r.dm.suspend("y");
    let resumed = false;
    const resuming = r.dm.resume("y").then(() => (resumed = true));
    await settleAll();
    expect(resumed).toBe(false); // the origin write is still in flight on the merging device

    r.cows.z!.stopHolding(zHold);
    copy21!.release(); // the origin write completes: the device is quiet, now the merge must stop
    await settleAll();
    expectDone([w21]);
    expect(resumed).toBe(false); // ... which waits for the batch, which waits for Y's copies
    expect(swaps).toEqual([]);
    const w3 = r.io.write(r.base, 3 * CS + 4, pattern(830, 2 * SECTOR_SIZE)); // queued behind the internal suspend
    await settleAll();
    expect(w3.completions).toBe(0);

    r.cows.y!.stopHolding(yHold);
    for (const h of batchCopies) h.release(); // the batch goes on, commits, and the merge stops
    await resuming;
    expect(swaps).toEqual([{ mergeRunning: false, srcPending: 0, baseInFlight: 0 }]);
    await mergeStopped(r.dm, "base", ev);
    await settleAll();
    expectDone([w3]);
    expect(merge.mergedBatches).toBe(2); // chunks 2-4 before the swap, chunk 10 after it
    expect(usage(r.dm, "base").allocated).toBe(2 * CS);
    const want = overlay(overlay(xView, 21 * CS, pattern(822, CHUNK)), 3 * CS + 4, pattern(830, 2 * SECTOR_SIZE));
    expect(r.origin.readSync(0, SIZE).equals(want)).toBe(true);
    expect(r.target<SnapshotTarget>("y")).toBe(dest);
    expect((await readAll(r, "y", SIZE)).equals(yView)).toBe(true);
    expect((await readAll(r, "z", SIZE)).equals(zView)).toBe(true);
    const img = await readCowImage(r.cows.y!);
    expect(img.records.map((x) => x.oldChunk).sort((a, b) => a - b)).toEqual([2, 3, 4, 10, 21]);
    expect(engineState(dest)).toEqual(IDLE);
    expect(r.io.errors).toEqual([]);
  });
});

/**
 * Merge failures: each failure point of a batch (the COW read of the copy, its origin write, the
 * origin flush, the metadata commit) while a write to the batch is held.
 * Guards: the failure path of a batch sets merge_failed, fails the held writes, and leaves the
 * exceptions of the failed batch in place, so the device keeps reading as the snapshot; the
 * records on disk still cover every chunk not merged; suspend + resume retries the merge (status
 * still `Merge failed`, as the kernel's flag is never cleared), and a reactivation reads a clean
 * status again.
 */
describe("merge failures", () => {
  const cases = [
    {
      what: "COW read of the copy",
      dev: "cow",
      pred: (b: Bio) => b.op === "read",
      message: "Read error: shutting down merge.",
    },
    {
      what: "origin write of the copy",
      dev: "origin",
      pred: (b: Bio) => b.op === "write",
      message: "Write error: shutting down merge.",
    },
    {
      what: "origin flush",
      dev: "origin",
      pred: (b: Bio) => b.op === "flush",
      message: "Flush after merge failed: shutting down merge",
    },
    {
      what: "metadata commit",
      dev: "cow",
      pred: metadataWrite,
      message: "Write error in exception store: shutting down merge",
    },
  ] as const;
  for (const c of cases) {
    it(`${c.what} fails: status 'Merge failed', the held write fails, the data stays consistent; a resume retries`, async () => {
      const { r, SIZE, snapView } = await basicRig();
      const dev = c.dev === "cow" ? r.cows.s! : r.origin;
      const hold = dev.hold(c.pred);
      const ev = r.dm.device("base").eventNr;
      const t = await startMerge(r, SIZE, "s");
      const [io] = await dev.waitForHeld(1);
      dev.stopHolding(hold);
      const w6 = r.io.write(r.base, 6 * CS, pattern(66, SECTOR_SIZE)); // in the batch: held
      await settleAll();
      expect(w6.completions).toBe(0);
      io!.fail("EIO");
      await mergeStopped(r.dm, "base", ev);
      await settleAll();
      expectDone([w6], "EIO");
      expect(r.dm.status("base")[0]!.params).toBe("Merge failed");
      expect(t.mergeRunning).toBe(false);
      expect(r.logger.records.some((x) => x.level === "error" && x.msg === c.message)).toBe(true);
      // Still the snapshot's data, and I/O goes on (the chunk is no longer being merged).
      expect((await readAll(r, "base", SIZE)).equals(snapView)).toBe(true);
      const w = r.io.write(r.base, 6 * CS + 1, pattern(67, SECTOR_SIZE));
      await settleAll();
      expectDone([w]);
      const want = overlay(snapView, 6 * CS + 1, pattern(67, SECTOR_SIZE));
      expect((await readAll(r, "base", SIZE)).equals(want)).toBe(true);
      expect((await readCowImage(r.cows.s!)).records).toHaveLength(5);

      // Suspend and resume: the merge starts again and finishes; the status keeps the failure.
      const ev2 = r.dm.device("base").eventNr;
      await r.dm.suspend("base");
      await r.dm.resume("base");
      await mergeStopped(r.dm, "base", ev2);
      expect(r.dm.status("base")[0]!.params).toBe("Merge failed");
      expect(r.origin.readSync(0, SIZE).equals(want)).toBe(true);
      expect((await readCowImage(r.cows.s!)).records).toEqual([]);

      // Reactivation: the merge table on the origin's device again, reading the metadata itself.
      await r.dm.remove("base");
      await r.dm.remove("s");
      await r.dm.create("base", { table: mergeTable(SIZE, "s", "P", 0) }); // chunk size from the header
      await mergeStopped(r.dm, "base", 0);
      expect(usage(r.dm, "base").allocated).toBe(2 * CS);
      expect(r.origin.readSync(0, SIZE).equals(want)).toBe(true);
      expect(r.io.errors).toEqual([]);
    });
  }
});

/**
 * Scale: a snapshot holding 10^4 exceptions (2000 written in sequence, so some batches are long
 * runs, the rest scattered) merges while six workers write and verify the merging device, and a
 * seventh keeps reading another snapshot Y of the same origin, taken just before the merge. RAM
 * devices; every worker owns every sixth chunk and keeps one request in flight, so a model of the
 * device is exact at every completion. The workers are paced by the merge (one request each per
 * merged batch): the devices complete synchronously, so unpaced workers would only flood the
 * microtask queue.
 * Checks: every read during the merge matches the model (the snapshot's data plus the writes made
 * so far), Y never changes, and at the end the origin equals the model byte for byte.
 */
describe("10^4-exception merge under verified concurrent I/O", () => {
  it("the origin ends equal to the snapshot's content plus the writes made during the merge", async () => {
    const CHUNKS = 12_288;
    const SIZE = CHUNKS * CS;
    const EXCEPTIONS = 10_000;
    const r = await snapshotRig({ originSectors: SIZE, snaps: [{ name: "x", cs: CS }], seed: 7 });
    let x = 12345;
    const rand = (n: number) => {
      x ^= x << 13;
      x >>>= 0;
      x ^= x >>> 17;
      x ^= x << 5;
      x >>>= 0;
      return x % n;
    };
    // 2000 chunks in sequence through the snapshot, then 8000 scattered ones, half through the origin.
    const order = Array.from({ length: CHUNKS - 2000 }, (_, i) => i + 2000);
    for (let i = order.length - 1; i > 0; i--) {
      const j = rand(i + 1);
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    const chosen = [...Array.from({ length: 2000 }, (_, i) => i), ...order.slice(0, EXCEPTIONS - 2000)];
    for (let i = 0; i < chosen.length; i += 256) {
      const recs = chosen
        .slice(i, i + 256)
        .map((c, k) =>
          i + k < 2000 || (i + k) % 2 === 0
            ? r.io.write(r.snaps.x!, c * CS, pattern(100_000 + c, CHUNK))
            : r.io.write(r.base, c * CS, pattern(200_000 + c, CHUNK)),
        );
      for (const rec of await Promise.all(recs.map((x) => x.promise))) expect(rec.status).toBe("ok");
    }
    const records = (usage(r.dm, "x").allocated - usage(r.dm, "x").metadata) / CS;
    expect(records).toBe(EXCEPTIONS);
    const xView = await readAll(r, "x", SIZE);
    const yView = r.origin.readSync(0, SIZE);

    // Y: another snapshot of the origin, taken the documented way just before the merge.
    r.backing.add("cow-y", new ControlledDevice(cowSectorsFor(CS, CHUNKS), { name: "cow-y" }));
    await r.dm.suspend("base");
    await r.dm.create("y", { table: `0 ${SIZE} snapshot origin cow-y P ${CS}` });
    await r.dm.resume("base");

    const ev = r.dm.device("base").eventNr;
    const merge = await startMerge(r, SIZE, "x");
    let merging = true;
    const stopped = mergeStopped(r.dm, "base", ev).then(() => (merging = false));
    // Pace the workers by the merge: a few requests each per merged batch (the devices complete
    // synchronously, so unpaced workers would flood the microtask queue and starve the merge).
    const batchWaiters: (() => void)[] = [];
    let batches = 0;
    Object.defineProperty(merge, "mergedBatches", {
      get: () => batches,
      set: (v: number) => {
        batches = v;
        for (const wake of batchWaiters.splice(0)) wake();
      },
    });
    void stopped.then(() => batchWaiters.splice(0).forEach((wake) => wake()));
    const nextBatch = () => new Promise<void>((resolve) => batchWaiters.push(resolve));
    const PER_BATCH = 1;
    const model = Buffer.from(xView);
    const problems: string[] = [];
    let opsDuringMerge = 0;
    let seq = 0;
    const WORKERS = 6;
    const worker = async (w: number) => {
      for (let ops = 0; merging || ops < 200; ops++) {
        if (merging && ops % PER_BATCH === 0) await nextBatch();
        const chunk = rand(CHUNKS / WORKERS) * WORKERS + w;
        const off = rand(CS);
        const len = 1 + rand(CS - off);
        const sector = chunk * CS + off;
        if (rand(2) === 0) {
          const data = pattern(1_000_000 + seq++, len * SECTOR_SIZE);
          const rec = await r.io.write(r.base, sector, data).promise;
          if (rec.status !== "ok") problems.push(`write ${sector}+${len}: ${rec.status}`);
          else data.copy(model, sector * SECTOR_SIZE);
        } else {
          const rec = await r.io.read(r.base, sector, len).promise;
          if (
            rec.status !== "ok" ||
            !rec.data.equals(model.subarray(sector * SECTOR_SIZE, (sector + len) * SECTOR_SIZE))
          ) {
            problems.push(
              `read ${sector}+${len} (chunk ${chunk}): ${rec.status}, ${merging ? "during" : "after"} the merge`,
            );
          }
        }
        if (merging) opsDuringMerge++;
        if (problems.length > 10) return;
      }
    };
    const yReader = async () => {
      for (let ops = 0; merging || ops < 200; ops++) {
        if (merging && ops % PER_BATCH === 0) await nextBatch();
        if (merging && ops % 2 === 1) continue; // every other batch
        const sector = rand(SIZE - 64);
        const len = 1 + rand(64);
        const rec = await r.io.read(r.dm.device("y"), sector, len).promise;
        if (
          rec.status !== "ok" ||
          !rec.data.equals(yView.subarray(sector * SECTOR_SIZE, (sector + len) * SECTOR_SIZE))
        ) {
          problems.push(`snapshot y read ${sector}+${len}: ${rec.status}`);
        }
        if (problems.length > 10) return;
      }
    };
    await Promise.all([...Array.from({ length: WORKERS }, (_, w) => worker(w)), yReader(), stopped]);
    expect(problems).toEqual([]);
    expect(opsDuringMerge).toBeGreaterThan(40_000);
    expect(merge.mergedBatches).toBeGreaterThan(8000); // scattered chunks merge one per batch
    expect(merge.mergedBatches).toBeLessThan(EXCEPTIONS);
    expect(usage(r.dm, "base").allocated).toBe(2 * CS);
    expect(r.dm.status("base")[0]!.params).toBe(`${2 * CS}/${r.cows.x!.sizeSectors} ${2 * CS}`);
    expect(r.origin.readSync(0, SIZE).equals(model)).toBe(true);
    expect((await readAll(r, "y", SIZE)).equals(yView)).toBe(true);
    // Back to a plain snapshot-origin table: same data.
    await r.dm.load("base", `0 ${SIZE} snapshot-origin origin`);
    await r.dm.resume("base");
    expect((await readAll(r, "base", SIZE)).equals(model)).toBe(true);
    expect(r.io.errors).toEqual([]);
    console.log(`10^4 merge: ${merge.mergedBatches} batches, ${opsDuringMerge} verified I/Os during the merge`);
  });
});
