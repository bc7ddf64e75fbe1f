/**
 * Bugs of the thin pool the thin crash runner found (testing/thin-crash/, `npm run crash --
 * --target thin`), each shown here deterministically. Both are fixed (targets/thin/pool.ts: a
 * commit leaves the data blocks in flight out of the committed space map, and a discard's blocks
 * go down once their unmapping is committed); the tests keep them fixed.
 *
 * 1. A commit made while a block is being provisioned (allocated, then zeroed, copied or
 *    overwritten, then mapped) makes the block's reference count durable without any mapping
 *    that refers to it: a crash before the next commit leaks that data block for good (the runner
 *    reports "data space map: block N has count 1, but 0 references"; `--count-leaks` counts them).
 *    A fix: a commit waits for the blocks allocated and not yet mapped or given back (the pool
 *    counts them for settleDataBlock), and new allocations wait for that commit.
 * 2. A discard passes down a data block as soon as no mapping of the running transaction refers to
 *    it, but the last commit may still map it in another volume, whose own write broke the sharing
 *    since: a crash before the next commit brings that mapping back over a discarded block, and the
 *    volume loses durable data it never discarded (the runner reports "thinN sector S holds zeros;
 *    allowed: write #W (durable)" after a discard of a snapshot or its origin). dm-thin.c's
 *    passdown checks the running transaction's counts too (passdown_double_checking_shared_status).
 *    A fix: pass the blocks down only once the unmapping is committed (holding them meanwhile so
 *    that they are not handed out again), or only blocks no committed mapping refers to.
 */
import { describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../core/bio.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { checkPoolMetadata } from "../../targets/thin/metadata/check.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";
import { markedWrite, readAll } from "../../testing/crash/ram-disks.js";

const BS = 128;
const BLOCK = BS * SECTOR_SIZE;

describe("thin pool bugs found by the crash runner", () => {
  it("1: a commit during the zeroing of a new block leaves no data block counted but unmapped", async () => {
    const { dm, backing } = testMapper();
    const meta = backing.memory("meta", 8 * 2048);
    const data = backing.add("data", new ControlledDevice(64 * BS, { name: "data" }));
    await dm.create("pool", { table: `0 ${64 * BS} thin-pool meta data ${BS} 0` });
    await dm.message("pool", 0, "create_thin 1");
    await dm.create("t", { table: `0 ${16 * BS} thin /dev/mapper/pool 1` });
    const t = dm.open("t");
    // A partial write to an unprovisioned block: the block is allocated, then zeroed (held here).
    const zeroing = data.hold((bio) => bio.op === "write-zeroes" || bio.op === "write");
    const write = t.write(0, pattern(1, 4096));
    await data.waitForHeld(1);
    // Any commit now (a message, a flush of another volume, the periodic commit).
    await dm.message("pool", 0, "create_thin 2");
    try {
      // What a crash now leaves on the metadata device: that commit.
      const report = await checkPoolMetadata(meta);
      expect(report.errors).toEqual([]);
    } finally {
      data.stopHolding(zeroing);
      data.releaseAll();
      await write;
      await t.close();
      await dm.close();
    }
  });

  it("2: a discard does not pass down a block the last commit maps in another volume", async () => {
    const { dm, backing } = testMapper();
    const meta = backing.memory("meta", 8 * 2048);
    const data = backing.memory("data", 64 * BS);
    await dm.create("pool", { table: `0 ${64 * BS} thin-pool meta data ${BS} 0` });
    await dm.message("pool", 0, "create_thin 1");
    await dm.create("origin", { table: `0 ${16 * BS} thin /dev/mapper/pool 1` });
    const origin = dm.open("origin");
    await origin.write(0, pattern(1, BLOCK));
    await dm.suspend("origin");
    await dm.message("pool", 0, "create_snap 2 1"); // commits: both map block 0 to one data block
    await dm.resume("origin");
    await dm.create("snap", { table: `0 ${16 * BS} thin /dev/mapper/pool 2` });
    const snap = dm.open("snap");
    // The origin breaks the sharing (a copy, not committed), then the snapshot discards the block:
    // no mapping of the running transaction refers to the old data block any more.
    await origin.write(0, pattern(2, 4096));
    await snap.discard(0, BS);
    // Power cut: the devices as they are, the metadata at its last commit (the snapshot's).
    const copy = async (device: MemoryDevice) => {
      const image = new MemoryDevice(device.sizeSectors);
      image.submit(markedWrite(0, await readAll(device, device.sizeSectors)));
      return image;
    };
    const after = testMapper();
    after.backing.add("meta", await copy(meta));
    after.backing.add("data", await copy(data));
    await origin.close();
    await snap.close();
    await dm.close();
    await after.dm.create("pool", { table: `0 ${64 * BS} thin-pool meta data ${BS} 0` });
    await after.dm.create("origin", { table: `0 ${16 * BS} thin /dev/mapper/pool 1` });
    try {
      // The origin's durable data (the write before the snapshot) must be there.
      const block = await after.dm.open("origin").read(0, BS);
      expect(block.equals(pattern(1, BLOCK))).toBe(true);
    } finally {
      await after.dm.close();
    }
  });
});
