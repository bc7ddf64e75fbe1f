/**
 * The thin-pool and thin targets over RAM disks: tables, status lines and constructor errors as the
 * kernel's; messages; provisioning (zeroed blocks, skip_block_zeroing, whole-block writes);
 * snapshots that share until written; flushes that commit; discards that unmap and pass down;
 * running out of data space (error or queue until the pool grows); the pool kept across reloads.
 */
import { describe, expect, it } from "vitest";
import { SECTOR_SIZE, readBio, submitAndWait, writeBio } from "../../core/bio.js";
import { checkPoolMetadata } from "../../targets/thin/metadata/check.js";
import { ThinPoolMetadata } from "../../targets/thin/metadata/thin-metadata.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";

const BS = 128; // 64 KiB data blocks
const BLOCK = BS * SECTOR_SIZE;
const MiB = 2048;

async function setup(opts: { dataBlocks?: number; features?: string; meta?: ControlledDevice } = {}) {
  const { dm, backing } = testMapper();
  const meta = backing.add("meta", opts.meta ?? new ControlledDevice(8 * MiB, { name: "meta", volatileCache: true }));
  const dataBlocks = opts.dataBlocks ?? 256;
  const data = backing.memory("data", dataBlocks * BS);
  await dm.create("pool", { table: `0 ${dataBlocks * BS} thin-pool meta data ${BS} 4${opts.features ?? ""}` });
  const thin = async (name: string, id: number, sectors = 64 * BS) => {
    await dm.create(name, { table: `0 ${sectors} thin /dev/mapper/pool ${id}` });
    return dm.open(name);
  };
  return { dm, backing, meta, data, thin };
}

const errorOf = (p: Promise<unknown>) =>
  p.then(
    () => "ok",
    (e: Error) => e.message,
  );

