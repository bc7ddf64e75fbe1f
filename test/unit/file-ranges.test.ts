/**
 * Zero-copy reads in the core: FileRangeRead on its own, and which clones of a mapped device's
 * read the file device may answer with ranges (targets that declare zeroCopyReads only; a
 * requeued read starts over).
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { Bio, type BioEndIo, MapResult, Target, target } from "../../index.js";
import { FileDevice } from "../../core/devices/file-device.js";
import { FileRangeRead, MAX_OPEN_RANGES, openRangeCount } from "../../core/file-ranges.js";
import { dupFd } from "../../core/sys/file.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";

const KiB = 1024;
const linuxX64 = process.platform === "linux" && process.arch === "x64";

let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-ranges-"));
});
afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

function isOpen(fd: number): boolean {
  try {
    fs.fstatSync(fd);
    return true;
  } catch {
    return false;
  }
}

describe.skipIf(!linuxX64)("FileRangeRead", () => {
  it("takes views of its buffer from the minimum length up, once per byte, and orders segments with the gaps", () => {
    const base = Buffer.alloc(512 * KiB);
    const r = new FileRangeRead(base, 64 * KiB, dupFd);
    const fd = fs.openSync(path.join(dir, "f"), "w+");
    expect(r.take(base.subarray(256 * KiB, 384 * KiB), fd, 4096)).toBe(true);
    expect(r.take(base.subarray(0, 64 * KiB), fd, 0)).toBe(true);
    expect(r.take(base.subarray(448 * KiB, 480 * KiB), fd, 0)).toBe(false); // below the minimum
    expect(r.take(Buffer.alloc(128 * KiB), fd, 0)).toBe(false); // not a view of the read's buffer
    expect(r.take(base.subarray(320 * KiB, 448 * KiB), fd, 0)).toBe(false); // overlaps a range
    const segments = r.segments();
    expect(
      segments.map((s) =>
        Buffer.isBuffer(s)
          ? `buf ${s.byteOffset - base.byteOffset}+${s.length}`
          : `file ${s.offset}+${s.length}@${s.position}`,
      ),
    ).toEqual([
      `file 0+${64 * KiB}@0`,
      `buf ${64 * KiB}+${192 * KiB}`,
      `file ${256 * KiB}+${128 * KiB}@4096`,
      `buf ${384 * KiB}+${128 * KiB}`,
    ]);
    // Each range holds its own descriptor: closing the device's does not end it; release does.
    const dups = r.ranges.map((x) => x.fd);
    fs.closeSync(fd);
    expect(dups.every(isOpen)).toBe(true);
    r.release();
    expect(r.ranges).toHaveLength(0);
    expect(dups.some(isOpen)).toBe(false);
  });
});

describe.skipIf(!linuxX64)("FileRangeRead descriptor budget", () => {
  it("holds at most MAX_OPEN_RANGES descriptors process-wide; past that, pieces are copied", () => {
    const fd = fs.openSync(path.join(dir, "f"), "w+");
    const reads = Array.from({ length: MAX_OPEN_RANGES + 8 }, () => new FileRangeRead(Buffer.alloc(4096), 4096, dupFd));
    const before = openRangeCount();
    const taken = reads.map((r) => r.take(r.base, fd, 0));
    expect(taken.filter(Boolean)).toHaveLength(MAX_OPEN_RANGES - before);
    expect(openRangeCount()).toBe(MAX_OPEN_RANGES);
    reads[0]!.release();
    expect(openRangeCount()).toBe(MAX_OPEN_RANGES - 1);
    expect(reads.at(-1)!.take(reads.at(-1)!.base, fd, 0)).toBe(true); // room again
    for (const r of reads) r.release();
    expect(openRangeCount()).toBe(before);
    fs.closeSync(fd);
  });
});

/**
 * Parks reads and pushes them back with REQUEUE on suspend (as in the noflush tests of
 * test/races/suspend-resume.test.ts), and promises zero-copy reads: its clones carry the ranges.
 */
@target({ name: "park-reads", version: [1, 0, 0] })
class ParkReadsTarget extends Target {
  parked: Bio[] = [];
  ctr(): void {
    this.zeroCopyReads = true;
  }
  map(bio: Bio): MapResult {
    this.parked.push(bio);
    return MapResult.SUBMITTED;
  }
  override presuspend(): void {
    for (const bio of this.parked.splice(0)) bio.complete("DM_REQUEUE");
  }
}

