/**
 * Snapshot reads spanning chunks are mapped as runs (issue 17): one I/O per run of chunks with the
 * same destination (the origin, or consecutive COW chunks), not one per chunk. A run read from the
 * origin is tracked on every chunk it covers, so an origin write to any of them waits for it (R4
 * for runs). Deterministic: the run's origin read is held on a ControlledDevice.
 *
 * Disable checks: tracking only the run's first chunk lets the origin write to its third chunk
 * through while the read is held (the "origin write waits" assertion fails, and the read returns
 * the new data); mapping every chunk on its own again (maxIoLen = chunk size) fails the I/O counts.
 */
import { describe, expect, it } from "vitest";
import type { Bio } from "../../core/bio.js";
import type { SnapshotTarget } from "../../targets/snapshot/snapshot.js";
import {
  chunkOf,
  engineState,
  expectDone,
  pattern,
  settleAll,
  snapshotRig,
  writesOf,
} from "../support/snapshot-rig.js";

const CS = 8; // sectors per chunk
const CHUNK_BYTES = CS * 512;

describe("snapshot reads as runs of chunks", () => {
  it("a read over un-copied chunks is one origin read; reads over mixed chunks are one I/O per run", async () => {
    const r = await snapshotRig({ originSectors: 64 * CS, snaps: [{ name: "s", cs: CS }] });
    const originReads = () => r.origin.log.filter((b) => b.op === "read").map((b) => [b.sector, b.sectors]);
    const cowReads = () => r.cows.s!.log.filter((b) => b.op === "read").map((b) => [b.sector, b.sectors]);

    const whole = r.io.read(r.snaps.s!, 0, 8 * CS);
    expectDone([await whole.promise]);
    expect(whole.data.equals(r.initial.subarray(0, 8 * CHUNK_BYTES))).toBe(true);
    expect(originReads()).toEqual([[0, 8 * CS]]);

    // Snapshot writes to chunks 2 and 3 (whole chunks: no copy) get consecutive COW chunks.
    const two = r.io.write(r.snaps.s!, 2 * CS, pattern(2, CHUNK_BYTES));
    const three = r.io.write(r.snaps.s!, 3 * CS, pattern(3, CHUNK_BYTES));
    expectDone([await two.promise, await three.promise]);
    const t = r.target<SnapshotTarget>("s");
    const cow2 = t.complete.lookup(2);
    expect(t.complete.lookup(3)).toBe(cow2 + 1);
    r.origin.log.length = 0;
    r.cows.s!.log.length = 0;

    // Chunks 0-1 origin, 2-3 COW, 4-5 origin, from the middle of chunk 0 to the middle of chunk 5.
    const mixed = r.io.read(r.snaps.s!, 4, 5 * CS);
    expectDone([await mixed.promise]);
    const expected = Buffer.concat([
      r.initial.subarray(4 * 512, 2 * CHUNK_BYTES),
      pattern(2, CHUNK_BYTES),
      pattern(3, CHUNK_BYTES),
      r.initial.subarray(4 * CHUNK_BYTES, 5 * CHUNK_BYTES + 4 * 512),
    ]);
    expect(mixed.data.equals(expected)).toBe(true);
    expect(originReads()).toEqual([
      [4, 2 * CS - 4],
      [4 * CS, CS + 4],
    ]);
    expect(cowReads()).toEqual([[cow2 * CS, 2 * CS]]);
    expect(engineState(t).tracked).toBe(0);
  });

  it("a run read held at the origin is tracked on every chunk: an origin write to its third chunk waits for it", async () => {
    const r = await snapshotRig({ originSectors: 64 * CS, snaps: [{ name: "s", cs: CS }] });
    const t = r.target<SnapshotTarget>("s");
    const runRead = (b: Bio) => b.op === "read" && b.sectors === 4 * CS;
    r.origin.hold(runRead);
    const read = r.io.read(r.snaps.s!, 0, 4 * CS);
    const [held] = await r.origin.waitForHeld(1);
    expect([0, 1, 2, 3].map((c) => t.tracked.isTracked(c))).toEqual([true, true, true, true]);

    const originLog = r.origin.log.length;
    const write = r.io.write(r.base, 2 * CS, pattern(9, CHUNK_BYTES));
    await settleAll();
    // The chunk is copied and committed, but the origin write waits for the held read.
    expect(write.completions).toBe(0);
    expect(writesOf(r.origin, originLog)).toEqual([]);

    held!.release();
    expectDone([await read.promise, await write.promise]);
    expect(read.data.equals(r.initial.subarray(0, 4 * CHUNK_BYTES))).toBe(true);
    expect(chunkOf(r.origin.readSync(0, 64 * CS), CS, 2).equals(pattern(9, CHUNK_BYTES))).toBe(true);
    // The snapshot still shows the old chunk 2, now from the COW device.
    const again = r.io.read(r.snaps.s!, 2 * CS, CS);
    expectDone([await again.promise]);
    expect(again.data.equals(chunkOf(r.initial, CS, 2))).toBe(true);
    expect(engineState(t).tracked).toBe(0);
  });
});
