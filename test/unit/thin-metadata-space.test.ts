/**
 * A thin pool whose metadata device fills up (dm-thin.c: check_for_metadata_space,
 * set_pool_mode, metadata_operation_failed):
 *
 * - when only the metadata reserve is left, the pool commits and goes to out-of-metadata-space
 *   mode: read-only (`ro`, no needs_check), writes that need a block fail with EIO, mapped blocks
 *   stay writable, messages are refused; everything it acknowledged is committed (it reads back
 *   after the pool is taken down and made again), no data block is left allocated and unmapped,
 *   and growing the metadata device brings it back to write mode;
 * - when a change runs out of metadata blocks anyway (a tiny device whose reserve one commit
 *   outgrows), the transaction is aborted, needs_check is set on disk and the pool is read-only
 *   until repaired; flushed writes read back and the metadata stays consistent.
 *
 * Metadata is used up fast by snapshots: after each one, a write to each of four leaves of the
 * origin's mapping tree copies those leaves.
 */
import { describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../core/bio.js";
import { checkPoolMetadata } from "../../targets/thin/metadata/check.js";
import { ThinPoolMetadata } from "../../targets/thin/metadata/thin-metadata.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";

const BS = 128;
const DATA_BLOCKS = 2048;
/** One virtual block in each of the four leaves 1008 mappings fill (252 a leaf). */
const LEAVES = [0, 252, 504, 756];

const errorOf = (p: Promise<unknown>) =>
  p.then(
    () => "ok",
    (e: Error) => e.message,
  );

async function setup(metadataBlocks: number) {
  const { dm, backing } = testMapper();
  const meta = backing.memory("meta", metadataBlocks * 8);
  backing.memory("data", DATA_BLOCKS * BS);
  const poolTable = `0 ${DATA_BLOCKS * BS} thin-pool meta data ${BS} 0 1 skip_block_zeroing`;
  await dm.create("pool", { table: poolTable });
  await dm.message("pool", 0, "create_thin 1");
  await dm.create("t", { table: `0 ${1024 * BS} thin /dev/mapper/pool 1` });
  const t = dm.open("t");
  /** What each virtual block of the origin starts with (512 bytes written to each). */
  const model = new Map<number, Buffer>();
  const write = async (v: number, seed: number, flush = false) => {
    const data = pattern(seed, SECTOR_SIZE);
    await t.write(v * BS, data);
    if (flush) await t.flush();
    model.set(v, data);
  };
  for (let v = 0; v < 1008; v++) await write(v, v);
  await t.flush();
  /** Snapshots and writes to the four leaves until a write fails: its error. */
  const fill = async (opts: { flush?: boolean } = {}): Promise<string> => {
    for (let k = 2; k < 1000; k++) {
      await dm.suspend("t");
      await dm.message("pool", 0, `create_snap ${k} 1`);
      await dm.resume("t");
      for (const v of LEAVES) {
        const err = await errorOf(write(v, k * 1000 + v, opts.flush));
        if (err !== "ok") return err;
      }
    }
    throw new Error("the metadata never filled up");
  };
  const readsBack = async (handle = t) => {
    for (const [v, data] of model) {
      if (!(await handle.read(v * BS, 1)).equals(data)) return `block ${v} differs`;
    }
    return "ok";
  };
  return { dm, meta, t, poolTable, fill, readsBack };
}

const poolStatus = (dm: ReturnType<typeof testMapper>["dm"]) => dm.status("pool")[0]!.params;

describe("thin pool out of metadata space", () => {
  it("goes read-only with everything acknowledged committed, and back to write mode when the metadata device grows", async () => {
    const { dm, meta, t, poolTable, fill, readsBack } = await setup(256);
    // Another device with a block of its own: mapped, unshared, writable in any mode but fail.
    await dm.message("pool", 0, "create_thin 500");
    await dm.create("other", { table: `0 ${16 * BS} thin /dev/mapper/pool 500` });
    const other = dm.open("other");
    await other.write(0, pattern(1, 4096));

    expect(await fill()).toMatch(/EIO/);
    expect(poolStatus(dm)).toMatch(/^0 256\/256 \d+\/2048 - ro discard_passdown queue_if_no_space - 64 $/);
    expect(await readsBack()).toBe("ok");
    await other.write(0, pattern(2, 4096));
    expect((await other.read(0, 8)).equals(pattern(2, 4096))).toBe(true);
    expect(await errorOf(other.write(BS, pattern(3, 512)))).toMatch(/EIO/);
    expect(await errorOf(dm.message("pool", 0, "create_thin 999"))).toBe(
      "thin-pool: pool: unable to service pool target messages in READ_ONLY or FAIL mode",
    );
    // Everything is committed: no needs_check, the counts equal the references (no block leaked).
    expect((await checkPoolMetadata(meta)).errors).toEqual([]);

    // Take the devices down and make them again over the same files: the data is there.
    await other.close();
    await t.close();
    await dm.remove("other");
    await dm.remove("t");
    await dm.remove("pool");
    const reopened = await ThinPoolMetadata.open(meta, { dataBlockSize: BS });
    expect(reopened.needsCheck).toBe(false);
    await reopened.close();
    await dm.create("pool", { table: poolTable });
    await dm.create("t", { table: `0 ${1024 * BS} thin /dev/mapper/pool 1` });
    const again = dm.open("t");
    expect(await readsBack(again)).toBe("ok");

    // A bigger metadata device: write mode again, and the write that failed goes through.
    meta.resize(512 * 8);
    await dm.load("pool", poolTable);
    await dm.resume("pool");
    expect(poolStatus(dm)).toMatch(/^0 \d+\/512 \d+\/2048 - rw /);
    await again.write(0, pattern(4, 512));
    expect((await again.read(0, 1)).equals(pattern(4, 512))).toBe(true);
    expect((await checkPoolMetadata(meta)).errors).toEqual([]);
  });

  it("a change that outgrows the reserve: the transaction is aborted, needs_check is set and the pool stays read-only; flushed writes survive", async () => {
    const { dm, meta, fill, readsBack, poolTable } = await setup(64);
    expect(await fill({ flush: true })).toMatch(/EIO/);
    expect(poolStatus(dm)).toMatch(/ ro discard_passdown queue_if_no_space needs_check 16 $/);
    expect(await readsBack()).toBe("ok");
    // A reload cannot bring it back to write mode until it is repaired.
    await dm.load("pool", poolTable);
    await dm.resume("pool");
    expect(poolStatus(dm)).toMatch(/ ro discard_passdown queue_if_no_space needs_check 16 $/);
    const check = await checkPoolMetadata(meta);
    expect(check.errors).toEqual([]);
    const reopened = await ThinPoolMetadata.open(meta, { dataBlockSize: BS, readOnly: true });
    expect(reopened.needsCheck).toBe(true);
    await reopened.close();
  });
});
