/**
 * How FUA writes that provision blocks share commits (issue 19, "≤ 1 metadata flush per 32
 * provisioned blocks"). A FUA write to an unprovisioned block completes only after the commit
 * that makes its mapping durable; a commit about to start first lets in the FUA writes whose
 * blocks are being provisioned (their data I/O in flight), so one commit serves them all — as a
 * kernel worker pass commits once for the FUA bios it completed (dm-thin.c:
 * process_deferred_bios). Made deterministic by holding each provisioning write on a
 * controllable data device and releasing them one by one, turns of the event loop apart.
 *
 * Both devices model a volatile write cache: after the writes complete, a power cut (the durable
 * images only) must still show every one of them, since the provisioning data writes go out
 * without FUA (the commit flushes the data device before the superblock).
 */
import { describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../core/bio.js";
import { GATHER_MAX_MS } from "../../targets/thin/pool.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";
import { settle, settlesSoon } from "../support/event-loop.js";
import { FakeClock } from "../support/fake-clock.js";

const BS = 128;
const BLOCK = BS * SECTOR_SIZE;
const BLOCKS = 64;

async function setup(
  meta = new ControlledDevice(8 * 2048, { name: "meta", volatileCache: true }),
  data = new ControlledDevice(BLOCKS * BS, { name: "data", volatileCache: true }),
) {
  // A clock that stands still: the gather's time bound (pool.ts GATHER_MAX_MS) never cuts in,
  // however slowly a loaded machine runs the releases below.
  const { dm, backing } = testMapper({ clock: new FakeClock() });
  backing.add("meta", meta);
  backing.add("data", data);
  await dm.create("pool", { table: `0 ${BLOCKS * BS} thin-pool meta data ${BS} 0` });
  return { dm, meta, data };
}

async function freshThin() {
  const s = await setup();
  await s.dm.message("pool", 0, "create_thin 1");
  await s.dm.create("t", { table: `0 ${32 * BS} thin /dev/mapper/pool 1` });
  return { ...s, t: s.dm.open("t") };
}

/** Commits so far: the superblock goes out as the one FUA write of each. */
const commits = (meta: ControlledDevice) => meta.counters.fuaWrites;

describe("thin: FUA writes share commits", () => {
  it("FUA writes provisioning blocks at the same time complete after one commit, and survive a power cut", async () => {
    const { meta, data, t } = await freshThin();
    const before = commits(meta);
    const provisioning = data.hold((bio) => bio.op === "write");
    const committedAtCompletion: number[] = [];
    const writes = [0, 1, 2, 3].map((block) =>
      t.write(block * BS, pattern(40 + block, BLOCK), { fua: true }).then((bio) => {
        committedAtCompletion.push(commits(meta) - before);
        return bio.status;
      }),
    );
    const held = await data.waitForHeld(4);
    data.stopHolding(provisioning);
    // The data writes of a provisioning carry no FUA: the commit flushes the data device first.
    expect(held.map((io) => io.flags & 1)).toEqual([0, 0, 0, 0]);
    for (const io of held) {
      io.release();
      for (let i = 0; i < 5; i++) await settle();
    }
    expect(await Promise.all(writes)).toEqual(["ok", "ok", "ok", "ok"]);
    expect(commits(meta) - before).toBe(1);
    expect(committedAtCompletion).toEqual([1, 1, 1, 1]);

    // Power cut now: the durable metadata maps all four blocks to their durable data.
    const { dm: restored } = await setup(meta.crash(), data.crash());
    await restored.create("t", { table: `0 ${16 * BS} thin /dev/mapper/pool 1` });
    const t2 = restored.open("t");
    for (const block of [0, 1, 2, 3])
      expect((await t2.read(block * BS, BS)).equals(pattern(40 + block, BLOCK))).toBe(true);
  });

  // 32 blocks: more than the pool's worker runs at once (16), so those waiting for the commit
  // must not keep the worker from provisioning the rest.
  it("a FUA write over many blocks is committed once, however its blocks' data writes complete", async () => {
    const { meta, data, t } = await freshThin();
    const before = commits(meta);
    const provisioning = data.hold((bio) => bio.op === "write");
    const write = t.write(0, pattern(50, 32 * BLOCK), { fua: true });
    await data.waitForHeld(16);
    await settle();
    expect(data.held()).toHaveLength(16); // the worker's limit: the next block waits for a slot
    // Newest first, one at a time: each release lets the worker provision one more block.
    for (let released = 0; released < 32; released++) {
      const [io] = (await data.waitForHeld(1)).slice(-1);
      io!.release();
      await settle();
    }
    data.stopHolding(provisioning);
    expect((await write).status).toBe("ok");
    expect(data.held()).toEqual([]);
    expect(commits(meta) - before).toBe(1);
  });

  it("a commit waits for a FUA write being provisioned at most GATHER_MAX_MS, then goes ahead", async () => {
    const clock = new FakeClock();
    const { dm, backing } = testMapper({ clock });
    const meta = backing.add("meta", new ControlledDevice(8 * 2048, { name: "meta" }));
    const data = backing.add("data", new ControlledDevice(BLOCKS * BS, { name: "data" }));
    await dm.create("pool", { table: `0 ${BLOCKS * BS} thin-pool meta data ${BS} 0` });
    await dm.message("pool", 0, "create_thin 1");
    await dm.create("t", { table: `0 ${32 * BS} thin /dev/mapper/pool 1` });
    const t = dm.open("t");
    const provisioning = data.hold((bio) => bio.op === "write" && bio.sector < BS);
    const stuck = t.write(0, pattern(70, BLOCK), { fua: true });
    await data.waitForHeld(1);
    data.stopHolding(provisioning);
    const before = commits(meta);
    const other = t.write(BS, pattern(71, BLOCK), { fua: true });
    expect(await settlesSoon(other)).toBe(false); // its commit waits for the stuck write...
    clock.advance(GATHER_MAX_MS);
    expect(await settlesSoon(other)).toBe(true); // ...until the bound
    expect((await other).status).toBe("ok");
    expect(commits(meta) - before).toBe(1);
    data.releaseAll();
    expect((await stuck).status).toBe("ok");
  });

  it("a flush does not wait for a plain write being provisioned (only FUA writes are let in)", async () => {
    const { meta, data, t } = await freshThin();
    await t.write(0, pattern(60, BLOCK));
    const provisioning = data.hold((bio) => bio.op === "write");
    const plain = t.write(BS, pattern(61, BLOCK));
    await data.waitForHeld(1);
    data.stopHolding(provisioning);
    const before = commits(meta);
    const flush = t.flush();
    expect(await settlesSoon(flush)).toBe(true);
    await flush;
    expect(commits(meta) - before).toBe(1);
    data.releaseAll();
    expect((await plain).status).toBe("ok");
  });
});
