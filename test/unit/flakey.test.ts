/**
 * flakey (dm-flakey.c 1.5.0): every ctr error with the kernel's message, the normalised TABLE line,
 * and the behaviour of each feature in down intervals, with time driven by a FakeClock (intervals
 * are whole seconds counted from the table load).
 */
import { beforeEach, describe, expect, it } from "vitest";
import { BioFlags, submitAndWait, writeBio } from "../../core/bio.js";
import type { DeviceHandle, DeviceMapper } from "../../core/device-mapper.js";
import { createDeviceMapper } from "../../index.js";
import type { FlakeyTarget } from "../../targets/flakey.js";
import { FakeClock, settle } from "../support/fake-clock.js";
import { pattern } from "../../testing/memory-backing.js";
import {
  type RecordingDevice,
  TrackingBacking,
  expectCtrError as expectCtrErrorIn,
  readDevice,
} from "../support/recording-device.js";

let clock: FakeClock;
let backing: TrackingBacking;
let dm: DeviceMapper;
let mem0: RecordingDevice;

beforeEach(() => {
  clock = new FakeClock();
  backing = new TrackingBacking();
  dm = createDeviceMapper({ backing, clock });
  mem0 = backing.recorded("mem0", 1000);
});

/** A table line's ctr must fail with exactly this message (and errno), leaving nothing behind. */
const expectCtrError = (line: string, message: string, errno?: string) =>
  expectCtrErrorIn(dm, backing, line, message, errno);

const readDisk = (sector: number, sectors: number) => readDevice(mem0, sector, sectors);

async function writeDisk(sector: number, data: Buffer): Promise<void> {
  await submitAndWait(mem0, writeBio(sector, data));
}

/** Byte positions where a and b differ. */
function diff(a: Buffer, b: Buffer): number[] {
  const out: number[] = [];
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) out.push(i);
  return out;
}

async function flakey(params: string, len = 100): Promise<DeviceHandle> {
  await dm.create("f", { table: `0 ${len} flakey ${params}` });
  return dm.open("f");
}

function liveTarget(name = "f"): FlakeyTarget {
  return dm.device(name).live!.targets[0] as unknown as FlakeyTarget;
}

