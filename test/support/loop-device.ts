/**
 * Loop devices and sparse backing files for tests that need real kernel block devices (root).
 *
 * Leaked loop devices outlive the test run and pile up, so there are two safety nets besides
 * `detach()`: each device is bound with LO_FLAGS_AUTOCLEAR while this module holds an fd on it
 * (the kernel detaches it when the last fd closes, even if the process is SIGKILLed), and an
 * exit handler detaches whatever is still tracked.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { type Devno, decodeDevno } from "../../core/devices/kernel-block-device.js";
import {
  LO_FLAGS_AUTOCLEAR,
  LO_FLAGS_READ_ONLY,
  loopClrFd,
  loopConfigure,
  loopCtlGetFree,
  loopSetFdLegacy,
} from "../../core/ioctl.js";

export const LOOP_CONTROL = "/dev/loop-control";

export interface LoopDevice {
  /** `/dev/loopN`. */
  path: string;
  devno: Devno;
  /** Unbind. Lazy if someone still has the device open: the kernel finishes when they close. */
  detach(): Promise<void>;
}

const attached = new Map<number, string>(); // held loop fd → node
const tempDirs = new Set<string>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const fd of [...attached.keys()]) detachFd(fd);
    for (const dir of tempDirs) fs.rmSync(dir, { recursive: true, force: true });
  });
}

function detachFd(fd: number): void {
  if (!attached.delete(fd)) return;
  try {
    loopClrFd(fd);
  } catch {
    // Already unbound (ENXIO): nothing left to clean.
  }
  fs.closeSync(fd);
}

/** Why root loop-device tests cannot run here, or null if they can. */
export function loopDeviceUnavailableReason(): string | null {
  if (process.platform !== "linux") return `loop devices need Linux (this is ${process.platform})`;
  if (process.getuid?.() !== 0) return "loop-device tests need root";
  if (!fs.existsSync(LOOP_CONTROL)) return `${LOOP_CONTROL} is missing (no loop driver or no devtmpfs)`;
  return null;
}

export interface LoopOptions {
  readOnly?: boolean;
  /** Logical block size (LOOP_CONFIGURE only); default 512. */
  blockSize?: number;
  /** Bind with the pre-5.8 LOOP_SET_FD + LOOP_SET_STATUS64 path, to test the fallback. */
  legacy?: boolean;
}

export async function createLoopDevice(file: string, opts: LoopOptions = {}): Promise<LoopDevice> {
  const abs = path.resolve(file);
  const { O_RDONLY, O_RDWR } = fs.constants;
  const backing = fs.openSync(abs, opts.readOnly ? O_RDONLY : O_RDWR);
  installExitHook();
  try {
    // Another process may grab the same free device between GET_FREE and CONFIGURE (EBUSY).
    for (let attempt = 0; ; attempt++) {
      const control = fs.openSync(LOOP_CONTROL, O_RDWR);
      let n: number;
      try {
        n = loopCtlGetFree(control);
      } finally {
        fs.closeSync(control);
      }
      const node = `/dev/loop${n}`;
      const fd = fs.openSync(node, O_RDWR);
      try {
        const flags = LO_FLAGS_AUTOCLEAR | (opts.readOnly ? LO_FLAGS_READ_ONLY : 0);
        if (opts.legacy) loopSetFdLegacy(fd, backing, { flags, fileName: abs });
        else loopConfigure(fd, backing, { flags, fileName: abs }, opts.blockSize ?? 0);
      } catch (err) {
        fs.closeSync(fd);
        if ((err as NodeJS.ErrnoException).code === "EBUSY" && attempt < 10) continue;
        throw err;
      }
      attached.set(fd, node);
      const devno = decodeDevno(fs.fstatSync(fd, { bigint: true }).rdev);
      return { path: node, devno, detach: async () => detachFd(fd) };
    }
  } finally {
    fs.closeSync(backing);
  }
}

export interface SparseFile {
  path: string;
  /** Delete the file and its private directory. */
  remove(): Promise<void>;
}

/** A sparse file of `size` bytes (no blocks allocated) in a fresh directory under `dir`. */
export async function withSparseFile(size: number, opts: { dir?: string; name?: string } = {}): Promise<SparseFile> {
  installExitHook();
  const dir = await fs.promises.mkdtemp(path.join(opts.dir ?? os.tmpdir(), "udm-test-"));
  tempDirs.add(dir);
  const file = path.join(dir, opts.name ?? "disk.img");
  await fs.promises.writeFile(file, "");
  await fs.promises.truncate(file, size);
  return {
    path: file,
    remove: async () => {
      tempDirs.delete(dir);
      await fs.promises.rm(dir, { recursive: true, force: true });
    },
  };
}
