/**
 * The file device's write plug (core/devices/write-plug.ts): small buffered writes submitted in
 * one event-loop turn go to the file as one pwritev per run of writes that touch end to end,
 * short writes continue, a failed run fails every bio in it, and the bytes always land as if each
 * write had gone on its own.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import fc from "fast-check";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { BioFlags, readBio, submitAndWait, writeBio } from "../../core/bio.js";
import { FileDevice } from "../../core/devices/file-device.js";
import { pattern } from "../../testing/memory-backing.js";

const KiB = 1024;
let dir: string;
let file: string;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-write-plug-"));
  file = path.join(dir, "disk.img");
  fs.writeFileSync(file, "");
  fs.truncateSync(file, 1024 * KiB);
});
afterEach(() => {
  vi.restoreAllMocks();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Count fs.write and fs.writev calls (they still run). */
function countWrites(): { write: number; writev: number[] } {
  const counts = { write: 0, writev: [] as number[] };
  const realWrite = fs.write;
  const realWritev = fs.writev;
  vi.spyOn(fs, "write").mockImplementation(((...args: unknown[]) => {
    counts.write++;
    return (realWrite as (...a: unknown[]) => void)(...args);
  }) as typeof fs.write);
  vi.spyOn(fs, "writev").mockImplementation(((
    fd: number,
    bufs: Buffer[],
    pos: number,
    cb: (e: Error | null, n: number) => void,
  ) => {
    counts.writev.push(bufs.length);
    realWritev(fd, bufs, pos, cb);
  }) as typeof fs.writev);
  return counts;
}

