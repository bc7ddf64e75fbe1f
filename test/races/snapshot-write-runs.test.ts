/**
 * Snapshot writes over several whole chunks go to the COW device as runs (issue 17): while the
 * chunks have no exception and the store's next free COW chunks are consecutive, one write covers
 * them all and their exceptions share one group commit; each chunk still has its own pending
 * exception, committed in allocation order. A run ends at a chunk that already has an exception
 * (complete or pending) and at a metadata area; the COW image is the one per-chunk writes make.
 * Deterministic: copies and commits are held on ControlledDevices.
 *
 * Disable checks: mapping every write chunk by chunk again (no mapWriteRun) fails the I/O counts;
 * completing the write without waiting for every exception of its run (RunWrite) fails "not yet
 * complete before the commit"; a run that does not stop at a pending chunk writes over the chunk
 * the held copy is about to fill, and the snapshot then reads the origin's old data there.
 */
import { describe, expect, it } from "vitest";
import { BioFlags, SECTOR_SIZE } from "../../core/bio.js";
import type { SnapshotTarget } from "../../targets/snapshot/snapshot.js";
import {
  IDLE,
  type Rig,
  chunkOf,
  dataWrite,
  engineState,
  expectDone,
  metadataWrite,
  pattern,
  settleAll,
  snapshotRig,
  writesOf,
} from "../support/snapshot-rig.js";

const CS = 8; // sectors per chunk: 4 KiB, 256 exception records per metadata area
const CHUNK_BYTES = CS * SECTOR_SIZE;
const ORIGIN_CHUNKS = 320;

const rig = () => snapshotRig({ originSectors: ORIGIN_CHUNKS * CS, snaps: [{ name: "s", cs: CS }] });

/** The whole COW device. */
const cowImage = (r: Rig) => r.cows.s!.readSync(0, r.cows.s!.sizeSectors);

/** Write `data` to the snapshot at `chunk` one chunk per write, each waited for. */
async function writeChunkByChunk(r: Rig, chunk: number, data: Buffer): Promise<void> {
  for (let i = 0; i * CHUNK_BYTES < data.length; i++) {
    const rec = r.io.write(r.snaps.s!, (chunk + i) * CS, data.subarray(i * CHUNK_BYTES, (i + 1) * CHUNK_BYTES));
    expectDone([await rec.promise]);
  }
}

async function readSnapshot(r: Rig, chunk: number, chunks: number): Promise<Buffer> {
  const rec = r.io.read(r.snaps.s!, chunk * CS, chunks * CS);
  expectDone([await rec.promise]);
  return rec.data;
}