describe("flakey constructor", () => {
  it.each([
    ["", "Invalid argument count"],
    ["mem0 0 1", "Invalid argument count"],
    ["mem0 x 1 1", "Invalid device sector"],
    ["mem0 -1 1 1", "Invalid device sector"],
    ["mem0 0 x 1", "Invalid up interval"],
    ["mem0 0 -1 1", "Invalid up interval"],
    ["mem0 0 4294967296 1", "Invalid up interval"],
    ["mem0 0 1 x", "Invalid down interval"],
    ["mem0 0 1 4294967296", "Invalid down interval"],
    ["mem0 0 0 0", "Total (up + down) interval is zero"],
    // The sum is an unsigned int: 2^32 wraps to zero, more than that to less than up.
    ["mem0 0 4294967295 1", "Total (up + down) interval is zero"],
    ["mem0 0 4294967295 2", "Interval overflow"],
    ["mem0 0 1 1 x", "Invalid number of feature args"],
    ["mem0 0 1 1 12 a b c d e f g h i j k l", "Invalid number of feature args"],
    ["mem0 0 1 1 2 drop_writes", "Invalid number of feature args"],
    ["mem0 0 1 1 1 bogus", "Unrecognised flakey feature requested"],
    ["mem0 0 1 1 2 error_reads error_reads", "Feature error_reads duplicated"],
    ["mem0 0 1 1 2 drop_writes drop_writes", "Feature drop_writes duplicated"],
    ["mem0 0 1 1 2 error_writes error_writes", "Feature error_writes duplicated"],
    ["mem0 0 1 1 2 error_writes drop_writes", "Feature drop_writes conflicts with feature error_writes"],
    ["mem0 0 1 1 2 drop_writes error_writes", "Feature error_writes conflicts with feature drop_writes"],
    ["mem0 0 1 1 1 corrupt_bio_byte", "Feature corrupt_bio_byte requires 4 parameters"],
    ["mem0 0 1 1 4 corrupt_bio_byte 1 r 0", "Feature corrupt_bio_byte requires 4 parameters"],
    ["mem0 0 1 1 10 corrupt_bio_byte 1 r 0 0 corrupt_bio_byte 1 r 0 0", "Feature corrupt_bio_byte duplicated"],
    ["mem0 0 1 1 5 corrupt_bio_byte 0 r 0 0", "Invalid corrupt bio byte"],
    ["mem0 0 1 1 5 corrupt_bio_byte x r 0 0", "Invalid corrupt bio byte"],
    ["mem0 0 1 1 5 corrupt_bio_byte 1 x 0 0", "Invalid corrupt bio direction (r or w)"],
    ["mem0 0 1 1 5 corrupt_bio_byte 1 rw 0 0", "Invalid corrupt bio direction (r or w)"],
    ["mem0 0 1 1 5 corrupt_bio_byte 1 r 256 0", "Invalid corrupt value to write into bio byte (0-255)"],
    ["mem0 0 1 1 5 corrupt_bio_byte 1 r 0 x", "Invalid corrupt bio flags mask"],
    ["mem0 0 1 1 5 corrupt_bio_byte 1 r 0 4294967296", "Invalid corrupt bio flags mask"],
    ["mem0 0 1 1 1 random_read_corrupt", "Feature random_read_corrupt requires a parameter"],
    ["mem0 0 1 1 1 random_write_corrupt", "Feature random_write_corrupt requires a parameter"],
    ["mem0 0 1 1 4 random_read_corrupt 1 random_read_corrupt 1", "Feature random_read_corrupt duplicated"],
    ["mem0 0 1 1 4 random_write_corrupt 1 random_write_corrupt 1", "Feature random_write_corrupt duplicated"],
    ["mem0 0 1 1 2 random_read_corrupt 1000000001", "Invalid random corrupt argument"],
    ["mem0 0 1 1 2 random_write_corrupt x", "Invalid random corrupt argument"],
    [
      "mem0 0 1 1 6 drop_writes corrupt_bio_byte 1 w 0 0",
      "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
    ],
    [
      "mem0 0 1 1 3 drop_writes random_write_corrupt 5",
      "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
    ],
    [
      "mem0 0 1 1 6 error_writes corrupt_bio_byte 1 w 0 0",
      "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
    ],
    [
      "mem0 0 1 1 3 error_writes random_write_corrupt 5",
      "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
    ],
    [
      "mem0 0 1 1 6 error_reads corrupt_bio_byte 1 r 0 0",
      "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the READ flag set",
    ],
    [
      "mem0 0 1 1 3 error_reads random_read_corrupt 5",
      "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the READ flag set",
    ],
    // Arguments are all checked before the device is looked up.
    ["nosuch 0 1 1 1 bogus", "Unrecognised flakey feature requested"],
  ])("rejects '%s' with '%s'", async (args, message) => {
    await expectCtrError(`0 100 flakey ${args}`, `flakey: ${message}`);
  });

  it("fails a missing device with 'Device lookup failed', the lookup's reason and errno", async () => {
    await expectCtrError(
      "0 100 flakey nosuch 0 1 1",
      "flakey: Device lookup failed: nosuch: no such test device",
      "ENOENT",
    );
  });

  it("checks the device area it maps", async () => {
    await expectCtrError("0 10 flakey mem0 995 1 1", "mem0 too small for target: start=995, len=10, dev_size=1000");
  });

  it("registers as flakey 1.5.0", () => {
    expect(dm.targets().find((t) => t.name === "flakey")?.version).toEqual([1, 5, 0]);
  });
});

