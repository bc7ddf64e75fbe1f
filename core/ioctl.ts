/**
 * Raw Linux syscalls Node does not expose, bound to libc through koffi: block-device ioctls,
 * fallocate(2) and the loop-device ioctls.
 *
 * Linux x86_64 only: the ioctl numbers, struct layouts and the trick of declaring the variadic
 * `ioctl` with fixed prototypes all assume the x86_64 SysV ABI. libc is bound lazily so importing
 * this module elsewhere works and only the first call fails, with a clear message.
 *
 * Calls that can touch the disk for a long time (BLKDISCARD, BLKZEROOUT, fallocate) have async
 * variants that run on koffi's worker threads; koffi restores the worker's errno on the main
 * thread before invoking the callback, so `koffi.errno()` is valid there too.
 */
import koffi from "koffi";

// ---- ioctl request numbers (asm-generic/ioctl.h: dir<<30 | size<<16 | type<<8 | nr) ----

const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;
const ioc = (dir: number, type: number, nr: number, size: number): number =>
  ((dir << 30) | (size << 16) | (type << 8) | nr) >>> 0;
export const _IO = (type: number, nr: number): number => ioc(IOC_NONE, type, nr, 0);
export const _IOR = (type: number, nr: number, size: number): number => ioc(IOC_READ, type, nr, size);
export const _IOW = (type: number, nr: number, size: number): number => ioc(IOC_WRITE, type, nr, size);

/** _IOR(0x12, 114, size_t) = 0x80081272: device size in bytes (u64 out). */
export const BLKGETSIZE64 = _IOR(0x12, 114, 8);
/** _IO(0x12, 104) = 0x1268: logical block size (int out). Historic: declared without a size. */
export const BLKSSZGET = _IO(0x12, 104);
/** _IO(0x12, 119) = 0x1277: discard a byte range (u64[2] in: offset, length). */
export const BLKDISCARD = _IO(0x12, 119);
/** _IO(0x12, 127) = 0x127f: zero a byte range (u64[2] in), never unmapping. */
export const BLKZEROOUT = _IO(0x12, 127);
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

// ---- errors ----

/** A failed syscall, shaped like Node's own fs errors (`errno` is negative, libuv style). */
export class SyscallError extends Error implements NodeJS.ErrnoException {
  readonly code: string;
  readonly errno: number;
  constructor(
    readonly syscall: string,
    errnum: number,
    what?: string,
  ) {
    const code = errnoName(errnum);
    super(`${syscall}${what ? ` ${what}` : ""}: ${code} (${errnoMessage(errnum)})`);
    this.name = "SyscallError";
    this.code = code;
    this.errno = -errnum;
  }
}

// Kernel names rather than libuv's: libuv calls 95 "ENOTSUP ... on socket", the kernel EOPNOTSUPP.
let errnoNames: Map<number, string> | null = null;

function errnoName(errnum: number): string {
  if (!errnoNames) {
    errnoNames = new Map();
    for (const [name, value] of Object.entries(koffi.os.errno)) {
      if (!errnoNames.has(value)) errnoNames.set(value, name);
    }
    errnoNames.set(koffi.os.errno.EOPNOTSUPP ?? 95, "EOPNOTSUPP");
  }
  return errnoNames.get(errnum) ?? `E${errnum}`;
}

function errnoMessage(errnum: number): string {
  try {
    return bind().strerror(errnum) as string;
  } catch {
    return `errno ${errnum}`;
  }
}

/** The calling thread's errno, as left by the last koffi call. */
export function lastErrno(): number {
  return koffi.errno();
}

// ---- libc binding ----

type Fn = ReturnType<ReturnType<typeof koffi.load>["func"]>;

export interface Libc {
  ioctlPtr: Fn;
  ioctlInt: Fn;
  fallocate: Fn;
  pwritev2: Fn;
  fcntlInt: Fn;
  getsockopt: Fn;
  setsockopt: Fn;
  sendfile: Fn;
  strerror: Fn;
}

let libc: Libc | null = null;

export function libcTable(): Libc {
  return bind();
}

