/**
 * FUA writes where pwritev2(RWF_DSYNC) is not available (an old kernel or libc answers ENOSYS or
 * EOPNOTSUPP): the file device falls back to write + fdatasync for that write and every later one,
 * and the data still lands durably.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { BioFlags, submitAndWait, writeBio } from "../../core/bio.js";
import { FileDevice } from "../../core/devices/file-device.js";
import { pwriteFlagsAsync } from "../../core/sys/file.js";
import { traceFsWrites } from "../support/fs-trace.js";
import { pattern } from "../../testing/memory-backing.js";

vi.mock("../../core/sys/file.js", async (importOriginal) => {
  const real = await importOriginal<typeof import("../../core/sys/file.js")>();
  return {
    ...real,
    pwriteFlagsAsync: vi.fn(async () => {
      throw Object.assign(new Error("pwritev2 is not available: no such function"), { code: "ENOSYS" });
    }),
  };
});

let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-fua-fallback-"));
});
afterEach(() => {
  vi.restoreAllMocks();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe.skipIf(process.platform !== "linux" || process.arch !== "x64")("FUA without RWF_DSYNC", () => {
  it("falls back to write + fdatasync, once detected for every later FUA write, and the data lands", async () => {
    const file = path.join(dir, "disk.img");
    fs.writeFileSync(file, "");
    fs.truncateSync(file, 1024 * 1024);
    const dev = await FileDevice.open(file, { mode: "rw" });
    const order: string[] = [];
    const realSync = fs.fdatasync;
    vi.spyOn(fs, "fdatasync").mockImplementation(((fd: number, cb: (e: Error | null) => void) => {
      order.push("sync");
      realSync(fd, cb);
    }) as typeof fs.fdatasync);
    traceFsWrites(order);

    await submitAndWait(dev, writeBio(0, pattern(1, 4096), BioFlags.FUA));
    expect(order).toEqual(["write", "sync"]);
    expect(pwriteFlagsAsync).toHaveBeenCalledTimes(1);

    order.length = 0;
    await submitAndWait(dev, writeBio(8, pattern(2, 4096), BioFlags.FUA));
    expect(order).toEqual(["write", "sync"]);
    expect(pwriteFlagsAsync).toHaveBeenCalledTimes(1); // not tried again

    const back = fs.readFileSync(file);
    expect(back.subarray(0, 4096).equals(pattern(1, 4096))).toBe(true);
    expect(back.subarray(4096, 8192).equals(pattern(2, 4096))).toBe(true);
    await dev.close();
  });
});
