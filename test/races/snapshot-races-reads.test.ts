/**
 * Snapshot reads against exception creation (R4, R17 in docs/snapshot.md, "Race and bug tests", and
 * the "never expose unwritten COW space" rule behind the R15/R19 staging race): deterministic
 * scenarios with every relevant device I/O held on a ControlledDevice. No sleeps; `settleAll()`
 * only lets promise chains run.
 */
import { describe, expect, it } from "vitest";
import { type Bio, SECTOR_SIZE } from "../../core/bio.js";
import { readCowImage } from "../../targets/snapshot/cow-image.js";
import type { SnapshotTarget } from "../../targets/snapshot/snapshot.js";
import {
  IDLE,
  type IoRec,
  chunkOf,
  engineState,
  pattern,
  sectorsOf,
  settleAll,
  settleTurns,
  snapshotRig,
  writesOf,
  dataWrite,
  expectDone,
  metadataWrite,
} from "../support/snapshot-rig.js";

const KiB4 = 4096;
/** Snapshot reads routed to the origin are 1 sector in these tests; copies read whole chunks. */
const snapshotRead = (b: Bio) => b.op === "read" && b.sectors === 1;

/**
 * R4 + R17: a snapshot read of an un-copied chunk is sent to the origin and held there; an origin
 * write to that chunk makes the exception, whose copy and commit complete.
 * Guards (R4): `pendingComplete` waits until no tracked read remains on the chunk before removing
 * the pending exception, so the origin write (queued on it) is not issued until the read is done.
 * Guards (R17): the complete exception is inserted *before* that wait, so snapshot reads arriving
 * during the wait go to the COW device, are not tracked, and cannot prolong it.
 * Disable checks: skipping the tracked wait lets the origin write reach the origin as soon as the
 * commit completes (the "no origin write yet" assertion fails, and the held read then returns the
 * new data); inserting the complete exception after the wait instead sends the new reads to the
 * origin, where they are held and tracked (the "new reads complete" assertion fails).
 */
describe("R4 + R17: snapshot read held at the origin vs an origin write to the same chunk", () => {
  it("the origin write waits for the read, the read returns old data, new reads go to the COW meanwhile", async () => {
    const r = await snapshotRig({ originSectors: 256, snaps: [{ name: "s", cs: 8 }] });
    const t = r.target<SnapshotTarget>("s");
    const originLog = r.origin.log.length;
    const readHold = r.origin.hold(snapshotRead);
    const old = r.io.read(r.snaps.s!, 3, 1);
    await r.origin.waitForHeld(1);
    expect(t.tracked.isTracked(0)).toBe(true);

    const w = r.io.write(r.base, 0, pattern(51, KiB4));
    await settleAll();
    // Copy and commit are done: the exception is durable ...
    expect((await readCowImage(r.cows.s!.crash())).records.map((x) => [x.oldChunk, x.newChunk])).toEqual([[0, 2]]);
    // ... but the pending exception stays until the read drains, and the origin write waits.
    expect(engineState(t)).toMatchObject({ pending: 1, alive: 1, tracked: 1 });
    expect(w.completions).toBe(0);
    expect(writesOf(r.origin, originLog)).toEqual([]);

    // R17: a stream of new snapshot reads of that chunk, arriving during the wait, is served from
    // the COW device and completes; none of them is tracked or reaches the origin.
    const fresh: IoRec[] = [];
    for (let i = 0; i < 16; i++) {
      fresh.push(r.io.read(r.snaps.s!, i % 8, 1));
      if (i % 4 === 3) await settleTurns(1);
    }
    await settleAll();
    expectDone(fresh);
    fresh.forEach((f, i) => expect(f.data.equals(sectorsOf(r.initial, i % 8, 1)), `fresh read ${i}`).toBe(true));
    expect(r.origin.held()).toHaveLength(1); // only the old read
    expect(t.tracked.size).toBe(1);
    expect(w.completions).toBe(0);

    r.origin.stopHolding(readHold);
    r.origin.releaseAll();
    await settleAll();
    expectDone([old, w]);
    expect(old.data.equals(sectorsOf(r.initial, 3, 1))).toBe(true); // the old data, not W's
    const log = r.origin.log.slice(originLog);
    const readAt = log.findIndex((x) => x.op === "read" && x.sectors === 1);
    const writeAt = log.findIndex((x) => x.op === "write");
    expect(readAt).toBeGreaterThanOrEqual(0);
    expect(writeAt).toBeGreaterThan(readAt);
    expect(r.origin.readSync(0, 8).equals(pattern(51, KiB4))).toBe(true);
    expect(engineState(t)).toEqual(IDLE);
    expect(r.io.errors).toEqual([]);
  });

  it("a read that reaches the origin while the copy is in flight is waited for too", async () => {
    const r = await snapshotRig({ originSectors: 256, snaps: [{ name: "s", cs: 8 }] });
    const t = r.target<SnapshotTarget>("s");
    const originLog = r.origin.log.length;
    const copyHold = r.cows.s!.hold(dataWrite);
    const w = r.io.write(r.base, 16, pattern(52, KiB4)); // chunk 2
    await r.cows.s!.waitForHeld(1);
    r.origin.hold(snapshotRead);
    const rd = r.io.read(r.snaps.s!, 20, 1); // no complete exception yet: to the origin, tracked
    await r.origin.waitForHeld(1);
    r.cows.s!.stopHolding(copyHold);
    r.cows.s!.releaseAll();
    await settleAll();
    expect((await readCowImage(r.cows.s!.crash())).records.map((x) => [x.oldChunk, x.newChunk])).toEqual([[2, 2]]);
    expect(w.completions).toBe(0);
    expect(writesOf(r.origin, originLog)).toEqual([]);
    r.origin.held()[0]!.release();
    await settleAll();
    expectDone([rd, w]);
    expect(rd.data.equals(sectorsOf(r.initial, 20, 1))).toBe(true);
    expect(engineState(t)).toEqual(IDLE);
  });
});

