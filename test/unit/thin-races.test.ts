/**
 * Races the thin target's bio prison and deferred sets resolve, each made deterministic by holding
 * single I/Os on a controllable data device (dm-thin.c's cells and shared_read_ds, all_io_ds):
 *
 * - two writes to one unprovisioned block: the second waits for the first's provisioning (one
 *   block, zeroed once, both writes in it);
 * - a write to a shared block while a read of it is in flight: the read returns the old data and
 *   the new mapping waits for it;
 * - a discard racing the provisioning of a block it covers: it waits, then unmaps the block;
 * - snapshot creation while writes to the origin are in flight (the caller suspends the origin
 *   first, as with the kernel): the suspend waits for a write to a mapped block, a write being
 *   provisioned and a write waiting in that block's cell, the snapshot holds all three, and the
 *   origin's next write to a block it mapped alone before is a shared block's write (copied, the
 *   snapshot keeps its data). With a noflush suspend the write waiting in the cell is pushed back
 *   instead: it completes after the resume and lands in the origin only.
 */
import { describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../core/bio.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";
import { settle, settlesSoon } from "../support/event-loop.js";

const BS = 128;
const BLOCK = BS * SECTOR_SIZE;

async function setup() {
  const { dm, backing } = testMapper();
  backing.memory("meta", 8 * 2048);
  const data = backing.add("data", new ControlledDevice(64 * BS, { name: "data" }));
  await dm.create("pool", { table: `0 ${64 * BS} thin-pool meta data ${BS} 0` });
  await dm.message("pool", 0, "create_thin 1");
  await dm.create("t", { table: `0 ${16 * BS} thin /dev/mapper/pool 1` });
  return { dm, data, t: dm.open("t") };
}

const usedBlocks = (dm: Awaited<ReturnType<typeof setup>>["dm"]) =>
  Number(/ (\d+)\/64 /.exec(dm.status("pool")[0]!.params)![1]);

describe("thin races", () => {
  it("two writes to one unprovisioned block: one block, zeroed once, both writes in it", async () => {
    const { dm, data, t } = await setup();
    const zeroing = data.hold((bio) => bio.op === "write-zeroes");
    const first = t.write(0, pattern(1, 4096));
    await data.waitForHeld(1);
    let secondDone = false;
    const second = t.write(16, pattern(2, 4096)).then(() => (secondDone = true));
    await settle();
    // The second write waits in the block's cell: it has not provisioned a block of its own.
    expect(secondDone).toBe(false);
    expect(data.held()).toHaveLength(1);
    data.stopHolding(zeroing);
    data.releaseAll();
    await Promise.all([first, second]);
    expect(usedBlocks(dm)).toBe(1);
    const expected = Buffer.alloc(BLOCK);
    pattern(1, 4096).copy(expected, 0);
    pattern(2, 4096).copy(expected, 16 * SECTOR_SIZE);
    expect((await t.read(0, BS)).equals(expected)).toBe(true);
    expect(data.log.filter((r) => r.op === "write-zeroes")).toHaveLength(1);
  });

  it("a write to a shared block while a read of it is in flight: the read sees the old data, the mapping waits for it", async () => {
    const { dm, data, t } = await setup();
    await t.write(0, pattern(3, BLOCK));
    await dm.suspend("t");
    await dm.message("pool", 0, "create_snap 2 1");
    await dm.resume("t");
    await dm.create("snap", { table: `0 ${16 * BS} thin /dev/mapper/pool 2` });
    const snap = dm.open("snap");

    const reads = data.hold((bio) => bio.op === "read");
    const read = snap.read(0, BS);
    await data.waitForHeld(1);
    data.stopHolding(reads);
    let written = false;
    const write = t.write(8, pattern(4, 4096)).then(() => (written = true));
    // The copy of the shared block goes ahead; the new mapping waits for the read in flight.
    await settle();
    await settle();
    expect(written).toBe(false);
    const [heldRead] = data.held();
    heldRead!.release();
    expect((await read).equals(pattern(3, BLOCK))).toBe(true);
    await write;
    const expected = Buffer.from(pattern(3, BLOCK));
    pattern(4, 4096).copy(expected, 8 * SECTOR_SIZE);
    expect((await t.read(0, BS)).equals(expected)).toBe(true);
    expect((await snap.read(0, BS)).equals(pattern(3, BLOCK))).toBe(true);
    expect(usedBlocks(dm)).toBe(2);
  });

  it("a discard racing the provisioning of a block it covers waits for it, then unmaps it", async () => {
    const { dm, data, t } = await setup();
    const zeroing = data.hold((bio) => bio.op === "write-zeroes");
    const write = t.write(BS + 8, pattern(5, 4096));
    await data.waitForHeld(1);
    let discarded = false;
    const discard = t.discard(0, 4 * BS).then(() => (discarded = true));
    await settle();
    expect(discarded).toBe(false);
    data.stopHolding(zeroing);
    data.releaseAll();
    await write;
    await discard;
    expect(dm.status("t")[0]!.params).toBe("0 -");
    expect((await t.read(BS, BS)).every((x) => x === 0)).toBe(true);
  });

  /**
   * Writes in flight to the origin when the caller suspends it for `create_snap`: one to a mapped
   * block (held at the data device), one provisioning block 1 (its zeroing held), one waiting in
   * block 1's cell. Returns them with the suspend under way.
   */
  async function writesInFlightAtSuspend(noflush: boolean) {
    const { dm, data, t } = await setup();
    await t.write(0, pattern(20, BLOCK));
    const heldWrite = data.hold((bio) => bio.op === "write" && bio.sector < BS);
    const mapped = t.write(8, pattern(21, 4096));
    await data.waitForHeld(1);
    data.stopHolding(heldWrite);
    const zeroing = data.hold((bio) => bio.op === "write-zeroes");
    const provisioning = t.write(BS + 8, pattern(22, 4096));
    await data.waitForHeld(2);
    data.stopHolding(zeroing);
    let waitingDone = false;
    const waiting = t.write(BS + 16, pattern(23, 4096)).then(() => (waitingDone = true));
    await settle();
    const suspend = dm.suspend("t", { noflush });
    return { dm, data, t, mapped, provisioning, waiting, suspend, waitingDone: () => waitingDone };
  }

  it("snapshot creation with writes in flight: the origin's suspend waits for them, the snapshot holds them, later origin writes copy first", async () => {
    const { dm, data, t, mapped, provisioning, waiting, suspend } = await writesInFlightAtSuspend(false);
    expect(await settlesSoon(suspend)).toBe(false);
    data.releaseAll();
    await Promise.all([mapped, provisioning, waiting]);
    await suspend;
    await dm.message("pool", 0, "create_snap 2 1");
    await dm.resume("t");
    await dm.create("snap", { table: `0 ${16 * BS} thin /dev/mapper/pool 2` });
    const snap = dm.open("snap");
    const before = Buffer.alloc(2 * BLOCK);
    pattern(20, BLOCK).copy(before);
    pattern(21, 4096).copy(before, 8 * SECTOR_SIZE);
    pattern(22, 4096).copy(before, BLOCK + 8 * SECTOR_SIZE);
    pattern(23, 4096).copy(before, BLOCK + 16 * SECTOR_SIZE);
    expect((await snap.read(0, 2 * BS)).equals(before)).toBe(true);
    expect(usedBlocks(dm)).toBe(2);
    // Block 0 was the origin's alone before the snapshot: now it is shared, so the write copies it.
    await t.write(0, pattern(24, 4096));
    expect(usedBlocks(dm)).toBe(3);
    expect((await snap.read(0, 2 * BS)).equals(before)).toBe(true);
    const after = Buffer.from(before);
    pattern(24, 4096).copy(after);
    expect((await t.read(0, 2 * BS)).equals(after)).toBe(true);
  });

  it("snapshot creation after a noflush suspend: the write waiting in a cell is pushed back and lands after the snapshot, in the origin only", async () => {
    const { dm, data, t, mapped, provisioning, waiting, suspend, waitingDone } = await writesInFlightAtSuspend(true);
    expect(await settlesSoon(suspend)).toBe(false);
    data.releaseAll();
    await Promise.all([mapped, provisioning]);
    await suspend;
    expect(waitingDone()).toBe(false);
    expect(dm.device("t").queued).toBe(1);
    await dm.message("pool", 0, "create_snap 2 1");
    await dm.resume("t");
    await waiting;
    await dm.create("snap", { table: `0 ${16 * BS} thin /dev/mapper/pool 2` });
    const snap = dm.open("snap");
    const inSnap = Buffer.alloc(BLOCK);
    pattern(22, 4096).copy(inSnap, 8 * SECTOR_SIZE);
    expect((await snap.read(BS, BS)).equals(inSnap)).toBe(true);
    const inOrigin = Buffer.from(inSnap);
    pattern(23, 4096).copy(inOrigin, 16 * SECTOR_SIZE);
    expect((await t.read(BS, BS)).equals(inOrigin)).toBe(true);
    // The pushed-back write broke the sharing of block 1: a copy.
    expect(usedBlocks(dm)).toBe(3);
  });
});