describe("flakey status", () => {
  it.each([
    // No features (or zero of them) means error_reads + error_writes, and TABLE says so.
    ["mem0 0 1 1", "mem0 0 1 1 2 error_reads error_writes"],
    ["mem0 0 1 1 0", "mem0 0 1 1 2 error_reads error_writes"],
    // Features whose values are all zero are no features either.
    ["mem0 0 1 1 2 random_read_corrupt 0", "mem0 0 1 1 2 error_reads error_writes"],
    ["mem0 5 3 2 1 DROP_WRITES", "mem0 5 3 2 1 drop_writes"],
    ["mem0 0 1 1 1 error_writes", "mem0 0 1 1 1 error_writes"],
    ["mem0 0 1 1 2 error_writes error_reads", "mem0 0 1 1 2 error_reads error_writes"],
    ["mem0 0 1 1 5 corrupt_bio_byte 32 R 1 0", "mem0 0 1 1 5 corrupt_bio_byte 32 r 1 0"],
    ["mem0 0 1 1 5 Corrupt_Bio_Byte 224 W 0 32", "mem0 0 1 1 5 corrupt_bio_byte 224 w 0 32"],
    [
      "mem0 0 1 1 4 random_write_corrupt 20 random_read_corrupt 10",
      "mem0 0 1 1 4 random_read_corrupt 10 random_write_corrupt 20",
    ],
    [
      "mem0 0 0 4294967295 8 random_read_corrupt 3 corrupt_bio_byte 9 r 7 1 drop_writes",
      "mem0 0 0 4294967295 8 drop_writes corrupt_bio_byte 9 r 7 1 random_read_corrupt 3",
    ],
    // Arguments after the feature group are ignored, as by the kernel.
    ["mem0 0 1 1 1 drop_writes junk", "mem0 0 1 1 1 drop_writes"],
  ])("'%s' reads back as '%s' (no trailing space) with an empty INFO", async (args, table) => {
    await dm.create("f", { table: `0 100 flakey ${args}` });
    expect(dm.table("f")[0]!.params).toBe(table);
    expect(dm.tableText("f")).toBe(`0 100 flakey ${table}\n`);
    expect(dm.status("f")[0]!.params).toBe("");
    // The TABLE line is accepted again and means the same.
    await dm.load("f", `0 100 flakey ${table}`);
    expect(dm.table("f", { inactive: true })[0]!.params).toBe(table);
  });
});

