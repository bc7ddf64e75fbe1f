/**
 * The loop-device ioctls (linux/loop.h, drivers/block/loop.c): find a free device, bind a file,
 * unbind. The structs are declared with koffi and packed with `koffi.encode`.
 */
import koffi, { type TypeObject } from "koffi";
import { SyscallError } from "../../core/sys/errors.js";
import { callAsync, check, lastErrno, libc } from "../../core/sys/libc.js";

/** Bind the loop device to the file descriptor passed as the argument. */
const LOOP_SET_FD = 0x4c00;
/** Unbind (or, while others hold it open, mark for autoclear). */
const LOOP_CLR_FD = 0x4c01;
/** Set struct loop_info64 (flags, name) after LOOP_SET_FD. */
const LOOP_SET_STATUS64 = 0x4c04;
/** Linux 5.8+: LOOP_SET_FD + LOOP_SET_STATUS64 in one atomic step. */
const LOOP_CONFIGURE = 0x4c0a;
/** On /dev/loop-control: the number of a free loop device (allocating one). */
const LOOP_CTL_GET_FREE = 0x4c82;

export const LO_FLAGS_READ_ONLY = 1;
export const LO_FLAGS_AUTOCLEAR = 4;
/** Direct I/O on the backing file: no page cache of the backing file between the device and it. */
export const LO_FLAGS_DIRECT_IO = 16;

/** struct loop_info64, 232 bytes. */
const LoopInfo64 = koffi.struct({
  lo_device: "uint64_t",
  lo_inode: "uint64_t",
  lo_rdevice: "uint64_t",
  lo_offset: "uint64_t",
  lo_sizelimit: "uint64_t",
  lo_number: "uint32_t",
  lo_encrypt_type: "uint32_t",
  lo_encrypt_key_size: "uint32_t",
  lo_flags: "uint32_t",
  lo_file_name: koffi.array("uint8_t", 64),
  lo_crypt_name: koffi.array("uint8_t", 64),
  lo_encrypt_key: koffi.array("uint8_t", 32),
  lo_init: koffi.array("uint64_t", 2),
});

/** struct loop_config, 304 bytes. */
const LoopConfig = koffi.struct({
  fd: "uint32_t",
  block_size: "uint32_t",
  info: LoopInfo64,
  __reserved: koffi.array("uint64_t", 8),
});

export interface LoopInfo {
  /** LO_FLAGS_* bits. */
  flags?: number;
  /** Recorded for `losetup -l` display; truncated to 63 bytes. */
  fileName?: string;
}

function loopInfo64(info: LoopInfo): Record<string, unknown> {
  const name = new Uint8Array(64);
  name.set(Buffer.from(info.fileName ?? "").subarray(0, 63));
  return { lo_flags: info.flags ?? 0, lo_file_name: Array.from(name) };
}

/** `value` packed as `type` into a new zeroed Buffer (unset fields stay 0). */
function pack(type: TypeObject, size: number, value: Record<string, unknown>): Buffer {
  if (koffi.sizeof(type) !== size) throw new Error("udm: unexpected struct loop_info64/loop_config layout");
  const buf = Buffer.alloc(size);
  koffi.encode(buf, 0, type, value);
  return buf;
}

/** On an fd of /dev/loop-control: the number N of a free /dev/loopN. */
export function loopCtlGetFree(controlFd: number): number {
  return check(libc().ioctlInt(controlFd, LOOP_CTL_GET_FREE, 0), "ioctl", "LOOP_CTL_GET_FREE");
}

/**
 * Bind loop device `loopFd` to backing file `backingFd` with LOOP_CONFIGURE, on a worker thread
 * (the kernel fsyncs the backing file there). Kernels before 5.8 reject it with EINVAL or ENOTTY;
 * then the two-step legacy bind does the same (a block size needs LOOP_CONFIGURE).
 */
export async function loopConfigure(
  loopFd: number,
  backingFd: number,
  info: LoopInfo,
  blockSize: number,
): Promise<void> {
  const config = pack(LoopConfig, 304, { fd: backingFd, block_size: blockSize, info: loopInfo64(info) });
  try {
    await callAsync(libc().ioctlPtr, [loopFd, LOOP_CONFIGURE, config], "ioctl", "LOOP_CONFIGURE");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if ((code !== "EINVAL" && code !== "ENOTTY") || blockSize !== 0) throw err;
    loopSetFdLegacy(loopFd, backingFd, info);
  }
}

/**
 * The pre-5.8 two-step bind, on the calling thread. Not atomic: the device briefly exists with
 * default status.
 */
export function loopSetFdLegacy(loopFd: number, backingFd: number, info: LoopInfo): void {
  const lib = libc();
  check(lib.ioctlInt(loopFd, LOOP_SET_FD, backingFd), "ioctl", "LOOP_SET_FD");
  if (lib.ioctlPtr(loopFd, LOOP_SET_STATUS64, pack(LoopInfo64, 232, loopInfo64(info))) !== 0) {
    const err = new SyscallError("ioctl", lastErrno(), "LOOP_SET_STATUS64");
    lib.ioctlInt(loopFd, LOOP_CLR_FD, 0);
    throw err;
  }
}

/** Unbind a loop device (deferred by the kernel until the last opener closes it). */
export function loopClrFd(loopFd: number): void {
  check(libc().ioctlInt(loopFd, LOOP_CLR_FD, 0), "ioctl", "LOOP_CLR_FD");
}

/** loopClrFd on a worker thread: the device may be backed by a file this process serves. */
export async function loopClrFdAsync(loopFd: number): Promise<void> {
  await callAsync(libc().ioctlInt, [loopFd, LOOP_CLR_FD, 0], "ioctl", "LOOP_CLR_FD");
}
