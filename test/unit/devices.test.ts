import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { createDeviceMapper } from "../../index.js";
import {
  Bio,
  BioFlags,
  discardBio,
  flushBio,
  readBio,
  submitAndWait,
  writeBio,
  writeZeroesBio,
} from "../../core/bio.js";
import type { BlockDevice, OpenOptions } from "../../core/devices/block-device.js";
import { alignedBuffer } from "../../core/devices/fd-device.js";
import { FileDevice } from "../../core/devices/file-device.js";
import { readCached } from "../../core/devices/inline-io.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { openBackingDevice } from "../../core/devices/open-device.js";
import { traceFsWrites } from "../support/fs-trace.js";
import { blkGetSize64 } from "../../core/sys/block.js";
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE, bufferAddress, fallocate } from "../../core/sys/file.js";
import { libcFunction } from "../../core/sys/libc.js";

const MiB = 1 << 20;

function pattern(bytes: number, seed: number): Buffer {
  const buf = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i++) buf[i] = (i * 31 + seed * 7 + 1) & 0xff || 1;
  return buf;
}

async function read(dev: BlockDevice, sector: number, sectors: number): Promise<Buffer> {
  const buf = Buffer.alloc(sectors * 512, 0xee);
  await submitAndWait(dev, readBio(sector, buf));
  return buf;
}

async function failsWith(dev: BlockDevice, bio: Bio): Promise<string> {
  const err = await submitAndWait(dev, bio).then(
    () => null,
    (e: { status: string }) => e,
  );
  expect(err, "bio should have failed").not.toBeNull();
  return err!.status;
}

/** Buffer comparison that stays fast on megabytes (toEqual walks them generically). */
function expectBytes(actual: Buffer, expected: Buffer): void {
  if (actual.equals(expected)) return;
  let i = 0;
  while (i < Math.min(actual.length, expected.length) && actual[i] === expected[i]) i++;
  expect.fail(`buffers differ (lengths ${actual.length}/${expected.length}) first at byte ${i}`);
}

function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

let tmp: string;
const opened: BlockDevice[] = [];

beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), "udm-devices-"));
});
afterEach(async () => {
  await Promise.all(opened.splice(0).map((d) => d.close()));
  vi.restoreAllMocks();
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

let fileCounter = 0;
/** A sparse file of `size` bytes in `dir`, removed with the directory. */
function sparseFile(size: number, dir = tmp): string {
  const file = path.join(dir, `disk-${process.pid}-${fileCounter++}.img`);
  fs.writeFileSync(file, "");
  fs.truncateSync(file, size);
  return file;
}

async function openFile(file: string, opts: OpenOptions): Promise<FileDevice> {
  const dev = await FileDevice.open(file, opts);
  opened.push(dev);
  return dev;
}

describe("FileDevice", () => {
  it("describes itself by absolute path and size", async () => {
    const file = sparseFile(MiB + 1000);
    const rel = path.relative(process.cwd(), file);
    const dev = await openFile(rel, { mode: "rw" });
    expect(dev.tableName).toBe(file);
    expect(dev.displayName).toBe(file);
    expect(dev.sizeSectors).toBe(2048 + 1);
    expect(dev.logicalBlockSize).toBe(512);
    expect(dev.readOnly).toBe(false);
    expect(dev.devno).toBeUndefined();
  });

  it("writes and reads back, matching the file contents", async () => {
    const file = sparseFile(MiB);
    const dev = await openFile(file, { mode: "rw" });
    const data = pattern(8192 + 512, 1);
    await submitAndWait(dev, writeBio(3, data));
    expectBytes(await read(dev, 3, data.length / 512), data);
    expectBytes(fs.readFileSync(file).subarray(3 * 512, 3 * 512 + data.length), data);
    // Untouched sectors of a sparse file read as zeros.
    expectBytes(await read(dev, 0, 3), Buffer.alloc(3 * 512));
  });

  it("uses only the first sectors*512 bytes of a larger buffer", async () => {
    const dev = await openFile(sparseFile(64 * 512), { mode: "rw" });
    const big = pattern(4096, 2);
    await submitAndWait(dev, new Bio("write", 0, 2, big, 0, null));
    const back = Buffer.alloc(4096, 0xaa);
    await submitAndWait(dev, new Bio("read", 0, 2, back, 0, null));
    expectBytes(back.subarray(0, 1024), big.subarray(0, 1024));
    expectBytes(back.subarray(1024), Buffer.alloc(3072, 0xaa));
  });

  it("flushes: flush op, PREFLUSH before the write, FUA after it", async () => {
    const dev = await openFile(sparseFile(MiB), { mode: "rw" });
    const order: string[] = [];
    const sync = vi.spyOn(fs, "fdatasync").mockImplementation(((_fd: number, cb: (e: Error | null) => void) => {
      order.push("sync");
      cb(null);
    }) as typeof fs.fdatasync);
    traceFsWrites(order);

    await submitAndWait(dev, flushBio());
    expect(order).toEqual(["sync"]);

    order.length = 0;
    await submitAndWait(dev, writeBio(0, pattern(512, 3), BioFlags.PREFLUSH));
    expect(order).toEqual(["sync", "write"]);

    // FUA: the write itself is durable (pwritev2 RWF_DSYNC on a worker thread; the syscalls are
    // checked under strace in test/integration/fua-syscalls.test.ts): no fs.write, no fdatasync.
    order.length = 0;
    await submitAndWait(dev, writeBio(0, pattern(512, 4), BioFlags.FUA));
    expect(order).toEqual([]);
    expectBytes(fs.readFileSync(dev.tableName).subarray(0, 512), pattern(512, 4));

    order.length = 0;
    await submitAndWait(dev, writeBio(1, pattern(1024, 5), BioFlags.PREFLUSH | BioFlags.FUA));
    expect(order).toEqual(["sync"]);
    expectBytes(fs.readFileSync(dev.tableName).subarray(512, 1536), pattern(1024, 5));

    order.length = 0;
    await submitAndWait(dev, writeBio(0, pattern(512, 6)));
    expect(order).toEqual(["write"]);
    expect(sync).toHaveBeenCalledTimes(3);
  });

  it("really syncs (flush and FUA succeed against the real fdatasync)", async () => {
    const dev = await openFile(sparseFile(MiB), { mode: "rw" });
    await submitAndWait(dev, writeBio(8, pattern(4096, 7), BioFlags.PREFLUSH | BioFlags.FUA));
    await submitAndWait(dev, flushBio());
  });

  it("discard punches a hole: allocated blocks drop and the range reads as zeros", async () => {
    const file = sparseFile(4 * MiB);
    const dev = await openFile(file, { mode: "rw" });
    await submitAndWait(dev, writeBio(0, pattern(4 * MiB, 8), BioFlags.FUA));
    const before = allocatedBytes(file);
    expect(before).toBeGreaterThanOrEqual(4 * MiB);

    await submitAndWait(dev, discardBio(2048, 4096)); // bytes 1 MiB .. 3 MiB
    expect(before - allocatedBytes(file)).toBeGreaterThanOrEqual(2 * MiB);
    expect(fs.statSync(file).size).toBe(4 * MiB); // KEEP_SIZE
    expectBytes(await read(dev, 2048, 4096), Buffer.alloc(2 * MiB));
    expectBytes(await read(dev, 0, 2048), pattern(4 * MiB, 8).subarray(0, MiB));
  });

  it("write-zeroes punches by default and allocates with NOUNMAP", async () => {
    const file = sparseFile(4 * MiB);
    const dev = await openFile(file, { mode: "rw" });
    const data = pattern(4 * MiB, 9);
    await submitAndWait(dev, writeBio(0, data, BioFlags.FUA));
    const before = allocatedBytes(file);

    await submitAndWait(dev, writeZeroesBio(0, 2048));
    expect(before - allocatedBytes(file)).toBeGreaterThanOrEqual(MiB);
    expectBytes(await read(dev, 0, 2048), Buffer.alloc(MiB));

    const mid = allocatedBytes(file);
    await submitAndWait(dev, writeZeroesBio(2048, 2048, BioFlags.NOUNMAP));
    expect(allocatedBytes(file)).toBeGreaterThanOrEqual(mid); // nothing deallocated
    expectBytes(await read(dev, 2048, 2048), Buffer.alloc(MiB));
    expectBytes(await read(dev, 4096, 4096), data.subarray(2 * MiB));
  });

  it("write-zeroes falls back to writing zeros when fallocate says EOPNOTSUPP", async (ctx) => {
    // tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: the natural EOPNOTSUPP.
    const shm = "/dev/shm";
    let dir: string | null = null;
    try {
      dir = fs.mkdtempSync(path.join(shm, "udm-devices-"));
      const probe = fs.openSync(path.join(dir, "probe"), "w+");
      fs.ftruncateSync(probe, 4096);
      try {
        fallocate(probe, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096);
        dir = null; // ZERO_RANGE works there: no natural EOPNOTSUPP
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EOPNOTSUPP") throw err;
      } finally {
        fs.closeSync(probe);
      }
    } catch {
      dir = null;
    }
    if (!dir) {
      console.warn("skipping write-zeroes fallback test: no filesystem without FALLOC_FL_ZERO_RANGE found");
      ctx.skip();
      return;
    }
    try {
      const dev = await openFile(sparseFile(2 * MiB + 4096, dir), { mode: "rw" });
      await submitAndWait(dev, writeBio(0, pattern(2 * MiB + 4096, 10)));
      await submitAndWait(dev, writeZeroesBio(1, (2 * MiB) / 512, BioFlags.NOUNMAP));
      const back = await read(dev, 0, (2 * MiB + 4096) / 512);
      expectBytes(back.subarray(512, 512 + 2 * MiB), Buffer.alloc(2 * MiB));
      expectBytes(back.subarray(0, 512), pattern(512, 10));
      expectBytes(back.subarray(512 + 2 * MiB), pattern(2 * MiB + 4096, 10).subarray(512 + 2 * MiB));
    } finally {
      await Promise.all(opened.splice(0).map((d) => d.close()));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("reads past end-of-file as zeros after the file shrinks", async () => {
    const file = sparseFile(4096);
    fs.writeFileSync(file, pattern(4096, 11));
    const dev = await openFile(file, { mode: "rw" });
    fs.truncateSync(file, 1000);
    const back = await read(dev, 0, 8);
    expectBytes(back.subarray(0, 1000), pattern(1000, 11));
    expectBytes(back.subarray(1000), Buffer.alloc(4096 - 1000));
    expect(await dev.refreshSize()).toBe(1);
    expect(dev.sizeSectors).toBe(1);
    expect(await failsWith(dev, readBio(0, Buffer.alloc(1024)))).toBe("EIO");
  });

  it("refreshSize picks up growth", async () => {
    const file = sparseFile(MiB);
    const dev = await openFile(file, { mode: "rw" });
    fs.truncateSync(file, 2 * MiB);
    expect(dev.sizeSectors).toBe(2048);
    expect(await dev.refreshSize()).toBe(4096);
    await submitAndWait(dev, writeBio(4095, pattern(512, 12)));
  });

  it("a read-only device fails every modification with EPERM", async () => {
    const file = sparseFile(MiB);
    fs.writeFileSync(file, pattern(MiB, 13));
    const dev = await openFile(file, { mode: "r" });
    expect(dev.readOnly).toBe(true);
    expect(await failsWith(dev, writeBio(0, pattern(512, 14)))).toBe("EPERM");
    expect(await failsWith(dev, discardBio(0, 8))).toBe("EPERM");
    expect(await failsWith(dev, writeZeroesBio(0, 8))).toBe("EPERM");
    expectBytes(await read(dev, 0, 2048), pattern(MiB, 13));
    await submitAndWait(dev, flushBio());
  });

  it("I/O beyond the end fails with EIO", async () => {
    const dev = await openFile(sparseFile(MiB), { mode: "rw" });
    expect(await failsWith(dev, readBio(2047, Buffer.alloc(1024)))).toBe("EIO");
    expect(await failsWith(dev, writeBio(2048, pattern(512, 15)))).toBe("EIO");
    expect(await failsWith(dev, discardBio(2000, 100))).toBe("EIO");
    expect(await failsWith(dev, writeZeroesBio(4096, 1))).toBe("EIO");
    await submitAndWait(dev, readBio(2047, Buffer.alloc(512)));
  });

  it("rejects a data buffer shorter than the bio with EINVAL", async () => {
    const dev = await openFile(sparseFile(MiB), { mode: "rw" });
    expect(await failsWith(dev, new Bio("write", 0, 4, Buffer.alloc(512), 0, null))).toBe("EINVAL");
  });

  it("fails bios after close with ENXIO", async () => {
    const dev = await FileDevice.open(sparseFile(MiB), { mode: "rw" });
    await dev.close();
    await dev.close(); // idempotent
    expect(await failsWith(dev, readBio(0, Buffer.alloc(512)))).toBe("ENXIO");
  });

  it("runs many concurrent discards and writes (beyond koffi's async call limit)", async () => {
    const file = sparseFile(4 * MiB);
    const dev = await openFile(file, { mode: "rw" });
    await submitAndWait(dev, writeBio(0, pattern(4 * MiB, 16)));
    const ops: Promise<Bio>[] = [];
    for (let i = 0; i < 512; i++) ops.push(submitAndWait(dev, discardBio(i * 8, 8)));
    for (let i = 512; i < 1024; i++) ops.push(submitAndWait(dev, writeBio(i * 8, pattern(4096, i))));
    await Promise.all(ops);
    expectBytes(await read(dev, 0, 512 * 8), Buffer.alloc(2 * MiB));
    expectBytes(await read(dev, 1000 * 8, 8), pattern(4096, 1000));
  });

  it("rejects opening something that is not a regular file", async () => {
    await expect(FileDevice.open(tmp, { mode: "r" })).rejects.toMatchObject({ code: expect.any(String) });
  });
});

/** Drop a file's clean pages from the page cache (POSIX_FADV_DONTNEED), so reads must go to disk. */
function evictFromPageCache(file: string): void {
  const fadvise = libcFunction("posix_fadvise", "int", ["int", "int64_t", "int64_t", "int"]);
  const fd = fs.openSync(file, "r");
  try {
    fs.fdatasyncSync(fd);
    expect(fadvise(fd, 0, 0, 4 /* POSIX_FADV_DONTNEED */)).toBe(0);
  } finally {
    fs.closeSync(fd);
  }
}

describe("FileDevice inline page-cache reads", () => {
  it("readCached reads cached bytes into a view at any offset, and nothing that is not cached", () => {
    const file = sparseFile(64 * 1024);
    const data = pattern(64 * 1024, 9);
    fs.writeFileSync(file, data);
    const fd = fs.openSync(file, "r");
    try {
      const outer = Buffer.alloc(8192 + 14, 0xee);
      const view = outer.subarray(7, 7 + 8192);
      expect(readCached(fd, view, 4096)).toBe(8192);
      expectBytes(view, data.subarray(4096, 4096 + 8192));
      expectBytes(outer.subarray(0, 7), Buffer.alloc(7, 0xee));
      expectBytes(outer.subarray(7 + 8192), Buffer.alloc(7, 0xee));
      // At the end of the file: a short count, never more than is there.
      expect(readCached(fd, Buffer.alloc(8192), 60 * 1024)).toBe(4096);
    } finally {
      fs.closeSync(fd);
    }
    // A file never read (so no readahead of it can still be landing) and then evicted: nothing
    // cached, and RWF_NOWAIT answers EAGAIN (0 here) instead of waiting for the disk.
    const cold = sparseFile(64 * 1024);
    fs.writeFileSync(cold, data);
    evictFromPageCache(cold);
    const coldFd = fs.openSync(cold, "r");
    try {
      expect(readCached(coldFd, Buffer.alloc(4096), 32 * 1024)).toBe(0);
    } finally {
      fs.closeSync(coldFd);
    }
  });

  it.each([true, false])("reads the same bytes whether cached or not (inline reads %s)", async (inlineReads) => {
    const file = sparseFile(MiB);
    const data = pattern(MiB, 10);
    fs.writeFileSync(file, data);
    const dev = await openFile(file, { mode: "rw", inlineReads });
    // Cached: straight after writing. A small read goes to the pool only with inline reads off.
    const poolReads = vi.spyOn(fs, "read");
    expectBytes(await read(dev, 8, 8), data.subarray(8 * 512, 16 * 512));
    expect(poolReads).toHaveBeenCalledTimes(inlineReads ? 0 : 1);
    poolReads.mockRestore();
    expectBytes(await read(dev, 5, 300), data.subarray(5 * 512, 305 * 512));
    // Partly cached: the first half is read again into the page cache, the rest is not.
    evictFromPageCache(file);
    const fd = fs.openSync(file, "r");
    fs.readSync(fd, Buffer.alloc(256 * 1024), 0, 256 * 1024, 0);
    fs.closeSync(fd);
    expectBytes(await read(dev, 0, 2048), data);
    // Writes through the device are seen by later inline reads.
    const fresh = pattern(4096, 11);
    await submitAndWait(dev, writeBio(100, fresh));
    expectBytes(await read(dev, 100, 8), fresh);
  });
});

describe("FileDevice with O_DIRECT", () => {
  /** First candidate directory whose filesystem accepts an O_DIRECT open and aligned write. */
  function findDirectDir(): string | null {
    const candidates = [process.env.UDM_DIRECT_DIR, "/var/tmp", os.tmpdir(), process.cwd()];
    for (const dir of candidates) {
      if (!dir || !fs.existsSync(dir)) continue;
      const probe = path.join(dir, `.udm-direct-probe-${process.pid}`);
      try {
        const fd = fs.openSync(probe, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_DIRECT);
        try {
          fs.writeSync(fd, alignedBuffer(4096).fill(1), 0, 4096, 0);
          return dir;
        } finally {
          fs.closeSync(fd);
        }
      } catch {
        // Not this one.
      } finally {
        fs.rmSync(probe, { force: true });
      }
    }
    return null;
  }

  const directDir = findDirectDir();
  if (!directDir) console.warn("skipping O_DIRECT tests: no candidate directory supports O_DIRECT");
  let dir: string;
  beforeAll(() => {
    if (directDir) dir = fs.mkdtempSync(path.join(directDir, "udm-direct-"));
  });
  afterAll(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it("alignedBuffer returns 4 KiB-aligned memory of the requested size", () => {
    for (const size of [512, 4096, 12345 * 512]) {
      const buf = alignedBuffer(size);
      expect(buf.length).toBe(size);
      expect(bufferAddress(buf) % 4096n).toBe(0n);
    }
  });

  it.skipIf(!directDir)("round-trips through bounce buffers with unaligned caller buffers", async () => {
    const file = sparseFile(MiB, dir);
    const dev = await openFile(file, { mode: "rw", direct: true });
    expect(dev.direct).toBe(true);
    const data = pattern(8192 + 512, 17);
    // Offset by one byte so the caller's buffer is certainly misaligned.
    const unaligned = Buffer.alloc(data.length + 1).subarray(1);
    data.copy(unaligned);
    expect(bufferAddress(unaligned) % 512n).not.toBe(0n);
    await submitAndWait(dev, writeBio(1, unaligned, BioFlags.FUA));
    expectBytes(fs.readFileSync(file).subarray(512, 512 + data.length), data);

    const back = Buffer.alloc(data.length + 3, 0xee).subarray(3);
    await submitAndWait(dev, readBio(1, back));
    expectBytes(back, data);

    // Aligned caller buffers skip the bounce.
    const aligned = alignedBuffer(4096);
    await submitAndWait(dev, readBio(1, aligned));
    expectBytes(aligned, data.subarray(0, 4096));

    await submitAndWait(dev, writeZeroesBio(1, 8, BioFlags.NOUNMAP));
    expectBytes(await read(dev, 1, 8), Buffer.alloc(4096));
    await submitAndWait(dev, discardBio(8, 8));
  });

  it("explains when the backing store does not support O_DIRECT", async () => {
    const file = sparseFile(MiB);
    // Simulate tmpfs-style refusal: open(O_DIRECT) fails with EINVAL.
    const realOpen = fs.open;
    vi.spyOn(fs, "open").mockImplementation(((
      p: fs.PathLike,
      flags: number,
      cb: (e: Error | null, fd?: number) => void,
    ) => {
      if (flags & fs.constants.O_DIRECT)
        return cb(Object.assign(new Error("EINVAL: invalid argument"), { code: "EINVAL" }));
      return (realOpen as (...a: unknown[]) => void)(p, flags, cb);
    }) as typeof fs.open);
    await expect(FileDevice.open(file, { mode: "rw", direct: true })).rejects.toMatchObject({
      code: "EINVAL",
      message: expect.stringContaining("does not support O_DIRECT"),
    });
  });
});

describe("MemoryDevice", () => {
  it("starts as zeros and round-trips across page boundaries", async () => {
    const dev = new MemoryDevice(64);
    expectBytes(await read(dev, 0, 64), Buffer.alloc(64 * 512));
    expect(dev.allocatedPages).toBe(0);
    const data = pattern(5 * 512, 20);
    await submitAndWait(dev, writeBio(6, data)); // bytes 3072..5632: pages 0 and 1
    expect(dev.allocatedPages).toBe(2);
    expectBytes(await read(dev, 6, 5), data);
    expectBytes(await read(dev, 0, 6), Buffer.alloc(6 * 512));
  });

  it("completes bios synchronously", () => {
    const dev = new MemoryDevice(8);
    let done = false;
    const bio = writeBio(0, pattern(512, 21));
    bio.endIo = { bioDone: () => (done = true) };
    bio.submitTo(dev);
    expect(done).toBe(true);
    expect(bio.status).toBe("ok");
  });

  it("discard and write-zeroes drop whole pages and clear partial ones", async () => {
    const dev = new MemoryDevice(64);
    await submitAndWait(dev, writeBio(0, pattern(64 * 512, 22)));
    expect(dev.allocatedPages).toBe(8);
    await submitAndWait(dev, discardBio(4, 16)); // bytes 2048..10240: page 1 whole, pages 0 and 2 partly
    expect(dev.allocatedPages).toBe(7);
    await submitAndWait(dev, writeZeroesBio(24, 8)); // page 3 whole
    expect(dev.allocatedPages).toBe(6);
    const expected = pattern(64 * 512, 22);
    expected.fill(0, 2048, 10240);
    expected.fill(0, 24 * 512, 32 * 512);
    expectBytes(await read(dev, 0, 64), expected);
  });

  it("discards huge mostly-empty ranges without walking them", async () => {
    const dev = new MemoryDevice(2 ** 40); // 512 TiB
    await submitAndWait(dev, writeBio(2 ** 39, pattern(4096, 23)));
    const start = Date.now();
    await submitAndWait(dev, discardBio(0, 2 ** 40));
    expect(Date.now() - start).toBeLessThan(1000);
    expect(dev.allocatedPages).toBe(0);
  });

  it("checks bounds, read-only and closed state", async () => {
    const dev = new MemoryDevice(16);
    expect(await failsWith(dev, readBio(15, Buffer.alloc(1024)))).toBe("EIO");
    expect(await failsWith(dev, writeZeroesBio(10, 7))).toBe("EIO");
    const ro = new MemoryDevice(16, { readOnly: true });
    expect(await failsWith(ro, writeBio(0, pattern(512, 24)))).toBe("EPERM");
    expect(await failsWith(ro, discardBio(0, 1))).toBe("EPERM");
    await submitAndWait(ro, flushBio());
    await dev.close();
    expect(await failsWith(dev, readBio(0, Buffer.alloc(512)))).toBe("ENXIO");
  });

  it("names itself mem:<n> by default, uniquely", () => {
    const a = new MemoryDevice(8);
    const b = new MemoryDevice(8);
    expect(a.tableName).toMatch(/^mem:\d+$/);
    expect(b.tableName).not.toBe(a.tableName);
    expect(new MemoryDevice(8, { tableName: "ram0" }).tableName).toBe("ram0");
    expect(a.logicalBlockSize).toBe(512);
    expect(a.supportsDiscard && a.supportsWriteZeroes).toBe(true);
  });

  it("resize forgets data past a shrink", async () => {
    const dev = new MemoryDevice(32);
    await submitAndWait(dev, writeBio(0, pattern(32 * 512, 25)));
    dev.resize(10);
    expect(dev.sizeSectors).toBe(10);
    dev.resize(32);
    const back = await read(dev, 0, 32);
    expectBytes(back.subarray(0, 10 * 512), pattern(10 * 512, 25));
    expectBytes(back.subarray(10 * 512), Buffer.alloc(22 * 512));
  });
});

describe("openBackingDevice", () => {
  it("opens a regular file as a FileDevice", async () => {
    const file = sparseFile(MiB);
    const dev = await openBackingDevice(file, { mode: "r" });
    opened.push(dev);
    expect(dev).toBeInstanceOf(FileDevice);
    expect(dev.tableName).toBe(file);
    expect(dev.readOnly).toBe(true);
  });

  it("fails missing paths with ENOENT", async () => {
    await expect(openBackingDevice(path.join(tmp, "nope.img"), { mode: "r" })).rejects.toMatchObject({
      code: "ENOENT",
      message: expect.stringContaining("no such file or block device"),
    });
  });

  it("fails directories and other non-devices with ENODEV", async () => {
    await expect(openBackingDevice(tmp, { mode: "r" })).rejects.toMatchObject({ code: "ENODEV" });
    await expect(openBackingDevice("/dev/null", { mode: "r" })).rejects.toMatchObject({ code: "ENODEV" });
  });

  it("fails unknown major:minor numbers with ENODEV", async () => {
    await expect(openBackingDevice("4095:1048575", { mode: "r" })).rejects.toMatchObject({
      code: "ENODEV",
      message: expect.stringContaining("4095:1048575"),
    });
  });

  it("treats near-miss major:minor strings as paths", async () => {
    for (const arg of ["7:0x", " 7:0", "7:", "-1:0"]) {
      await expect(openBackingDevice(arg, { mode: "r" })).rejects.toMatchObject({ code: "ENOENT" });
    }
  });
});

describe("ioctl errors", () => {
  it("carry the errno name, e.g. ENOTTY for a block ioctl on a regular file", () => {
    const fd = fs.openSync(sparseFile(4096), "r");
    try {
      expect(() => blkGetSize64(fd)).toThrow(expect.objectContaining({ code: "ENOTTY", syscall: "ioctl" }));
      expect(() => blkGetSize64(fd)).toThrow(/BLKGETSIZE64: ENOTTY/);
    } finally {
      fs.closeSync(fd);
    }
  });
});

describe("I/O options", () => {
  it("createDeviceMapper({ io }) reaches every backing device opened, and the device follows them", async () => {
    const file = sparseFile(MiB);
    const seen: OpenOptions[] = [];
    const backing = {
      identify: async (spec: string) => spec,
      open: async (spec: string, opts: OpenOptions) => {
        seen.push(opts);
        return openFile(spec, opts);
      },
    };
    const dm = createDeviceMapper({ backing, io: { inlineReads: false, writePlug: false } });
    await dm.create("vol", { table: `0 ${MiB / 512} linear ${file} 0` });
    // Tables claim kernel block devices exclusively unless io says otherwise (files ignore it).
    expect(seen).toEqual([{ mode: "rw", exclusive: true, inlineReads: false, writePlug: false }]);
    expect((opened[0] as FileDevice).plugStats).toBeNull();
    await dm.close();
  });

  it("defaults: the write plug on, O_DIRECT off", async () => {
    const dev = await openFile(sparseFile(MiB), { mode: "rw" });
    expect(dev.plugStats).not.toBeNull();
    expect(dev.direct).toBe(false);
  });
});
