/**
 * I/O errors on a thin pool's data and metadata devices, and the kernel's answers to them
 * (dm-thin.c: process_prepared_mapping_fail, metadata_operation_failed, abort_transaction,
 * set_pool_mode):
 *
 * - a data write that fails while a block is provisioned fails the bio with EIO and gives the
 *   block back: no mapping, no block used, the pool stays `rw`, a retry works;
 * - a data read that fails fails the bio, nothing else;
 * - a failed read of a shared block while its sharing is broken fails the write; the snapshot and
 *   the origin keep their data;
 * - a metadata write that fails in a commit fails what waited for the commit (EIO), aborts the
 *   transaction, sets needs_check on disk and makes the pool read-only: mapped blocks stay
 *   writable, new blocks are refused, what was committed before reads back after the pool is made
 *   again, and the metadata stays consistent;
 * - when even that fails (the metadata device is gone), the pool goes to fail mode: `Fail`, every
 *   bio errors.
 */
import { describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../core/bio.js";
import { checkPoolMetadata } from "../../targets/thin/metadata/check.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";

const BS = 128;
const BLOCK = BS * SECTOR_SIZE;
const DATA_BLOCKS = 64;

const errorOf = (p: Promise<unknown>) =>
  p.then(
    () => "ok",
    (e: Error) => e.message,
  );

async function setup(
  meta = new ControlledDevice(8 * 2048, { name: "meta" }),
  data = new ControlledDevice(DATA_BLOCKS * BS, { name: "data" }),
  fresh = true,
) {
  const { dm, backing } = testMapper();
  backing.add("meta", meta);
  backing.add("data", data);
  await dm.create("pool", { table: `0 ${DATA_BLOCKS * BS} thin-pool meta data ${BS} 0` });
  if (fresh) await dm.message("pool", 0, "create_thin 1");
  await dm.create("t", { table: `0 ${16 * BS} thin /dev/mapper/pool 1` });
  return { dm, meta, data, t: dm.open("t") };
}

type Dm = Awaited<ReturnType<typeof setup>>["dm"];
const poolStatus = (dm: Dm) => dm.status("pool")[0]!.params;
const usedDataBlocks = (dm: Dm) => Number(new RegExp(` (\\d+)/${DATA_BLOCKS} `).exec(poolStatus(dm))![1]);

describe("thin pool: I/O errors on the data device", () => {
  it("a failed data write while provisioning: EIO, the block given back, the pool still rw, a retry works", async () => {
    const { dm, data, t } = await setup();
    data.failNext((bio) => bio.op === "write");
    expect(await errorOf(t.write(0, pattern(1, BLOCK)))).toMatch(/EIO/);
    expect(usedDataBlocks(dm)).toBe(0);
    expect(dm.status("t")[0]!.params).toBe("0 -");
    expect(poolStatus(dm)).toMatch(/ rw /);
    await t.write(0, pattern(2, BLOCK));
    await t.flush();
    expect((await t.read(0, BS)).equals(pattern(2, BLOCK))).toBe(true);
    expect(usedDataBlocks(dm)).toBe(1);
  });

  it("a failed zeroing of a new block for a partial write: EIO, nothing mapped", async () => {
    const { dm, data, t } = await setup();
    data.failNext((bio) => bio.op === "write-zeroes" || bio.op === "write");
    expect(await errorOf(t.write(8, pattern(3, 4096)))).toMatch(/EIO/);
    expect(usedDataBlocks(dm)).toBe(0);
    expect(dm.status("t")[0]!.params).toBe("0 -");
    expect(poolStatus(dm)).toMatch(/ rw /);
  });

  it("a failed data read fails the read only", async () => {
    const { dm, data, t } = await setup();
    await t.write(0, pattern(4, BLOCK));
    data.failNext((bio) => bio.op === "read");
    expect(await errorOf(t.read(0, BS))).toMatch(/EIO/);
    expect((await t.read(0, BS)).equals(pattern(4, BLOCK))).toBe(true);
    expect(poolStatus(dm)).toMatch(/ rw /);
  });

  it("a failed copy while breaking sharing fails the write; snapshot and origin keep their data", async () => {
    const { dm, data, t } = await setup();
    await t.write(0, pattern(5, BLOCK));
    await dm.suspend("t");
    await dm.message("pool", 0, "create_snap 2 1");
    await dm.resume("t");
    await dm.create("snap", { table: `0 ${16 * BS} thin /dev/mapper/pool 2` });
    const snap = dm.open("snap");
    data.failNext((bio) => bio.op === "read");
    expect(await errorOf(t.write(8, pattern(6, 4096)))).toMatch(/EIO/);
    expect(usedDataBlocks(dm)).toBe(1);
    expect((await t.read(0, BS)).equals(pattern(5, BLOCK))).toBe(true);
    expect((await snap.read(0, BS)).equals(pattern(5, BLOCK))).toBe(true);
    expect(poolStatus(dm)).toMatch(/ rw /);
  });
});

describe("thin pool: I/O errors on the metadata device", () => {
  it("a failed commit: EIO to the flush, needs_check on disk, read-only; committed data reads back", async () => {
    const { dm, meta, data, t } = await setup();
    await t.write(0, pattern(7, BLOCK));
    await t.flush();
    await t.write(BS, pattern(8, BLOCK)); // mapped in the transaction the failure aborts
    meta.failNext((bio) => bio.op === "write");
    expect(await errorOf(t.flush())).toMatch(/EIO/);
    expect(poolStatus(dm)).toMatch(/ ro .* needs_check /);
    // Read-only: the aborted mapping is gone, a mapped block is writable, a new one is refused.
    expect((await t.read(BS, BS)).every((x) => x === 0)).toBe(true);
    await t.write(0, pattern(9, BLOCK));
    expect((await t.read(0, BS)).equals(pattern(9, BLOCK))).toBe(true);
    expect(await errorOf(t.write(2 * BS, pattern(10, BLOCK)))).toMatch(/EIO/);
    expect(await errorOf(dm.message("pool", 0, "create_thin 3"))).not.toBe("ok");
    expect((await checkPoolMetadata(meta)).errors).toEqual([]);

    // Made again from the same devices: needs_check keeps it read-only; the data is there.
    await t.close();
    await dm.remove("t");
    await dm.remove("pool");
    const again = await setup(meta, data, false);
    expect(poolStatus(again.dm)).toMatch(/ ro .* needs_check /);
    expect((await again.t.read(0, BS)).equals(pattern(9, BLOCK))).toBe(true);
  });

  it("a metadata device that fails every write: the pool goes to Fail and every bio errors", async () => {
    const { dm, meta, t } = await setup();
    await t.write(0, pattern(11, BLOCK));
    await t.flush();
    meta.failNext((bio) => bio.op !== "read", "EIO", 1_000_000);
    await t.write(BS, pattern(12, BLOCK));
    expect(await errorOf(t.flush())).toMatch(/EIO/);
    expect(poolStatus(dm)).toBe("Fail");
    expect(dm.status("t")[0]!.params).toBe("Fail");
    expect(await errorOf(t.read(0, BS))).toMatch(/EIO/);
    expect(await errorOf(t.write(0, pattern(13, BLOCK)))).toMatch(/EIO/);
  });
});