describe("write plug", () => {
  it("merges writes of one turn that touch into one pwritev, and leaves the others alone", async () => {
    const dev = await FileDevice.open(file, { mode: "rw" });
    const counts = countWrites();
    // Submitted out of order, all in this turn: sectors 8..31 touch, sector 64 stands apart.
    await Promise.all([
      submitAndWait(dev, writeBio(16, pattern(2, 4 * KiB))),
      submitAndWait(dev, writeBio(8, pattern(1, 4 * KiB))),
      submitAndWait(dev, writeBio(64, pattern(4, 4 * KiB))),
      submitAndWait(dev, writeBio(24, pattern(3, 4 * KiB))),
    ]);
    expect(counts.writev).toEqual([3]);
    expect(counts.write).toBe(1);
    expect(dev.plugStats).toEqual({ jobs: 2, merged: 3 });
    const back = fs.readFileSync(file);
    for (const [sector, seed] of [
      [8, 1],
      [16, 2],
      [24, 3],
      [64, 4],
    ] as const) {
      expect(back.subarray(sector * 512, sector * 512 + 4 * KiB).equals(pattern(seed, 4 * KiB))).toBe(true);
    }
    await dev.close();
  });

  it("does not hold FUA writes, large writes, or writes of different turns", async () => {
    const dev = await FileDevice.open(file, { mode: "rw" });
    const counts = countWrites();
    await submitAndWait(dev, writeBio(0, pattern(1, 4 * KiB)));
    await submitAndWait(dev, writeBio(8, pattern(2, 4 * KiB)));
    await Promise.all([
      submitAndWait(dev, writeBio(16, pattern(3, 4 * KiB), BioFlags.FUA)),
      submitAndWait(dev, writeBio(24, pattern(4, 256 * KiB))),
    ]);
    expect(counts.writev).toEqual([]);
    expect(dev.plugStats?.merged).toBe(0);
    await dev.close();
  });

  it("is off with writePlug: false", async () => {
    const dev = await FileDevice.open(file, { mode: "rw", writePlug: false });
    const counts = countWrites();
    await Promise.all([
      submitAndWait(dev, writeBio(0, pattern(1, 4 * KiB))),
      submitAndWait(dev, writeBio(8, pattern(2, 4 * KiB))),
    ]);
    expect(dev.plugStats).toBeNull();
    expect(counts).toEqual({ write: 2, writev: [] });
    await dev.close();
  });

  it("continues a short pwritev where it stopped", async () => {
    const dev = await FileDevice.open(file, { mode: "rw" });
    const realWritev = fs.writev;
    const calls: number[] = [];
    // The first call writes 5 KiB of 12 (mid-buffer), later ones what they are given.
    vi.spyOn(fs, "writev").mockImplementation(((
      fd: number,
      bufs: Buffer[],
      pos: number,
      cb: (e: Error | null, n: number) => void,
    ) => {
      const total = bufs.reduce((n, b) => n + b.length, 0);
      calls.push(total);
      if (calls.length > 1) return realWritev(fd, bufs, pos, cb);
      const whole = Buffer.concat(bufs).subarray(0, 5 * KiB);
      realWritev(fd, [whole], pos, cb);
    }) as typeof fs.writev);
    await Promise.all([0, 8, 16].map((s, i) => submitAndWait(dev, writeBio(s, pattern(i + 1, 4 * KiB)))));
    expect(calls).toEqual([12 * KiB, 7 * KiB]);
    const back = fs.readFileSync(file);
    expect(back.subarray(0, 12 * KiB).equals(Buffer.concat([1, 2, 3].map((s) => pattern(s, 4 * KiB))))).toBe(true);
    await dev.close();
  });

  it("fails every bio of a failed run with the error, and only those", async () => {
    const dev = await FileDevice.open(file, { mode: "rw" });
    vi.spyOn(fs, "writev").mockImplementation(((
      _fd: number,
      _b: Buffer[],
      _p: number,
      cb: (e: Error | null, n: number) => void,
    ) => {
      setImmediate(() => cb(Object.assign(new Error("no space left on device"), { code: "ENOSPC" }), 0));
    }) as typeof fs.writev);
    const results = await Promise.all(
      [0, 8, 100].map((s) =>
        submitAndWait(dev, writeBio(s, pattern(1, 4 * KiB))).then(
          () => "ok",
          (e: { status: string }) => e.status,
        ),
      ),
    );
    expect(results).toEqual(["ENOSPC", "ENOSPC", "ok"]);
    await dev.close();
  });

  it("property: bursts of writes read back like the same writes done one by one", async () => {
    const SECTORS = 256;
    // One burst: writes to distinct, often adjacent, places (writes in flight together have no
    // order, so a burst never writes one sector twice).
    const burst = fc
      .uniqueArray(
        fc.record({
          start: fc.integer({ min: 0, max: SECTORS / 8 - 1 }),
          blocks: fc.integer({ min: 1, max: 3 }),
          seed: fc.integer({ min: 1, max: 250 }),
        }),
        { selector: (w) => w.start, maxLength: 12 },
      )
      .map((ws) => {
        const used = new Set<number>();
        return ws.filter((w) => {
          const blocks = Array.from({ length: w.blocks }, (_, i) => w.start + i).filter((b) => b < SECTORS / 8);
          if (blocks.some((b) => used.has(b))) return false;
          for (const b of blocks) used.add(b);
          w.blocks = blocks.length;
          return true;
        });
      });
    await fc.assert(
      fc.asyncProperty(fc.array(burst, { minLength: 1, maxLength: 6 }), async (bursts) => {
        fs.truncateSync(file, 0);
        fs.truncateSync(file, SECTORS * 512);
        const dev = await FileDevice.open(file, { mode: "rw" });
        const model = Buffer.alloc(SECTORS * 512);
        try {
          for (const ws of bursts) {
            await Promise.all(
              ws.map((w) => {
                const data = pattern(w.seed, w.blocks * 4 * KiB);
                data.copy(model, w.start * 4 * KiB);
                return submitAndWait(dev, writeBio(w.start * 8, data));
              }),
            );
          }
          const back = Buffer.alloc(SECTORS * 512);
          await submitAndWait(dev, readBio(0, back));
          expect(back.equals(model)).toBe(true);
        } finally {
          await dev.close();
        }
      }),
      { numRuns: 60 },
    );
  });
});
