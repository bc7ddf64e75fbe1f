/**
 * Races the thin target's bio prison and deferred sets resolve, each made deterministic by holding
 * single I/Os on a controllable data device (dm-thin.c's cells and shared_read_ds, all_io_ds):
 *
 * - two writes to one unprovisioned block: the second waits for the first's provisioning (one
 *   block, zeroed once, both writes in it);
 * - a write to a shared block while a read of it is in flight: the read returns the old data and
 *   the new mapping waits for it;
 * - a discard racing the provisioning of a block it covers: it waits, then unmaps the block.
 */
import { describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../core/bio.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";

const BS = 128;
const BLOCK = BS * SECTOR_SIZE;
const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

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
});
