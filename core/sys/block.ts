/**
 * Block-device ioctls (include/uapi/linux/fs.h): size, logical block size, and discard and
 * zero-out of byte ranges (on a worker thread: they can keep the disk busy for long).
 */
import { callAsync, check, libc } from "./libc.js";

// asm-generic/ioctl.h: dir<<30 | size<<16 | type<<8 | nr
const IOC_NONE = 0;
const IOC_READ = 2;
const ioc = (dir: number, type: number, nr: number, size: number): number =>
  ((dir << 30) | (size << 16) | (type << 8) | nr) >>> 0;

/** _IOR(0x12, 114, size_t): device size in bytes (u64 out). */
const BLKGETSIZE64 = ioc(IOC_READ, 0x12, 114, 8);
/** _IO(0x12, 104): logical block size (int out). Historic: declared without a size. */
const BLKSSZGET = ioc(IOC_NONE, 0x12, 104, 0);
/** _IO(0x12, 119): discard a byte range (u64[2] in: offset, length). */
const BLKDISCARD = ioc(IOC_NONE, 0x12, 119, 0);
/** _IO(0x12, 127): zero a byte range (u64[2] in), never unmapping. */
const BLKZEROOUT = ioc(IOC_NONE, 0x12, 127, 0);

function rangeArg(offset: number, length: number): Buffer {
  const range = Buffer.alloc(16);
  range.writeBigUInt64LE(BigInt(offset), 0);
  range.writeBigUInt64LE(BigInt(length), 8);
  return range;
}

/** Device size in bytes. */
export function blkGetSize64(fd: number): number {
  const out = Buffer.alloc(8);
  check(libc().ioctlPtr(fd, BLKGETSIZE64, out), "ioctl", "BLKGETSIZE64");
  return Number(out.readBigUInt64LE(0));
}

/** Logical block size in bytes. */
export function blkSszGet(fd: number): number {
  const out = Buffer.alloc(4);
  check(libc().ioctlPtr(fd, BLKSSZGET, out), "ioctl", "BLKSSZGET");
  return out.readInt32LE(0);
}

export async function blkDiscardAsync(fd: number, offset: number, length: number): Promise<void> {
  await callAsync(libc().ioctlPtr, [fd, BLKDISCARD, rangeArg(offset, length)], "ioctl", "BLKDISCARD");
}

export async function blkZeroOutAsync(fd: number, offset: number, length: number): Promise<void> {
  await callAsync(libc().ioctlPtr, [fd, BLKZEROOUT, rangeArg(offset, length)], "ioctl", "BLKZEROOUT");
}