function bind(): Libc {
  if (libc) return libc;
  if (process.platform !== "linux" || process.arch !== "x64") {
    throw new Error(`udm syscall bindings support Linux x86_64 only (this is ${process.platform}/${process.arch})`);
  }
  const lib = koffi.load("libc.so.6");
  // ioctl is variadic, but koffi cannot call variadic functions asynchronously. On x86_64 a fixed
  // prototype passes integer/pointer arguments in the same registers, so one binding per argument
  // shape is safe.
  libc = {
    ioctlPtr: lib.func("ioctl", "int", ["int", "unsigned long", "void *"]),
    ioctlInt: lib.func("ioctl", "int", ["int", "unsigned long", "unsigned long"]),
    fallocate: lib.func("fallocate", "int", ["int", "int", "int64_t", "int64_t"]),
    pwritev2: lib.func("pwritev2", "int64_t", ["int", "void *", "int", "int64_t", "int"]),
    // fcntl is variadic; like ioctl above, a fixed int prototype is safe on x86_64.
    fcntlInt: lib.func("fcntl", "int", ["int", "int", "int"]),
    getsockopt: lib.func("getsockopt", "int", ["int", "int", "int", "void *", "void *"]),
    setsockopt: lib.func("setsockopt", "int", ["int", "int", "int", "void *", "uint32_t"]),
    sendfile: lib.func("sendfile", "int64_t", ["int", "int", "void *", "size_t"]),
    // Only called on the main thread, so strerror's static buffer is not shared.
    strerror: lib.func("strerror", "str", ["int"]),
  };
  return libc;
}

export function check(ret: number, syscall: string, what?: string): number {
  if (ret < 0) throw new SyscallError(syscall, lastErrno(), what);
  return ret;
}

// koffi refuses (throws) beyond 256 concurrent async calls; queue instead of failing I/O.
const MAX_ASYNC = 64;
let asyncRunning = 0;
const asyncQueue: (() => void)[] = [];

export function callAsync(fn: Fn, args: unknown[], syscall: string, what: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const start = () => {
      asyncRunning++;
      const done = (err: unknown, ret: number) => {
        // Read errno before anything else can run a koffi call on this thread.
        const errnum = ret < 0 ? lastErrno() : 0;
        asyncRunning--;
        asyncQueue.shift()?.();
        if (err) reject(err);
        else if (ret < 0) reject(new SyscallError(syscall, errnum, what));
        else resolve(ret);
      };
      try {
        fn.async(...args, done);
      } catch (err) {
        done(err, -1);
      }
    };
    if (asyncRunning < MAX_ASYNC) start();
    else asyncQueue.push(start);
  });
}

function rangeArg(offset: number, length: number): Buffer {
  const range = Buffer.alloc(16);
  range.writeBigUInt64LE(BigInt(offset), 0);
  range.writeBigUInt64LE(BigInt(length), 8);
  return range;
}

// ---- block device ioctls ----

/** Device size in bytes. */
export function blkGetSize64(fd: number): number {
  const out = Buffer.alloc(8);
  check(bind().ioctlPtr(fd, BLKGETSIZE64, out), "ioctl", "BLKGETSIZE64");
  return Number(out.readBigUInt64LE(0));
}

/** Logical block size in bytes. */
export function blkSszGet(fd: number): number {
  const out = Buffer.alloc(4);
  check(bind().ioctlPtr(fd, BLKSSZGET, out), "ioctl", "BLKSSZGET");
  return out.readInt32LE(0);
}

export function blkDiscard(fd: number, offset: number, length: number): void {
  check(bind().ioctlPtr(fd, BLKDISCARD, rangeArg(offset, length)), "ioctl", "BLKDISCARD");
}

export async function blkDiscardAsync(fd: number, offset: number, length: number): Promise<void> {
  await callAsync(bind().ioctlPtr, [fd, BLKDISCARD, rangeArg(offset, length)], "ioctl", "BLKDISCARD");
}

export function blkZeroOut(fd: number, offset: number, length: number): void {
  check(bind().ioctlPtr(fd, BLKZEROOUT, rangeArg(offset, length)), "ioctl", "BLKZEROOUT");
}