/**
 * Never expose unwritten COW space (the staging race of R15/R19): a COW chunk is allocated when
 * the pending exception is created, long before it holds anything. The COW device here is "used":
 * every data chunk is full of stale bytes (0xA5), as a reused LV would be.
 * Guards: the complete exception is inserted only in `pendingComplete` after a successful copy and
 * commit, and snapshot writes to the chunk queue on the pending exception until then; reads of a
 * chunk without a complete exception go to the origin; a failed copy never inserts it.
 * Disable checks: inserting the complete exception at allocation (findOrAllocatePending) makes the
 * first snapshot read return 0xA5 garbage; inserting it when the copy finishes (before the commit)
 * sends the read in the commit window to the COW device and lets the snapshot write in that
 * window complete before its exception is durable.
 */
describe("unwritten COW space is never exposed", () => {
  const STALE = 0xa5;
  const stale = (cow: { sizeSectors: number; writeSync(s: number, d: Buffer): void }) =>
    cow.writeSync(8, Buffer.alloc((cow.sizeSectors - 8) * SECTOR_SIZE, STALE)); // chunk 0 stays zero: a new store
  const isStale = (b: Buffer) => b.includes(Buffer.alloc(32, STALE)); // 32 stale bytes in a row: not from a pattern

  it("a chunk shows through the snapshot only after its copy and its commit", async () => {
    const r = await snapshotRig({ originSectors: 256, snaps: [{ name: "s", cs: 8, prepareCow: stale }] });
    const t = r.target<SnapshotTarget>("s");
    const originLog = r.origin.log.length;
    const copyHold = r.cows.s!.hold(dataWrite);
    const commitHold = r.cows.s!.hold(metadataWrite);

    const w = r.io.write(r.base, 40, pattern(61, KiB4)); // chunk 5: copy → COW chunk 2
    const sw = r.io.write(r.snaps.s!, 74, pattern(62, 2 * SECTOR_SIZE)); // chunk 9: copy → COW chunk 3
    await r.cows.s!.waitForHeld(2);
    await settleAll();
    expect(r.dm.status("s")[0]!.params).toMatch(/^32\//); // chunks 2 and 3 are allocated ...

    const reads1 = [r.io.read(r.snaps.s!, 40, 8), r.io.read(r.snaps.s!, 72, 8)];
    await settleAll();
    expectDone(reads1); // ... yet reads still come from the origin
    expect(reads1[0]!.data.equals(chunkOf(r.initial, 8, 5))).toBe(true);
    expect(reads1[1]!.data.equals(chunkOf(r.initial, 8, 9))).toBe(true);

    // Copies written, commit still held: still not visible, and writers still wait.
    r.cows.s!.stopHolding(copyHold);
    r.cows.s!.releaseAll();
    await r.cows.s!.waitForHeld(1);
    await settleAll();
    const readsBefore = r.origin.log.filter((x) => x.op === "read").length;
    const reads2 = [r.io.read(r.snaps.s!, 40, 8), r.io.read(r.snaps.s!, 72, 8)];
    const sw2 = r.io.write(r.snaps.s!, 44, pattern(63, SECTOR_SIZE)); // chunk 5, during the commit window
    await settleAll();
    expectDone(reads2);
    expect(r.origin.log.filter((x) => x.op === "read").length).toBe(readsBefore + 2); // served by the origin
    expect(isStale(reads2[0]!.data) || isStale(reads2[1]!.data)).toBe(false);
    expect(reads2[0]!.data.equals(chunkOf(r.initial, 8, 5))).toBe(true);
    expect([w.completions, sw.completions, sw2.completions]).toEqual([0, 0, 0]);
    expect(writesOf(r.origin, originLog)).toEqual([]);

    r.cows.s!.stopHolding(commitHold);
    r.cows.s!.releaseAll();
    await settleAll();
    expectDone([w, sw, sw2]);
    const after5 = Buffer.from(chunkOf(r.initial, 8, 5));
    pattern(63, SECTOR_SIZE).copy(after5, 4 * SECTOR_SIZE);
    const after9 = Buffer.from(chunkOf(r.initial, 8, 9));
    pattern(62, 2 * SECTOR_SIZE).copy(after9, 2 * SECTOR_SIZE);
    const reads3 = [r.io.read(r.snaps.s!, 40, 8), r.io.read(r.snaps.s!, 72, 8)];
    await settleAll();
    expectDone(reads3);
    expect(reads3[0]!.data.equals(after5)).toBe(true);
    expect(reads3[1]!.data.equals(after9)).toBe(true);
    expect(engineState(t)).toEqual(IDLE);
  });

  it("a failed copy write invalidates the snapshot: its I/O fails, origin writes succeed, nothing stale is read", async () => {
    const r = await snapshotRig({ originSectors: 256, snaps: [{ name: "s", cs: 8, prepareCow: stale }] });
    const t = r.target<SnapshotTarget>("s");
    r.cows.s!.hold(dataWrite);
    const w = r.io.write(r.base, 96, pattern(64, KiB4)); // chunk 12
    const sw = r.io.write(r.snaps.s!, 99, pattern(65, SECTOR_SIZE)); // queues on the same exception
    const [copyWrite] = await r.cows.s!.waitForHeld(1);
    const before = r.io.read(r.snaps.s!, 96, 8);
    await settleAll();
    expectDone([before]);
    expect(before.data.equals(chunkOf(r.initial, 8, 12))).toBe(true);

    copyWrite!.fail("EIO");
    await settleAll();
    expectDone([w]);
    expectDone([sw], "EIO");
    expect(r.dm.status("s")[0]!.params).toBe("Invalid");
    expect(r.origin.readSync(96, 8).equals(pattern(64, KiB4))).toBe(true);
    const after = [
      r.io.read(r.snaps.s!, 96, 8),
      r.io.read(r.snaps.s!, 0, 8),
      r.io.write(r.snaps.s!, 8, pattern(66, KiB4)),
    ];
    await settleAll();
    expectDone(after, "EIO");
    for (const a of after.slice(0, 2)) expect(isStale(a.data)).toBe(false);
    // Later origin writes ignore the invalid snapshot.
    const w2 = r.io.write(r.base, 104, pattern(67, KiB4));
    await settleAll();
    expectDone([w2]);
    expect(engineState(t)).toEqual(IDLE);
    expect(r.io.errors).toEqual([]);
  });
});

/**
 * Not a catalogue entry: a bug the fault-injection property found. Origin writes wait for snapshot
 * reads routed to the origin only while the snapshot is valid. When it becomes invalid with such a
 * read still in flight (its chunk's copy fails, or an origin write finds the COW full), the origin
 * writes go ahead and can overwrite the chunk under the read, which then completed "successfully"
 * with the new data: garbage from a snapshot. (The kernel behaves the same way; it never matters
 * there as much because nobody checks.) Now such a read completes with EIO, like every other I/O
 * of an invalid snapshot (`SnapshotTarget.endIo`).
 * Disable check: without the validity check in endIo both reads below return the origin write's
 * data with status ok.
 */
describe("a snapshot read in flight when the snapshot becomes invalid", () => {
  it("a failed copy: the read fails instead of returning the origin write's data", async () => {
    const r = await snapshotRig({ originSectors: 256, snaps: [{ name: "s", cs: 8 }] });
    r.origin.hold((b) => b.op === "read");
    const rd = r.io.read(r.snaps.s!, 3, 1);
    const w = r.io.write(r.base, 0, pattern(91, KiB4));
    const [, copyRead] = await r.origin.waitForHeld(2);
    copyRead!.fail("EIO");
    await settleAll();
    expectDone([w]); // retried after the failure: the invalid snapshot no longer holds it back
    expect(r.dm.status("s")[0]!.params).toBe("Invalid");
    r.origin.releaseAll();
    await settleAll();
    expectDone([rd], "EIO");
  });

  it("a full COW on an origin write: the read fails instead of returning that write's data", async () => {
    // Header, area 0 and one data chunk.
    const r = await snapshotRig({ originSectors: 256, snaps: [{ name: "s", cs: 8, cowSectors: 24 }] });
    const w1 = r.io.write(r.base, 40, pattern(92, KiB4)); // takes the only data chunk
    await settleAll();
    expectDone([w1]);
    r.origin.hold(snapshotRead);
    const rd = r.io.read(r.snaps.s!, 3, 1);
    await r.origin.waitForHeld(1);
    const w2 = r.io.write(r.base, 0, pattern(93, KiB4)); // COW full: invalidates, goes straight on
    await settleAll();
    expectDone([w2]);
    expect(r.dm.status("s")[0]!.params).toBe("Invalid");
    r.origin.releaseAll();
    await settleAll();
    expectDone([rd], "EIO");
  });
});