class Done implements BioEndIo {
  status: string | null = null;
  bioDone(bio: Bio): void {
    this.status = bio.status;
  }
}

describe.skipIf(!linuxX64)("zero-copy reads through a mapped device", () => {
  async function setup() {
    const { dm, backing } = testMapper();
    const content = pattern(4, 1024 * KiB);
    const file = path.join(dir, "data.img");
    fs.writeFileSync(file, content);
    backing.add("f", await FileDevice.open(file, { mode: "rw" }));
    backing.memory("m", 2048);
    return { dm, content };
  }

  function read(md: { submit(b: Bio): void }, sectors: number): { bio: Bio; ranges: FileRangeRead; done: Done } {
    const done = new Done();
    const bio = new Bio("read", 0, sectors, Buffer.alloc(sectors * 512), 0, done);
    const ranges = new FileRangeRead(bio.data, 64 * KiB, dupFd);
    bio.fileRanges = ranges;
    bio.submitTo(md);
    return { bio, ranges, done };
  }

  it("only clones of targets that declare zeroCopyReads become ranges; the rest is read into the buffer", async () => {
    const { dm, content } = await setup();
    // 128 KiB each: linear on the file | delay on the file (does not declare) | linear on memory | zero
    await dm.create("mix", { table: "0 256 linear f 0\n256 256 delay f 256 0\n512 256 linear m 0\n768 256 zero" });
    const { bio, ranges, done } = read(dm.device("mix"), 1024);
    await new Promise<void>((r) => setImmediate(r));
    await expect.poll(() => done.status).toBe("ok");
    expect(ranges.ranges.map((x) => [x.offset, x.length, x.position])).toEqual([[0, 128 * KiB, 0]]);
    expect(bio.data.subarray(128 * KiB, 256 * KiB).equals(content.subarray(128 * KiB, 256 * KiB))).toBe(true);
    expect(bio.data.subarray(0, 128 * KiB).every((b) => b === 0)).toBe(true); // not copied: sent from the file
    ranges.release();
    await dm.close();
  });

  it("a read requeued by a noflush suspend gives up the ranges of its first attempt and is mapped afresh", async () => {
    const { dm } = await setup();
    dm.registry.register(ParkReadsTarget);
    await dm.create("mp", { table: "0 256 linear f 0\n256 256 park-reads" });
    const md = dm.device("mp");
    const fds = () => fs.readdirSync("/proc/self/fd").length;
    const before = fds();
    const { ranges, done } = read(md, 512);
    expect(ranges.ranges).toHaveLength(1); // the linear half, taken at once; the other half parked
    await dm.load("mp", "0 512 linear f 0");
    await dm.resume("mp", { noflush: true });
    await expect.poll(() => done.status).toBe("ok");
    expect(fds()).toBe(before + 1); // the first attempt's descriptor is closed, the new range's open
    expect(ranges.ranges.map((x) => [x.offset, x.length, x.position])).toEqual([[0, 256 * KiB, 0]]);
    ranges.release();
    await dm.close();
  });

  it("a requeue inside a stacked device releases only that part's ranges; the rest of the outer read keeps its own", async () => {
    const { dm } = await setup();
    dm.registry.register(ParkReadsTarget);
    await dm.create("inner", { table: "0 256 park-reads" });
    await dm.create("outer", { table: "0 256 linear f 0\n256 256 linear /dev/mapper/inner 0" });
    const { ranges, done } = read(dm.device("outer"), 512);
    expect(ranges.ranges.map((x) => x.offset)).toEqual([0]); // the first half; the second is parked
    await dm.load("inner", "0 256 linear f 256");
    await dm.resume("inner", { noflush: true });
    await expect.poll(() => done.status).toBe("ok");
    // Releasing every range here would leave the first half neither sent from the file nor read.
    expect(ranges.ranges.map((x) => [x.offset, x.length, x.position]).sort((a, b) => a[0]! - b[0]!)).toEqual([
      [0, 128 * KiB, 0],
      [128 * KiB, 128 * KiB, 128 * KiB],
    ]);
    ranges.release();
    expect(ranges.ranges).toHaveLength(0);
    await dm.close();
  });
});
