/**
 * Loop devices (root): bind a file to a free /dev/loopN through /dev/loop-control and the loop
 * ioctls, for code that needs a real kernel block device over a file (udmd's `attach`, tests).
 *
 * Leaked loop devices outlive the process and pile up, so there are two safety nets besides
 * `detach()`: each device is bound with LO_FLAGS_AUTOCLEAR while this module holds an fd on it
 * (the kernel detaches it when the last fd closes, even if the process is SIGKILLed), and an
 * exit handler detaches whatever is still tracked.
 *
 * The backing file may be served by this very process (udmd attaches a FUSE file fed by its own
 * NBD server), so nothing that can reach the file blocks the event loop: LOOP_CONFIGURE (the
 * kernel fsyncs the backing file there), LOOP_CLR_FD, and the flush and close in `detach()` (the
 * last close writes back the device's dirty pages) run on libuv's thread pool.
 */
import fs from "node:fs";
import path from "node:path";
import { type Devno, decodeDevno } from "../../core/devices/kernel-block-device.js";
import {
  LO_FLAGS_AUTOCLEAR,
  LO_FLAGS_READ_ONLY,
  loopClrFd,
  loopClrFdAsync,
  loopConfigure,
  loopCtlGetFree,
  loopSetFdLegacy,
} from "./loop-ioctl.js";

export const LOOP_CONTROL = "/dev/loop-control";

export interface LoopDevice {
  /** `/dev/loopN`. */
  path: string;
  devno: Devno;
  /**
   * Flush, then unbind. Lazy if someone still has the device open (a mount): the kernel
   * finishes when they close it.
   */
  detach(): Promise<void>;
}

export interface LoopOptions {
  readOnly?: boolean;
  /** Logical block size (LOOP_CONFIGURE only); default 512. */
  blockSize?: number;
  /**
   * Bind with the pre-5.8 LOOP_SET_FD + LOOP_SET_STATUS64 path (to test that fallback). These run
   * on the calling thread: not for files this process serves itself.
   */
  legacy?: boolean;
}

const attached = new Set<number>(); // fds we hold on bound loop devices
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const fd of attached) {
      try {
        loopClrFd(fd);
      } catch {
        // Already unbound: nothing left to clean.
      }
      fs.closeSync(fd);
    }
    attached.clear();
  });
}

/** Why loop devices cannot be created here, or null if they can. */
export function loopDeviceUnavailableReason(): string | null {
  if (process.platform !== "linux") return `loop devices need Linux (this is ${process.platform})`;
  if (process.getuid?.() !== 0) return "loop devices need root";
  if (!fs.existsSync(LOOP_CONTROL)) return `${LOOP_CONTROL} is missing (no loop driver or no devtmpfs)`;
  return null;
}

/** Bind `file` to a free loop device. */
export async function createLoopDevice(file: string, opts: LoopOptions = {}): Promise<LoopDevice> {
  const abs = path.resolve(file);
  const { O_RDONLY, O_RDWR } = fs.constants;
  const backing = await fs.promises.open(abs, opts.readOnly ? O_RDONLY : O_RDWR);
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
        if (opts.legacy) loopSetFdLegacy(fd, backing.fd, { flags, fileName: abs });
        else await loopConfigure(fd, backing.fd, { flags, fileName: abs }, opts.blockSize ?? 0);
      } catch (err) {
        fs.closeSync(fd);
        if ((err as NodeJS.ErrnoException).code === "EBUSY" && attempt < 10) continue;
        throw err;
      }
      attached.add(fd);
      const devno = decodeDevno(fs.fstatSync(fd, { bigint: true }).rdev);
      let detaching: Promise<void> | null = null;
      return { path: node, devno, detach: () => (detaching ??= detachFd(fd, !opts.readOnly)) };
    }
  } finally {
    await backing.close();
  }
}

async function detachFd(fd: number, writable: boolean): Promise<void> {
  if (!attached.has(fd)) return;
  // Write back dirty pages while the device is still bound: once LOOP_CLR_FD has put it in
  // rundown, the kernel fails its I/O.
  if (writable) await new Promise<void>((resolve) => fs.fsync(fd, () => resolve()));
  attached.delete(fd);
  await loopClrFdAsync(fd).catch(() => undefined); // ENXIO: already unbound
  await new Promise<void>((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}