export async function blkZeroOutAsync(fd: number, offset: number, length: number): Promise<void> {
  await callAsync(bind().ioctlPtr, [fd, BLKZEROOUT, rangeArg(offset, length)], "ioctl", "BLKZEROOUT");
}

// ---- fallocate ----

export function fallocate(fd: number, mode: number, offset: number, length: number): void {
  check(bind().fallocate(fd, mode, offset, length), "fallocate", `mode=${mode}`);
}

export async function fallocateAsync(fd: number, mode: number, offset: number, length: number): Promise<void> {
  await callAsync(bind().fallocate, [fd, mode, offset, length], "fallocate", `mode=${mode}`);
}

// ---- memory ----

/** Address of a Buffer's first byte (Node Buffers' backing stores never move). */
export function bufferAddress(buf: Buffer): bigint {
  return koffi.address(buf);
}

// ---- socket peer credentials ----

const SOL_SOCKET = 1;
const SO_PEERCRED = 17;

/** getsockopt(SO_PEERCRED) on a connected unix socket: who is on the other end. */
export function peerCredentials(fd: number): { pid: number; uid: number; gid: number } {
  const { getsockopt } = bind();
  const ucred = Buffer.alloc(12); // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
  const len = Buffer.alloc(4);
  len.writeUInt32LE(12);
  check(getsockopt(fd, SOL_SOCKET, SO_PEERCRED, ucred, len) as number, "getsockopt", "SO_PEERCRED");
  return { pid: ucred.readInt32LE(0), uid: ucred.readUInt32LE(4), gid: ucred.readUInt32LE(8) };
}

// ---- file descriptors ----

const F_DUPFD_CLOEXEC = 1030;

/** A new descriptor for the same open file (close-on-exec), as fcntl(F_DUPFD_CLOEXEC). */
export function dupFd(fd: number): number {
  return check(bind().fcntlInt(fd, F_DUPFD_CLOEXEC, 0) as number, "fcntl", "F_DUPFD_CLOEXEC");
}

// ---- writes with per-call flags ----

export const RWF_DSYNC = 0x02;

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
  let pwritev2: Fn;
  try {
    pwritev2 = bind().pwritev2;
  } catch (err) {
    throw Object.assign(new Error(`pwritev2 is not available: ${(err as Error).message}`), { code: "ENOSYS" });
  }
  const n = await callAsync(pwritev2, [fd, iovec, 1, pos, flags], "pwritev2", `flags=${flags}`);
  void buf.length;
  return Number(n);
}

// ---- sending file data ----

/**
 * sendfile(outFd, inFd, &position, count) on a worker thread: resolves with the bytes sent (0 at
 * the end of the file). On a non-blocking socket it rejects with code EAGAIN when the socket has
 * no room: the caller decides how to wait (never on a worker thread: they serve every device).
 */
export async function sendFileAsync(outFd: number, inFd: number, position: number, count: number): Promise<number> {
  const { sendfile } = bind();
  const offset = Buffer.alloc(8); // one per call: the worker updates it
  offset.writeBigInt64LE(BigInt(position));
  const n = await callAsync(sendfile, [outFd, inFd, offset, count], "sendfile", `${count} bytes at ${position}`);
  return Number(n);
}

const SO_SNDBUF = 7;

/**
 * Ask for a socket send buffer of `bytes` (SO_SNDBUF; the kernel doubles the value for its own
 * bookkeeping and caps it at net.core.wmem_max). Returns the size the kernel granted.
 */
export function setSendBuffer(fd: number, bytes: number): number {
  const { getsockopt, setsockopt } = bind();
  const value = Buffer.alloc(4);
  value.writeInt32LE(bytes);
  check(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, value, 4) as number, "setsockopt", "SO_SNDBUF");
  const len = Buffer.alloc(4);
  len.writeUInt32LE(4);
  check(getsockopt(fd, SOL_SOCKET, SO_SNDBUF, value, len) as number, "getsockopt", "SO_SNDBUF");
  return value.readInt32LE(0);
}