describe("flakey up and down intervals", () => {
  it("passes I/O while up and fails reads, writes and flushes while down (no features)", async () => {
    // up 2 s, down 3 s: whole seconds 0-1 up, 2-4 down, 5-6 up, ...
    const h = await flakey("mem0 10 2 3");
    const data = pattern(1, 512);
    await h.write(0, data);
    expect((await h.read(0, 1)).equals(data)).toBe(true);
    await h.flush();

    clock.advance(1999);
    expect(liveTarget().isDown()).toBe(false);
    await h.read(0, 1);

    clock.advance(1); // 2 s: down
    expect(liveTarget().isDown()).toBe(true);
    mem0.clearLog();
    await expect(h.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
    await expect(h.write(0, pattern(2, 512))).rejects.toMatchObject({ status: "EIO" });
    await expect(h.flush()).rejects.toMatchObject({ status: "EIO" });
    expect(mem0.received).toEqual([]);
    expect((await readDisk(10, 1)).equals(data)).toBe(true);

    clock.advance(2999); // 4.999 s: still down
    await expect(h.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
    clock.advance(1); // 5 s: up again
    expect((await h.read(0, 1)).equals(data)).toBe(true);
    await h.write(0, pattern(3, 512));
    expect((await readDisk(10, 1)).equals(pattern(3, 512))).toBe(true);

    clock.advance(2000); // 7 s = 2 s into the second period: down
    await expect(h.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
    await h.close();
  });

  it("is always down with an up interval of 0 and never with a down interval of 0", async () => {
    await dm.create("down", { table: "0 100 flakey mem0 0 0 5" });
    await dm.create("up", { table: "0 100 flakey mem0 0 5 0" });
    const down = dm.open("down");
    const up = dm.open("up");
    for (let s = 0; s < 12; s++) {
      await expect(down.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
      await up.read(0, 1);
      clock.advance(1000);
    }
    await down.close();
    await up.close();
  });

  it("counts time from the table load, not from the device's creation", async () => {
    await dm.create("f", { table: "0 100 flakey mem0 0 1 1" });
    clock.advance(1500);
    await dm.load("f", "0 100 flakey mem0 0 1 1");
    await dm.resume("f");
    const h = dm.open("f");
    await h.read(0, 1); // 0 s into the new table: up
    clock.advance(1000);
    await expect(h.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
    await h.close();
  });
});

describe("flakey features while down", () => {
  it("drop_writes completes writes and flushes without issuing them; reads pass", async () => {
    const h = await flakey("mem0 0 0 1 1 drop_writes");
    const old = pattern(4, 2 * 512);
    await writeDisk(20, old);
    mem0.clearLog();
    const bio = await h.write(20, pattern(5, 2 * 512));
    expect(bio.status).toBe("ok");
    await h.flush();
    await h.discard(20, 2);
    expect(mem0.received.map((r) => r.op)).toEqual([]);
    expect((await readDisk(20, 2)).equals(old)).toBe(true);
    expect((await h.read(20, 2)).equals(old)).toBe(true);
    await h.close();
  });

  it("error_writes fails writes and flushes with EIO; reads pass", async () => {
    const h = await flakey("mem0 0 0 1 1 error_writes");
    await writeDisk(0, pattern(6, 512));
    await expect(h.write(0, pattern(7, 512))).rejects.toMatchObject({ status: "EIO" });
    await expect(h.flush()).rejects.toMatchObject({ status: "EIO" });
    expect((await h.read(0, 1)).equals(pattern(6, 512))).toBe(true);
    await h.close();
  });

  it("error_reads fails reads; writes and flushes pass", async () => {
    const h = await flakey("mem0 0 0 1 1 error_reads");
    await expect(h.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
    await h.write(3, pattern(8, 512));
    await h.flush();
    expect((await readDisk(3, 1)).equals(pattern(8, 512))).toBe(true);
    await h.close();
  });

  it("corrupt_bio_byte r overwrites exactly the Nth byte of reads, only while down", async () => {
    // up 1 s, down 1 s; byte 3 (1-based) becomes 171.
    const h = await flakey("mem0 7 1 1 5 corrupt_bio_byte 3 r 171 0");
    const data = pattern(9, 4 * 512);
    await writeDisk(7, data);
    expect((await h.read(0, 4)).equals(data)).toBe(true);
    clock.advance(1000);
    const got = await h.read(0, 4);
    expect(diff(got, data)).toEqual([2]);
    expect(got[2]).toBe(171);
    expect((await readDisk(7, 4)).equals(data)).toBe(true); // the disk is untouched
    // Writes pass unchanged while down.
    const w = pattern(10, 512);
    await h.write(0, w);
    expect((await readDisk(7, 1)).equals(w)).toBe(true);
    clock.advance(1000);
    expect((await h.read(0, 1)).equals(w)).toBe(true);
    await h.close();
  });

  it("corrupt_bio_byte counts from the start of each bio and skips bios shorter than N", async () => {
    const h = await flakey("mem0 0 0 1 5 corrupt_bio_byte 600 r 0 0");
    const data = Buffer.alloc(3 * 512, 0xee);
    await writeDisk(0, data);
    expect(diff(await h.read(0, 1), data.subarray(0, 512))).toEqual([]);
    expect(diff(await h.read(1, 2), data.subarray(512))).toEqual([599]);
    await h.close();
  });

  it("corrupt_bio_byte w writes a corrupted copy and leaves the caller's buffer alone", async () => {
    const h = await flakey("mem0 0 0 1 5 corrupt_bio_byte 513 w 0 0");
    const data = Buffer.alloc(2 * 512, 0x5a);
    const copy = Buffer.from(data);
    expect((await h.write(4, data)).status).toBe("ok");
    expect(data.equals(copy)).toBe(true);
    const disk = await readDisk(4, 2);
    expect(diff(disk, data)).toEqual([512]);
    expect(disk[512]).toBe(0);
    // Reads are not corrupted by a write-direction feature.
    expect(diff(await h.read(4, 2), disk)).toEqual([]);
    await h.close();
  });

  it("corrupt_bio_byte only corrupts bios carrying every flag of the mask", async () => {
    const h = await flakey(`mem0 0 0 1 5 corrupt_bio_byte 1 w 255 ${BioFlags.FUA}`);
    await h.write(0, Buffer.alloc(512, 1));
    expect((await readDisk(0, 1))[0]).toBe(1);
    await h.write(0, Buffer.alloc(512, 2), { fua: true });
    expect((await readDisk(0, 1))[0]).toBe(255);
    expect(diff(await readDisk(0, 1), Buffer.alloc(512, 2))).toEqual([0]);
    await h.close();
  });

  it("corrupt_bio_byte with drop_writes corrupts reads and drops writes", async () => {
    const h = await flakey("mem0 0 0 1 6 drop_writes corrupt_bio_byte 1 r 9 0");
    await writeDisk(0, Buffer.alloc(512, 3));
    await h.write(0, Buffer.alloc(512, 4));
    const got = await h.read(0, 1);
    expect(got[0]).toBe(9);
    expect(diff(got, Buffer.alloc(512, 3))).toEqual([0]);
    await h.close();
  });

  it("random_read_corrupt at 100% changes at most one byte per read, only while down", async () => {
    const h = await flakey("mem0 0 1 1 2 random_read_corrupt 1000000000");
    const data = pattern(11, 8 * 512);
    await writeDisk(0, data);
    expect((await h.read(0, 8)).equals(data)).toBe(true);
    clock.advance(1000);
    let changed = 0;
    for (let i = 0; i < 32; i++) {
      const d = diff(await h.read(0, 8), data);
      expect(d.length).toBeLessThanOrEqual(1);
      changed += d.length;
    }
    expect(changed).toBeGreaterThan(28); // a byte may be "corrupted" to its own value
    expect((await readDisk(0, 8)).equals(data)).toBe(true);
    await h.close();
  });

  it("random_write_corrupt at 100% writes a copy with one random byte changed", async () => {
    const h = await flakey("mem0 0 0 1 2 random_write_corrupt 1000000000");
    let changed = 0;
    for (let i = 0; i < 16; i++) {
      const data = pattern(100 + i, 2 * 512);
      const copy = Buffer.from(data);
      await h.write(0, data);
      expect(data.equals(copy)).toBe(true);
      const d = diff(await readDisk(0, 2), data);
      expect(d.length).toBeLessThanOrEqual(1);
      changed += d.length;
    }
    expect(changed).toBeGreaterThan(12);
    await h.close();
  });

  it("random corruption is reproducible: seeded from the clock, or explicitly", async () => {
    const data = pattern(12, 8 * 512);
    await writeDisk(0, data);
    const run = async (name: string, seed?: number): Promise<number[][]> => {
      await dm.create(name, { table: "0 100 flakey mem0 0 0 1 2 random_read_corrupt 500000000" });
      if (seed !== undefined) liveTarget(name).seedRandom(seed);
      const h = dm.open(name);
      const out: number[][] = [];
      for (let i = 0; i < 20; i++) {
        const got = await h.read(0, 8);
        out.push(diff(got, data).map((p) => p * 256 + got[p]!));
      }
      await h.close();
      return out;
    };
    const a = await run("a");
    const b = await run("b"); // same clock reading at load: same seed, same corruptions
    expect(b).toEqual(a);
    const hits = a.filter((x) => x.length > 0).length;
    expect(hits).toBeGreaterThan(2); // 50%: some reads corrupted ...
    expect(hits).toBeLessThan(18); // ... and some not
    clock.advance(1);
    expect(await run("c", 42)).toEqual(await run("d", 42));
    expect(await run("e")).not.toEqual(a); // a different load time, a different sequence
  });

  it("random_read_corrupt at 0 with other features never corrupts", async () => {
    const h = await flakey("mem0 0 0 1 3 drop_writes random_read_corrupt 0");
    const data = pattern(13, 8 * 512);
    await writeDisk(0, data);
    for (let i = 0; i < 10; i++) expect((await h.read(0, 8)).equals(data)).toBe(true);
    await h.close();
  });

  it("leaves reads that fail underneath alone", async () => {
    const h = await flakey("mem0 0 0 1 5 corrupt_bio_byte 1 r 7 0");
    mem0.failWhen = () => "EIO";
    await expect(h.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
    mem0.failWhen = null;
    await h.close();
  });

  it("maps only its own range when it is not the first target", async () => {
    await dm.create("f", { table: "0 8 zero\n8 92 flakey mem0 100 0 1 5 corrupt_bio_byte 1 r 1 0" });
    const h = dm.open("f");
    await writeDisk(100, Buffer.alloc(512, 0xcc));
    const got = await h.read(8, 1);
    expect(got[0]).toBe(1);
    expect(got[1]).toBe(0xcc);
    await settle();
    await h.close();
  });
});
