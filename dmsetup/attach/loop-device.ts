/**
 * Loop devices (root): bind a file to a free /dev/loopN through /dev/loop-control and the loop
 * ioctls, for code that needs a real kernel block device over a file (udmd's `attach`, tests).
 *
 * Two ways to own a bound device:
 * - held (the default, for tests): this module keeps an fd on the device, bound with
 *   LO_FLAGS_AUTOCLEAR, so the kernel unbinds it when that fd closes, even if the process is
 *   SIGKILLed. Leaked loop devices outlive the process and pile up; this cannot leak.
 * - released (`holdOpen: false`, udmd's attach): the fd is closed once the device is bound, so the
 *   device's openers are only its users. That matters because the kernel drops a block device's
 *   page cache on its last close (blkdev_put → sync_blockdev + kill_bdev), as it does for a dm
 *   device when the last user lets go; a process holding the device open would keep stale pages
 *   alive across unmounts. Such a device survives a SIGKILL of its owner: `releasedLoopsBackedBy`
 *   finds them again for the next owner to clear.
 * Either way an exit handler unbinds whatever is still tracked.
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
  LO_FLAGS_DIRECT_IO,
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
  /** The kernel does direct I/O on the backing file (asked for with `directIo`, and possible there). */
  directIo: boolean;
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
  /**
   * Direct I/O on the backing file (LO_FLAGS_DIRECT_IO): reads and writes reach the file's owner
   * at once instead of going through the backing file's page cache. The kernel falls back to
   * buffered I/O where the file cannot do direct I/O; `LoopDevice.directIo` says which it got.
   */
  directIo?: boolean;
  /** Keep an fd on the device, bound with autoclear (default true); see the header. */
  holdOpen?: boolean;
}

const held = new Set<number>(); // fds we hold on bound loop devices
const released = new Set<string>(); // /dev/loopN bound with holdOpen: false and not yet detached
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const fd of held) {
      try {
        loopClrFd(fd);
      } catch {
        // Already unbound: nothing left to clean.
      }
      fs.closeSync(fd);
    }
    held.clear();
    for (const node of released) {
      try {
        const fd = fs.openSync(node, fs.constants.O_RDONLY);
        try {
          loopClrFd(fd);
        } finally {
          fs.closeSync(fd);
        }
      } catch {
        // Already unbound or gone.
      }
    }
    released.clear();
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
      const holdOpen = opts.holdOpen ?? true;
      try {
        const flags =
          (holdOpen ? LO_FLAGS_AUTOCLEAR : 0) |
          (opts.readOnly ? LO_FLAGS_READ_ONLY : 0) |
          (opts.directIo ? LO_FLAGS_DIRECT_IO : 0);
        if (opts.legacy) loopSetFdLegacy(fd, backing.fd, { flags, fileName: abs });
        else await loopConfigure(fd, backing.fd, { flags, fileName: abs }, opts.blockSize ?? 0);
      } catch (err) {
        fs.closeSync(fd);
        if ((err as NodeJS.ErrnoException).code === "EBUSY" && attempt < 10) continue;
        throw err;
      }
      const devno = decodeDevno(fs.fstatSync(fd, { bigint: true }).rdev);
      const directIo = readSysfs(node, "dio") === "1";
      let detaching: Promise<void> | null = null;
      if (holdOpen) {
        held.add(fd);
        return { path: node, devno, directIo, detach: () => (detaching ??= detachFd(fd, !opts.readOnly)) };
      }
      released.add(node);
      await closeAsync(fd);
      return { path: node, devno, directIo, detach: () => (detaching ??= detachReleased(node, !opts.readOnly)) };
    }
  } finally {
    await backing.close();
  }
}

async function detachFd(fd: number, writable: boolean): Promise<void> {
  if (!held.has(fd)) return;
  held.delete(fd);
  await unbind(fd, writable);
  await closeAsync(fd);
}

async function detachReleased(node: string, writable: boolean): Promise<void> {
  if (!released.has(node)) return;
  released.delete(node);
  const fd = await openAsync(node);
  try {
    await unbind(fd, writable);
  } finally {
    await closeAsync(fd); // the last close, unless someone else holds it: the kernel unbinds then
  }
}

async function unbind(fd: number, writable: boolean): Promise<void> {
  // Write back dirty pages while the device is still bound: once LOOP_CLR_FD has put it in
  // rundown, the kernel fails its I/O.
  if (writable) await new Promise<void>((resolve) => fs.fsync(fd, () => resolve()));
  await loopClrFdAsync(fd).catch(() => undefined); // ENXIO: already unbound
}

/**
 * Loop devices bound to a file under `dir` (as /sys/block/loopN/loop/backing_file says), for
 * clearing what a killed owner left bound with `holdOpen: false`.
 */
export function releasedLoopsBackedBy(dir: string): string[] {
  const prefix = path.resolve(dir) + path.sep;
  let names: string[];
  try {
    names = fs.readdirSync("/sys/block").filter((n) => n.startsWith("loop"));
  } catch {
    return [];
  }
  return names.filter((n) => readSysfs(`/dev/${n}`, "backing_file")?.startsWith(prefix)).map((n) => `/dev/${n}`);
}

/** Unbind `node` now (or on its last close, if someone holds it): a leftover of a killed owner. */
export async function clearLoopDevice(node: string): Promise<void> {
  released.delete(node);
  const fd = await openAsync(node);
  try {
    await loopClrFdAsync(fd);
  } finally {
    await closeAsync(fd);
  }
}

function readSysfs(node: string, attr: string): string | null {
  try {
    return fs.readFileSync(`/sys/block/${path.basename(node)}/loop/${attr}`, "utf8").trim();
  } catch {
    return null;
  }
}

/** Opening a loop device can wait for the device's own I/O (a partition rescan): off the event loop. */
function openAsync(node: string): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.open(node, fs.constants.O_RDWR, (err, fd) => (err ? reject(err) : resolve(fd))),
  );
}

function closeAsync(fd: number): Promise<void> {
  return new Promise<void>((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}