describe("snapshot writes as runs of chunks", () => {
  it("a write over whole free chunks is one COW write and one commit; the image is the per-chunk one", async () => {
    const data = pattern(7, 64 * CHUNK_BYTES);
    const runs = await rig();
    const cow = runs.cows.s!;
    const logFrom = cow.log.length;
    expectDone([await runs.io.write(runs.snaps.s!, 0, data).promise]);
    // Chunk 0 is the header, chunk 1 metadata area 0: data from chunk 2 on.
    expect(writesOf(cow, logFrom)).toEqual([`${2 * CS}+${64 * CS}`, `${CS}+${CS}`]);
    expect(cow.log.slice(logFrom).filter((b) => b.op === "write" && (b.flags & BioFlags.FUA) !== 0)).toHaveLength(1);
    expect((await readSnapshot(runs, 0, 64)).equals(data)).toBe(true);
    expect(engineState(runs.target("s"))).toEqual(IDLE);

    const chunks = await rig();
    await writeChunkByChunk(chunks, 0, data);
    expect(cowImage(runs).equals(cowImage(chunks))).toBe(true);
  });

  it("a run ends at a chunk with an exception and at a metadata area; each part is one write", async () => {
    const data = pattern(8, 300 * CHUNK_BYTES);
    const build = async () => {
      const r = await rig();
      // Chunk 5 gets its exception first (a partial write: copy, then write): COW chunk 2.
      expectDone([await r.io.write(r.snaps.s!, 5 * CS + 1, pattern(9, 1024)).promise]);
      return r;
    };
    const runs = await build();
    const cow = runs.cows.s!;
    const logFrom = cow.log.length;
    expectDone([await runs.io.write(runs.snaps.s!, 0, data).promise]);
    const dataWrites = cow.log
      .slice(logFrom)
      .filter((b) => b.op === "write" && b.flags === 0)
      .map((b) => `${b.sector}+${b.sectors}`);
    // Chunks 0-4 → COW 3-7; chunk 5 → its exception, COW 2; chunks 6-255 → COW 8-257, the rest of
    // area 0's data chunks; COW 258 is area 1; chunks 256-299 → COW 259-302.
    expect(dataWrites).toEqual([
      `${3 * CS}+${5 * CS}`,
      `${2 * CS}+${CS}`,
      `${8 * CS}+${250 * CS}`,
      `${259 * CS}+${44 * CS}`,
      `${258 * CS}+${CS}`, // area 1 zeroed when area 0 is sealed
    ]);
    expect((await readSnapshot(runs, 0, 300)).equals(data)).toBe(true);
    expect(engineState(runs.target("s"))).toEqual(IDLE);

    const chunks = await build();
    await writeChunkByChunk(chunks, 0, data);
    expect(cowImage(runs).equals(cowImage(chunks))).toBe(true);
  });

  it("a pending exception ends the run; the write to that chunk waits for its copy; the write completes after every commit", async () => {
    const r = await rig();
    const cow = r.cows.s!;
    const t = r.target<SnapshotTarget>("s");
    // An origin write to chunk 4 starts its copy; the copy's origin read is held.
    const copyRead = r.origin.hold((b) => b.op === "read");
    const originWrite = r.io.write(r.base, 4 * CS + 2, pattern(10, 512));
    await r.origin.waitForHeld(1);
    r.origin.stopHolding(copyRead);
    const commits = cow.hold(metadataWrite);

    const data = pattern(11, 8 * CHUNK_BYTES);
    const logFrom = cow.log.length;
    const write = r.io.write(r.snaps.s!, 0, data);
    await settleAll();
    // Chunk 4's exception (COW 2) came first; chunks 0-3 → COW 3-6, chunks 5-7 → COW 7-9, each run one
    // write; the write to chunk 4 waits on its exception.
    expect(writesOf(cow, logFrom)).toEqual([`${3 * CS}+${4 * CS}`, `${7 * CS}+${3 * CS}`]);
    expect([0, 1, 2, 3, 5, 6, 7].map((c) => t.pending.get(c)?.newChunk)).toEqual([3, 4, 5, 6, 7, 8, 9]);
    expect(write.completions).toBe(0);

    r.origin.releaseAll();
    await settleAll();
    // Copy done; every exception waits for the one commit, and so does the write.
    expect(write.completions).toBe(0);
    expect(originWrite.completions).toBe(0);
    expect(cow.held().length).toBeGreaterThan(0);
    cow.stopHolding(commits);
    cow.releaseAll();
    expectDone([await write.promise, await originWrite.promise]);

    expect((await readSnapshot(r, 0, 8)).equals(data)).toBe(true);
    const origin = await r.io.read(r.base, 4 * CS, CS).promise;
    const expected = Buffer.from(chunkOf(r.initial, CS, 4));
    pattern(10, 512).copy(expected, 2 * SECTOR_SIZE);
    expect(origin.data.equals(expected)).toBe(true);
    expect(engineState(t)).toEqual(IDLE);
  });

  it("an error writing a run fails the whole write and invalidates the snapshot", async () => {
    const r = await rig();
    r.cows.s!.failNext(dataWrite);
    const write = r.io.write(r.snaps.s!, 0, pattern(12, 16 * CHUNK_BYTES));
    expectDone([await write.promise], "EIO");
    expect(r.dm.status("s")[0]!.params).toBe("Invalid");
    expect(engineState(r.target("s"))).toEqual(IDLE);
  });

  it("a write from the middle of a chunk: the partial chunks are copied, the whole ones between are one run", async () => {
    const r = await rig();
    const cow = r.cows.s!;
    const logFrom = cow.log.length;
    // From the middle of chunk 0 to the middle of chunk 3.
    const data = pattern(13, 3 * CHUNK_BYTES);
    expectDone([await r.io.write(r.snaps.s!, CS / 2, data).promise]);
    const dataWrites = cow.log
      .slice(logFrom)
      .filter((b) => b.op === "write" && b.flags === 0)
      .map((b) => `${b.sector}+${b.sectors}`);
    // Chunk 0 → COW 2 (copy, then the partial write), chunks 1-2 → COW 3-4 (one write), chunk 3 → COW 5.
    expect(dataWrites.sort()).toEqual(
      [
        `${2 * CS}+${CS}`,
        `${2 * CS + CS / 2}+${CS / 2}`,
        `${3 * CS}+${2 * CS}`,
        `${5 * CS}+${CS}`,
        `${5 * CS}+${CS / 2}`,
      ].sort(),
    );
    const expected = Buffer.from(r.initial.subarray(0, 4 * CHUNK_BYTES));
    data.copy(expected, (CS / 2) * SECTOR_SIZE);
    expect((await readSnapshot(r, 0, 4)).equals(expected)).toBe(true);
    expect(engineState(r.target("s"))).toEqual(IDLE);
  });
});