describe("thin-pool", () => {
  it("prints the kernel's table and status lines", async () => {
    const { dm } = await setup({ features: " 2 skip_block_zeroing error_if_no_space" });
    expect(dm.tableText("pool")).toBe(
      `0 ${256 * BS} thin-pool meta data ${BS} 4 2 skip_block_zeroing error_if_no_space \n`,
    );
    const status = dm.status("pool")[0]!.params;
    expect(status).toMatch(/^0 \d+\/2048 0\/256 - rw discard_passdown error_if_no_space - 512 $/);
  });

  it("a data device that cannot discard turns discard passdown off: the status says so, the table keeps what was asked", async () => {
    const { dm, backing } = testMapper();
    backing.memory("meta", 8 * MiB);
    backing.add("data", new ControlledDevice(64 * BS, { name: "data", supportsDiscard: false }));
    await dm.create("pool", { table: `0 ${64 * BS} thin-pool meta data ${BS} 0` });
    expect(dm.status("pool")[0]!.params).toMatch(/ rw no_discard_passdown queue_if_no_space /);
    expect(dm.tableText("pool")).toBe(`0 ${64 * BS} thin-pool meta data ${BS} 0 0 \n`);
    await dm.message("pool", 0, "create_thin 1");
    await dm.create("t", { table: `0 ${16 * BS} thin /dev/mapper/pool 1` });
    const t = dm.open("t");
    await t.write(0, pattern(1, BLOCK));
    await t.discard(0, BS); // still unmaps
    expect(dm.status("t")[0]!.params).toBe("0 -");
  });

  it("constructor errors use the kernel's strings", async () => {
    const { dm, backing } = testMapper();
    backing.memory("m", 8 * MiB);
    backing.memory("d", 100 * BS);
    const err = (t: string) => errorOf(dm.create("p", { table: `0 ${100 * BS} ${t}` }));
    expect(await err("thin-pool m d 128")).toBe("thin-pool: Invalid argument count");
    expect(await err("thin-pool m m 128 0")).toBe("thin-pool: Error setting metadata or data device");
    expect(await err("thin-pool m d 128 0 1 bogus")).toBe("thin-pool: Unrecognised pool feature requested");
    expect(await err("thin-pool nothere d 128 0")).toBe("thin-pool: Error opening metadata block device");
    expect(await err("thin-pool m nothere 128 0")).toBe("thin-pool: Error getting data device");
    expect(await err("thin-pool m d 100 0")).toBe("thin-pool: Invalid block size");
    expect(await err("thin-pool m d 128 -1")).toBe("thin-pool: Invalid low water mark");
    await dm.create("p", { table: `0 ${100 * BS} thin-pool m d 128 0` });
    // One pool per metadata device.
    backing.memory("d2", 100 * BS);
    expect(await errorOf(dm.create("q", { table: `0 ${100 * BS} thin-pool m d2 128 0` }))).toBe(
      "thin-pool: metadata device already in use by a pool",
    );
  });

  it("messages create, snapshot and delete devices, set the transaction id, hold and release a metadata snapshot", async () => {
    const { dm } = await setup();
    await dm.message("pool", 0, "create_thin 1");
    await dm.message("pool", 0, "create_snap 2 1");
    await dm.message("pool", 0, "set_transaction_id 0 5");
    expect(dm.status("pool")[0]!.params).toMatch(/^5 /);
    await dm.message("pool", 0, "reserve_metadata_snap");
    expect(dm.status("pool")[0]!.params).toMatch(/^5 \d+\/2048 0\/256 \d+ rw /);
    await dm.message("pool", 0, "release_metadata_snap");
    expect(dm.status("pool")[0]!.params).toMatch(/^5 \d+\/2048 0\/256 - rw /);
    await dm.message("pool", 0, "delete 2");
    const failing = async (m: string) => errorOf(dm.message("pool", 0, m));
    expect(await failing("create_thin 1")).toMatch(
      /^thin-pool: Creation of new thinly-provisioned device with id 1 failed/,
    );
    expect(await failing("create_thin 16777216")).toBe("thin-pool: Message received with invalid device id: 16777216");
    expect(await failing("create_thin")).toBe("thin-pool: Message received with 1 arguments instead of 2.");
    expect(await failing("delete 2")).toMatch(/^thin-pool: Deletion of thin device 2 failed/);
    expect(await failing("set_transaction_id 4 6")).toMatch(/^thin-pool: Failed to change transaction id from 4 to 6/);
    expect(await failing("frobnicate")).toBe("thin-pool: Unrecognised thin pool target message received: frobnicate");
  });
});

