/**
 * The thin pool's events (dm-thin.c: check_low_water_mark, the metadata threshold, set_pool_mode),
 * seen through udm's event mechanism (the pool device's event number, `waitEvent`, which
 * `udmsetup wait` and `info`'s event number read): the first allocation that finds no more free
 * data blocks than the low water mark raises one event, and no other allocation does until the
 * pool is resumed; running out of data space raises one for the mode change.
 */
import { describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../core/bio.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";

const BS = 128;
const BLOCK = BS * SECTOR_SIZE;
const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

describe("thin pool events", () => {
  it("the low water mark raises one event, at the allocation the kernel raises it, and again after a resume", async () => {
    const { dm, backing } = testMapper();
    backing.memory("meta", 8 * 2048);
    const data = backing.memory("data", 8 * BS);
    // 8 data blocks, low water mark 3.
    await dm.create("pool", { table: `0 ${8 * BS} thin-pool meta data ${BS} 3 1 error_if_no_space` });
    await dm.message("pool", 0, "create_thin 1");
    await dm.create("t", { table: `0 ${64 * BS} thin /dev/mapper/pool 1` });
    const t = dm.open("t");
    const events = () => dm.info("pool").eventNr;
    const e0 = events();
    let woken: number | undefined;
    const waiter = dm.waitEvent("pool", e0).then((nr) => (woken = nr));

    // Free blocks before each allocation: 8, 7, 6, 5, 4: above the mark.
    for (let v = 0; v < 5; v++) await t.write(v * BS, pattern(v, BLOCK));
    await settle();
    expect(events()).toBe(e0);
    expect(woken).toBeUndefined();
    // 3 free before this one: the event.
    await t.write(5 * BS, pattern(5, BLOCK));
    await waiter;
    expect(woken).toBe(e0 + 1);
    expect(events()).toBe(e0 + 1);
    // Once only.
    await t.write(6 * BS, pattern(6, BLOCK));
    await t.write(7 * BS, pattern(7, BLOCK));
    expect(events()).toBe(e0 + 1);
    // Out of data space (error_if_no_space): the mode change is one more event.
    await expect(t.write(8 * BS, pattern(8, 512))).rejects.toThrow(/ENOSPC/);
    expect(dm.status("pool")[0]!.params).toMatch(/ 8\/8 - out_of_data_space /);
    expect(events()).toBe(e0 + 2);

    // Grown to 16 blocks and resumed: write mode again, and the mark is armed again.
    data.resize(16 * BS);
    await dm.load("pool", `0 ${16 * BS} thin-pool meta data ${BS} 3 1 error_if_no_space`);
    await dm.resume("pool");
    const e1 = events();
    expect(dm.status("pool")[0]!.params).toMatch(/ 8\/16 - rw /);
    for (let v = 8; v < 13; v++) await t.write(v * BS, pattern(v, BLOCK));
    expect(events()).toBe(e1);
    await t.write(13 * BS, pattern(13, BLOCK));
    expect(events()).toBe(e1 + 1);
  });

  it("a write of many blocks, whose allocations run side by side, raises it when it crosses the mark", async () => {
    const { dm, backing } = testMapper();
    backing.memory("meta", 8 * 2048);
    backing.memory("data", 32 * BS);
    // 32 data blocks, low water mark 20: the 13th allocation finds 20 free.
    await dm.create("pool", { table: `0 ${32 * BS} thin-pool meta data ${BS} 20` });
    await dm.message("pool", 0, "create_thin 1");
    await dm.create("t", { table: `0 ${64 * BS} thin /dev/mapper/pool 1` });
    const t = dm.open("t");
    const e0 = dm.info("pool").eventNr;
    await t.write(0, pattern(1, 8 * BLOCK));
    expect(dm.info("pool").eventNr).toBe(e0);
    await t.write(8 * BS, pattern(2, 8 * BLOCK));
    expect(dm.info("pool").eventNr).toBe(e0 + 1);
  });
});
