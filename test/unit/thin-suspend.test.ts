/**
 * Suspending a thin pool suspends its thin devices first, as the kernel's pool_presuspend does
 * (pool_suspend_active_thins: dm_internal_suspend_noflush of each), and its resume resumes them.
 * The suspend is a noflush one: what waits in a thin device (for data space, in the worker's
 * queue) is pushed back to that device's queue (thin_presuspend, requeue_io) and mapped again after
 * the resume, so a pool out of space can be suspended, grown and resumed. A user's noflush
 * suspend of a thin device does the same.
 */
import { describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../core/bio.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";
import { settle, settlesSoon } from "../support/event-loop.js";

const BS = 128;
const BLOCK = BS * SECTOR_SIZE;

/** A pool of 64 data blocks on a controllable device, or of `dataBlocks` on a RAM disk that can grow. */
async function setup(dataBlocks?: number) {
  const { dm, backing } = testMapper();
  backing.memory("meta", 8 * 2048);
  const blocks = dataBlocks ?? 64;
  const controlled = dataBlocks === undefined ? new ControlledDevice(blocks * BS, { name: "data" }) : null;
  const ram = controlled ? null : backing.memory("data", blocks * BS);
  if (controlled) backing.add("data", controlled);
  await dm.create("pool", { table: `0 ${blocks * BS} thin-pool meta data ${BS} 0` });
  await dm.message("pool", 0, "create_thin 1");
  await dm.create("t", { table: `0 ${16 * BS} thin /dev/mapper/pool 1` });
  return { dm, data: controlled!, ram: ram!, t: dm.open("t") };
}

const usedBlocks = (dm: Awaited<ReturnType<typeof setup>>["dm"]) =>
  Number(/^\d+ \d+\/\d+ (\d+)\//.exec(dm.status("pool")[0]!.params)![1]);

describe("suspending a thin pool", () => {
  it("suspends its thin devices: a write waits in the thin device's queue, nothing is provisioned until the pool resumes", async () => {
    const { dm, t } = await setup();
    await dm.suspend("pool");
    const md = dm.device("t");
    let written = false;
    const write = t.write(0, pattern(1, 4096)).then(() => (written = true));
    await settle();
    expect(written).toBe(false);
    expect(md.queued).toBe(1);
    expect(md.inFlight).toBe(0);
    expect(usedBlocks(dm)).toBe(0);
    await dm.resume("pool");
    await write;
    expect(usedBlocks(dm)).toBe(1);
    expect((await t.read(0, 8)).equals(pattern(1, 4096))).toBe(true);
  });

  it("waits for the thin devices' I/O in flight before it completes", async () => {
    const { dm, data, t } = await setup();
    const zeroing = data.hold((bio) => bio.op === "write-zeroes");
    const write = t.write(0, pattern(2, 4096));
    await data.waitForHeld(1);
    const suspend = dm.suspend("pool");
    expect(await settlesSoon(suspend)).toBe(false);
    // The thin device blocks new I/O already.
    let second = false;
    const other = t.write(4 * BS, pattern(3, 4096)).then(() => (second = true));
    data.stopHolding(zeroing);
    data.releaseAll();
    await write;
    await suspend;
    expect(second).toBe(false);
    expect(dm.device("t").queued).toBe(1);
    expect(usedBlocks(dm)).toBe(1);
    await dm.resume("pool");
    await other;
    expect(usedBlocks(dm)).toBe(2);
  });

  it("out of data space: the write waiting for space goes back to the thin device's queue, and is mapped after the pool grows", async () => {
    const { dm, ram, t } = await setup(2);
    await t.write(0, pattern(4, 2 * BLOCK));
    let written = false;
    const waiting = t.write(2 * BS, pattern(5, BLOCK)).then(() => (written = true));
    await settle();
    expect(written).toBe(false);
    expect(dm.status("pool")[0]!.params).toMatch(/ 2\/2 - out_of_data_space /);
    const md = dm.device("t");
    expect(md.inFlight).toBe(1);
    // The suspend does not wait for space: the write is pushed back, not drained.
    expect(await settlesSoon(dm.suspend("pool"))).toBe(true);
    expect(md.inFlight).toBe(0);
    expect(md.queued).toBe(1);
    expect(written).toBe(false);
    ram.resize(8 * BS);
    await dm.load("pool", `0 ${8 * BS} thin-pool meta data ${BS} 0`);
    await dm.resume("pool");
    await waiting;
    expect((await t.read(2 * BS, BS)).equals(pattern(5, BLOCK))).toBe(true);
    expect(dm.status("pool")[0]!.params).toMatch(/ 3\/8 - rw /);
  });

  it("a noflush suspend of a thin device while a write waits for space completes; the write goes again at its resume", async () => {
    const { dm, ram, t } = await setup(2);
    await t.write(0, pattern(6, 2 * BLOCK));
    const waiting = t.write(2 * BS, pattern(7, 4096));
    await settle();
    expect(await settlesSoon(dm.suspend("t", { noflush: true }))).toBe(true);
    expect(dm.device("t").queued).toBe(1);
    ram.resize(4 * BS);
    await dm.load("pool", `0 ${4 * BS} thin-pool meta data ${BS} 0`);
    await dm.resume("pool");
    // Still suspended by the user: the pool's resume does not resume it.
    expect(dm.device("t").queued).toBe(1);
    await dm.resume("t");
    await waiting;
    expect((await t.read(2 * BS, 8)).equals(pattern(7, 4096))).toBe(true);
  });
});
