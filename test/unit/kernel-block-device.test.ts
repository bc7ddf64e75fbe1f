/**
 * KernelBlockDevice against real loop devices. Needs root and /dev/loop-control; elsewhere the
 * suite is skipped with a printed reason, unless UDM_REQUIRE_ROOT_TESTS=1 turns that into a failure.
 */
import fs from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { BioFlags, discardBio, readBio, submitAndWait, writeBio, writeZeroesBio } from "../../core/bio.js";
import { KernelBlockDevice } from "../../core/devices/kernel-block-device.js";
import { openBackingDevice } from "../../core/devices/open-device.js";
import { blkGetSize64, blkSszGet } from "../../core/sys/block.js";
import {
  type LoopDevice,
  type LoopOptions,
  type SparseFile,
  createLoopDevice,
  loopDeviceUnavailableReason,
  withSparseFile,
} from "../support/loop-device.js";

const MiB = 1 << 20;
const SIZE = 16 * MiB;

const skipReason = loopDeviceUnavailableReason();
const required = process.env.UDM_REQUIRE_ROOT_TESTS === "1";
if (skipReason) {
  console.warn(`kernel-block-device tests ${required ? "REQUIRED but cannot run" : "skipped"}: ${skipReason}`);
}

if (skipReason !== null && required)
  it("root-only tests must run (UDM_REQUIRE_ROOT_TESTS=1)", () => {
    throw new Error(`UDM_REQUIRE_ROOT_TESTS=1 but kernel-block-device tests cannot run: ${skipReason}`);
  });

function pattern(bytes: number, seed: number): Buffer {
  const buf = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i++) buf[i] = (i * 13 + seed * 5 + 1) & 0xff || 1;
  return buf;
}

function expectBytes(actual: Buffer, expected: Buffer): void {
  if (!actual.equals(expected)) expect.fail(`buffers differ (lengths ${actual.length}/${expected.length})`);
}