describe("thin", () => {
  it("constructor errors use the kernel's strings", async () => {
    const { dm, backing } = await setup();
    backing.memory("plain", 1000);
    const err = (t: string) => errorOf(dm.create("t", { table: `0 ${BS} ${t}` }));
    expect(await err("thin /dev/mapper/pool")).toBe("thin: Invalid argument count");
    expect(await err("thin /dev/mapper/pool 1 /dev/mapper/pool")).toBe("thin: Error setting origin device");
    expect(await err("thin /dev/mapper/nopool 1")).toBe("thin: Error opening pool device");
    expect(await err("thin /dev/mapper/pool x")).toBe("thin: Invalid device id");
    expect(await err("thin plain 1")).toBe("thin: Couldn't get pool mapped device");
    expect(await err("thin /dev/mapper/pool 1")).toBe("thin: Couldn't open thin internal device");
    await dm.create("other", { table: "0 8 zero" });
    expect(await err("thin /dev/mapper/other 1")).toBe("thin: Couldn't find pool object");
  });

  it("provisions on first write: partial blocks zeroed around the data, unwritten blocks read as zeros", async () => {
    const { dm, thin } = await setup();
    await dm.message("pool", 0, "create_thin 1");
    const t = await thin("t", 1);
    expect(dm.tableText("t")).toBe(`0 ${64 * BS} thin 253:0 1\n`);
    expect(dm.status("t")[0]!.params).toBe("0 -");
    await t.write(BS + 8, pattern(1, 4096)); // inside block 1
    await t.write(5 * BS, pattern(2, BLOCK)); // block 5, whole
    const block1 = Buffer.alloc(BLOCK);
    pattern(1, 4096).copy(block1, 8 * SECTOR_SIZE);
    expect((await t.read(BS, BS)).equals(block1)).toBe(true);
    expect((await t.read(5 * BS, BS)).equals(pattern(2, BLOCK))).toBe(true);
    expect((await t.read(0, BS)).every((x) => x === 0)).toBe(true);
    expect(dm.status("t")[0]!.params).toBe(`${2 * BS} ${6 * BS - 1}`);
    expect(dm.status("pool")[0]!.params).toMatch(/ 2\/256 /);
  });

  it("skip_block_zeroing leaves the rest of a new block as the data device had it", async () => {
    const { dm, data, thin } = await setup({ features: " 1 skip_block_zeroing" });
    await submitAndWait(data, writeBio(0, Buffer.alloc(BLOCK, 0xee)));
    await dm.message("pool", 0, "create_thin 1");
    const t = await thin("t", 1);
    await t.write(0, pattern(3, 512));
    expect((await t.read(1, 1)).every((x) => x === 0xee)).toBe(true);
  });

  it("a snapshot keeps its data while the origin is written, and the reverse", async () => {
    const { dm, thin } = await setup();
    await dm.message("pool", 0, "create_thin 1");
    const origin = await thin("origin", 1);
    await origin.write(0, pattern(4, 4 * BLOCK));
    await dm.suspend("origin");
    await dm.message("pool", 0, "create_snap 2 1");
    await dm.resume("origin");
    const snap = await thin("snap", 2);
    await origin.write(8, pattern(5, 4096)); // breaks sharing of block 0: a copy, then the write
    await snap.write(2 * BS, pattern(6, BLOCK)); // whole block 2 of the snapshot
    expect((await snap.read(0, 4 * BS)).subarray(0, 2 * BLOCK).equals(pattern(4, 2 * BLOCK))).toBe(true);
    expect((await snap.read(2 * BS, BS)).equals(pattern(6, BLOCK))).toBe(true);
    const expected = Buffer.from(pattern(4, 4 * BLOCK));
    pattern(5, 4096).copy(expected, 8 * SECTOR_SIZE);
    expect((await origin.read(0, 4 * BS)).equals(expected)).toBe(true);
    // Four shared blocks, one copy for each side's write.
    expect(dm.status("pool")[0]!.params).toMatch(/ 6\/256 /);
  });

  it("a flush commits the mappings: after a crash the written data is there", async () => {
    const meta = new ControlledDevice(8 * MiB, { name: "meta", volatileCache: true });
    const { dm, data, thin } = await setup({ meta });
    await dm.message("pool", 0, "create_thin 1");
    const t = await thin("t", 1);
    await t.write(0, pattern(7, BLOCK));
    await t.flush();
    await t.write(3 * BS, pattern(8, BLOCK)); // not flushed
    const crashed = meta.crash();
    expect((await checkPoolMetadata(crashed)).errors).toEqual([]);
    const pmd = await ThinPoolMetadata.open(crashed, { dataBlockSize: BS });
    const td = await pmd.openThin(1);
    const b0 = await td.findBlock(0);
    expect(b0).toMatchObject({ shared: false });
    expect(await td.findBlock(3)).toBeUndefined();
    const onData = Buffer.alloc(BLOCK);
    await submitAndWait(data, readBio(b0!.block * BS, onData));
    expect(onData.equals(pattern(7, BLOCK))).toBe(true);
    td.close();
  });

  it("a discard unmaps the whole blocks it covers and passes down those no one else maps", async () => {
    const { dm, thin } = await setup();
    await dm.message("pool", 0, "create_thin 1");
    const t = await thin("t", 1);
    await t.write(0, pattern(9, 6 * BLOCK));
    await dm.suspend("t");
    await dm.message("pool", 0, "create_snap 2 1");
    await dm.resume("t");
    await t.write(4 * BS, pattern(10, BLOCK)); // block 4 is the origin's own now
    await t.discard(BS / 2, 5 * BS); // blocks 1..4 whole, half of 0 and 5
    expect(dm.status("t")[0]!.params).toBe(`${2 * BS} ${6 * BS - 1}`);
    expect((await t.read(2 * BS, BS)).every((x) => x === 0)).toBe(true);
    expect((await t.read(0, BS)).equals(pattern(9, BLOCK))).toBe(true);
    const snap = await thin("snap", 2);
    expect((await snap.read(0, 6 * BS)).equals(pattern(9, 6 * BLOCK))).toBe(true);
  });

  it("a discard's data blocks go down to the data device once the unmapping is committed, only those no one maps", async () => {
    const { dm, backing } = testMapper();
    backing.memory("meta", 8 * MiB);
    const data = backing.add("data", new ControlledDevice(64 * BS, { name: "data" }));
    await dm.create("pool", { table: `0 ${64 * BS} thin-pool meta data ${BS} 0` });
    await dm.message("pool", 0, "create_thin 1");
    await dm.create("t", { table: `0 ${16 * BS} thin /dev/mapper/pool 1` });
    const t = dm.open("t");
    await t.write(0, pattern(11, 4 * BLOCK));
    await dm.suspend("t");
    await dm.message("pool", 0, "create_snap 2 1");
    await dm.resume("t");
    await t.write(2 * BS, pattern(12, BLOCK)); // block 2 is the origin's own now
    const discards = () => data.log.filter((r) => r.op === "discard");
    await t.discard(0, 4 * BS);
    expect(discards()).toHaveLength(0);
    await t.flush(); // commits the unmapping
    // Only the copy of block 2: blocks 0, 1 and 3 are still the snapshot's.
    expect(discards().map((r) => [r.sector, r.sectors])).toEqual([[4 * BS, BS]]);
    const snap = await (async () => {
      await dm.create("snap", { table: `0 ${16 * BS} thin /dev/mapper/pool 2` });
      return dm.open("snap");
    })();
    expect((await snap.read(0, 4 * BS)).equals(pattern(11, 4 * BLOCK))).toBe(true);
  });

  it("out of data space: error_if_no_space fails the write with ENOSPC", async () => {
    const { dm, thin } = await setup({ dataBlocks: 2, features: " 1 error_if_no_space" });
    await dm.message("pool", 0, "create_thin 1");
    const t = await thin("t", 1);
    await t.write(0, pattern(1, 2 * BLOCK));
    expect(await errorOf(t.write(2 * BS, pattern(2, 512)))).toMatch(/ENOSPC/);
    expect(dm.status("pool")[0]!.params).toMatch(/ 2\/2 - out_of_data_space /);
  });

  it("out of data space: a write waits until the pool grows and is resumed", async () => {
    const { dm, data, thin } = await setup({ dataBlocks: 2 });
    await dm.message("pool", 0, "create_thin 1");
    const t = await thin("t", 1);
    await t.write(0, pattern(1, 2 * BLOCK));
    let done = false;
    const waiting = t.write(2 * BS, pattern(2, BLOCK)).then(() => (done = true));
    await new Promise<void>((resolve) => setImmediate(resolve));
    expect(done).toBe(false);
    expect(dm.status("pool")[0]!.params).toMatch(/ out_of_data_space discard_passdown queue_if_no_space /);
    data.resize(8 * BS);
    await dm.load("pool", `0 ${8 * BS} thin-pool meta data ${BS} 4`);
    await dm.resume("pool");
    await waiting;
    expect((await t.read(2 * BS, BS)).equals(pattern(2, BLOCK))).toBe(true);
    expect(dm.status("pool")[0]!.params).toMatch(/ 3\/8 - rw /);
  });
});
