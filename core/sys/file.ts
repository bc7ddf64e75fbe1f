/**
 * File syscalls Node does not expose: fallocate(2), preadv2/pwritev2(2) with per-call flags,
 * sendfile(2), fcntl(F_DUPFD_CLOEXEC), flock(2), and the memory address of a Buffer.
 */
import koffi from "koffi";
import { SyscallError } from "./errors.js";
import { callAsync, check, type LibcFunction, lastErrno, libc } from "./libc.js";

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** Per-call flags of preadv2/pwritev2 (include/uapi/linux/fs.h). */
export const RWF_DSYNC = 0x02;
export const RWF_NOWAIT = 0x08;

export function fallocate(fd: number, mode: number, offset: number, length: number): void {
  check(libc().fallocate(fd, mode, offset, length), "fallocate", `mode=${mode}`);
}

export async function fallocateAsync(fd: number, mode: number, offset: number, length: number): Promise<void> {
  await callAsync(libc().fallocate, [fd, mode, offset, length], "fallocate", `mode=${mode}`);
}

/** Address of a Buffer's first byte (Node Buffers' backing stores never move). */
export function bufferAddress(buf: Buffer): bigint {
  return koffi.address(buf);
}

/** One iovec for the synchronous preadFlags, reused: each thread has its own module instance. */
const syncIovec = Buffer.alloc(16);

/**
 * preadv2(fd, [buf], pos, flags) on the calling thread: the bytes read, or a negative errno (no
 * exception: with RWF_NOWAIT, EAGAIN is an everyday answer).
 */
export function preadFlags(fd: number, buf: Buffer, pos: number, flags: number): number {
  syncIovec.writeBigUInt64LE(koffi.address(buf), 0);
  syncIovec.writeBigUInt64LE(BigInt(buf.length), 8);
  const n = Number(libc().preadv2(fd, syncIovec, 1, pos, flags));
  return n >= 0 ? n : -lastErrno();
}

/**
 * pwritev2(fd, [buf], pos, flags) on a worker thread; resolves with the bytes written. With
 * RWF_DSYNC the data (and what is needed to read it back) is durable when it resolves: a FUA
 * write, without the fdatasync that would also flush every other dirty page of the file.
 */
export async function pwriteFlagsAsync(fd: number, buf: Buffer, pos: number, flags: number): Promise<number> {
  const iovec = Buffer.alloc(16); // one per call: it must stay untouched while the worker runs
  iovec.writeBigUInt64LE(koffi.address(buf), 0);
  iovec.writeBigUInt64LE(BigInt(buf.length), 8);
  // `buf` stays referenced by this frame until the call resolves, so its memory cannot move or go.
  let pwritev2: LibcFunction;
  try {
    pwritev2 = libc().pwritev2;
  } catch (err) {
    throw Object.assign(new Error(`pwritev2 is not available: ${(err as Error).message}`), { code: "ENOSYS" });
  }
  const n = await callAsync(pwritev2, [fd, iovec, 1, pos, flags], "pwritev2", `flags=${flags}`);
  void buf.length;
  return Number(n);
}

/**
 * sendfile(outFd, inFd, &position, count) on a worker thread: resolves with the bytes sent (0 at
 * the end of the file). On a non-blocking socket it rejects with code EAGAIN when the socket has
 * no room: the caller decides how to wait (never on a worker thread: they serve every device).
 */
export async function sendFileAsync(outFd: number, inFd: number, position: number, count: number): Promise<number> {
  const offset = Buffer.alloc(8); // one per call: the worker updates it
  offset.writeBigInt64LE(BigInt(position));
  const n = await callAsync(libc().sendfile, [outFd, inFd, offset, count], "sendfile", `${count} bytes at ${position}`);
  return Number(n);
}

const F_DUPFD_CLOEXEC = 1030;

/** A new descriptor for the same open file (close-on-exec), as fcntl(F_DUPFD_CLOEXEC). */
export function dupFd(fd: number): number {
  return check(libc().fcntlInt(fd, F_DUPFD_CLOEXEC, 0) as number, "fcntl", "F_DUPFD_CLOEXEC");
}

const F_SETFD = 2;
const FD_CLOEXEC = 1;

/**
 * Mark an inherited descriptor close-on-exec (systemd passes its sockets without the flag), so
 * that the processes udmd starts do not inherit it; those Node opens have it already.
 */
export function setCloseOnExec(fd: number): void {
  check(libc().fcntlInt(fd, F_SETFD, FD_CLOEXEC) as number, "fcntl", "F_SETFD");
}

const LOCK_EX = 2;
const LOCK_NB = 4;
const EWOULDBLOCK = 11;

/**
 * flock(fd, LOCK_EX | LOCK_NB): true when this open file now holds the exclusive lock, false when
 * another one does. The kernel drops the lock with the last descriptor of the open file, so a
 * process that dies, however it dies, releases it (a zombie no longer holds it).
 */
export function tryLockExclusive(fd: number): boolean {
  if (libc().flock(fd, LOCK_EX | LOCK_NB) === 0) return true;
  const errnum = lastErrno();
  if (errnum === EWOULDBLOCK) return false;
  throw new SyscallError("flock", errnum);
}