describe.skipIf(skipReason !== null)("KernelBlockDevice on a loop device", () => {
  const cleanups: (() => Promise<void>)[] = [];
  afterEach(async () => {
    // Close devices before detaching loops before removing files: reverse creation order.
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });

  async function setup(
    loopOpts: LoopOptions = {},
    mode: "r" | "rw" = "rw",
    direct = false,
  ): Promise<{ file: SparseFile; loop: LoopDevice; dev: KernelBlockDevice }> {
    const file = await withSparseFile(SIZE);
    cleanups.push(() => file.remove());
    const loop = await createLoopDevice(file.path, loopOpts);
    cleanups.push(() => loop.detach());
    const dev = await KernelBlockDevice.open(loop.path, { mode, direct });
    cleanups.push(() => dev.close());
    return { file, loop, dev };
  }

  it("reports size (BLKGETSIZE64), block size (BLKSSZGET) and identity", async () => {
    const { loop, dev } = await setup();
    expect(dev.sizeSectors).toBe(SIZE / 512);
    expect(dev.logicalBlockSize).toBe(512);
    const n = loop.path.replace("/dev/loop", "");
    expect(dev.devno).toEqual({ major: 7, minor: Number(n) });
    expect(dev.devno).toEqual(loop.devno);
    expect(dev.tableName).toBe(`7:${n}`);
    expect(dev.displayName).toBe(`loop${n}`);
    expect(dev.readOnly).toBe(false);

    const fd = fs.openSync(loop.path, "r");
    try {
      expect(blkGetSize64(fd)).toBe(SIZE);
      expect(blkSszGet(fd)).toBe(512);
    } finally {
      fs.closeSync(fd);
    }
  });

  it("sees a 4 KiB logical block size configured through LOOP_CONFIGURE", async () => {
    const { dev } = await setup({ blockSize: 4096 });
    expect(dev.logicalBlockSize).toBe(4096);
  });

  it("round-trips writes and reads against the backing file", async () => {
    const { file, dev } = await setup();
    const data = pattern(64 * 1024, 1);
    await submitAndWait(dev, writeBio(2048, data, BioFlags.FUA));
    expectBytes(fs.readFileSync(file.path).subarray(MiB, MiB + data.length), data);
    const back = Buffer.alloc(data.length);
    await submitAndWait(dev, readBio(2048, back));
    expectBytes(back, data);

    // Written to the file behind the loop device's back, in a range the page cache never saw.
    const other = pattern(4096, 2);
    fs.writeFileSync(file.path, other, { flag: "r+" });
    const head = Buffer.alloc(4096);
    await submitAndWait(dev, readBio(0, head));
    expectBytes(head, other);
  });

  it("round-trips with O_DIRECT through bounce buffers", async () => {
    const { file, dev } = await setup({}, "rw", true);
    const data = pattern(8192, 3);
    const unaligned = Buffer.alloc(data.length + 1).subarray(1);
    data.copy(unaligned);
    await submitAndWait(dev, writeBio(8, unaligned));
    expectBytes(fs.readFileSync(file.path).subarray(4096, 4096 + data.length), data);
    const back = Buffer.alloc(data.length + 7).subarray(7);
    await submitAndWait(dev, readBio(8, back));
    expectBytes(back, data);
  });

  it("discards with BLKDISCARD: the backing file's blocks are punched out", async () => {
    const { file, dev } = await setup();
    expect(dev.supportsDiscard).toBe(true);
    await submitAndWait(dev, writeBio(0, pattern(4 * MiB, 4), BioFlags.FUA));
    const before = fs.statSync(file.path).blocks * 512;
    expect(before).toBeGreaterThanOrEqual(4 * MiB);
    await submitAndWait(dev, discardBio(0, (2 * MiB) / 512));
    expect(before - fs.statSync(file.path).blocks * 512).toBeGreaterThanOrEqual(2 * MiB);
    const back = Buffer.alloc(2 * MiB, 0xee);
    await submitAndWait(dev, readBio(0, back));
    expectBytes(back, Buffer.alloc(2 * MiB));
  });

  it("zeroes with BLKZEROOUT", async () => {
    const { file, dev } = await setup();
    await submitAndWait(dev, writeBio(0, pattern(MiB, 5), BioFlags.FUA));
    await submitAndWait(dev, writeZeroesBio(8, 16, BioFlags.FUA));
    const expected = pattern(MiB, 5).fill(0, 4096, 4096 + 8192);
    const back = Buffer.alloc(MiB);
    await submitAndWait(dev, readBio(0, back));
    expectBytes(back, expected);
    expectBytes(fs.readFileSync(file.path).subarray(0, MiB), expected);
  });

  it("fails modifications of a read-only open with EPERM and past the end with EIO", async () => {
    const { dev } = await setup({ readOnly: true }, "r");
    expect(dev.readOnly).toBe(true);
    await expect(submitAndWait(dev, writeBio(0, pattern(512, 6)))).rejects.toMatchObject({ status: "EPERM" });
    await expect(submitAndWait(dev, readBio(SIZE / 512, Buffer.alloc(512)))).rejects.toMatchObject({ status: "EIO" });
    await submitAndWait(dev, readBio(SIZE / 512 - 1, Buffer.alloc(512)));
  });

  it("binds through the pre-5.8 LOOP_SET_FD + LOOP_SET_STATUS64 fallback", async () => {
    const { loop, dev } = await setup({ legacy: true });
    expect(dev.sizeSectors).toBe(SIZE / 512);
    const name = fs.readFileSync(`/sys/block/${loop.path.slice(5)}/loop/backing_file`, "utf8").trim();
    expect(name).toMatch(/disk\.img$/);
  });

  it("openBackingDevice dispatches node paths and major:minor to KernelBlockDevice", async () => {
    const { loop, dev } = await setup();
    for (const arg of [loop.path, `${loop.devno.major}:${loop.devno.minor}`]) {
      const opened = await openBackingDevice(arg, { mode: "r" });
      try {
        expect(opened).toBeInstanceOf(KernelBlockDevice);
        expect(opened.tableName).toBe(dev.tableName);
        expect(opened.displayName).toBe(dev.displayName);
        expect(opened.sizeSectors).toBe(SIZE / 512);
      } finally {
        await opened.close();
      }
    }
  });

  it("detach unbinds the loop device", async () => {
    const file = await withSparseFile(MiB);
    cleanups.push(() => file.remove());
    const loop = await createLoopDevice(file.path);
    const sys = `/sys/block/${loop.path.slice(5)}/loop/backing_file`;
    expect(fs.existsSync(sys)).toBe(true);
    await loop.detach();
    await loop.detach(); // idempotent
    expect(fs.existsSync(sys)).toBe(false);
  });
});
