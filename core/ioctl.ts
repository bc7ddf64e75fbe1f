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
/** 0x4C00: bind the loop device to the file descriptor passed as the argument. */
export const LOOP_SET_FD = 0x4c00;
/** 0x4C01: unbind (or, while others hold it open, mark for autoclear). */
export const LOOP_CLR_FD = 0x4c01;
/** 0x4C04: set struct loop_info64 (flags, name) after LOOP_SET_FD. */
export const LOOP_SET_STATUS64 = 0x4c04;
/** 0x4C0A (Linux 5.8+): LOOP_SET_FD + LOOP_SET_STATUS64 in one atomic step. */
export const LOOP_CONFIGURE = 0x4c0a;
/** 0x4C82, on /dev/loop-control: returns the number of a free loop device (allocating one). */
export const LOOP_CTL_GET_FREE = 0x4c82;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export const LO_FLAGS_READ_ONLY = 1;
export const LO_FLAGS_AUTOCLEAR = 4;
export const LO_FLAGS_PARTSCAN = 8;
export const LO_FLAGS_DIRECT_IO = 16;

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

/** struct loop_info64 (linux/loop.h), 232 bytes. */
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

/** struct loop_config (linux/loop.h), 304 bytes. */
const LoopConfig = koffi.struct({
  fd: "uint32_t",
  block_size: "uint32_t",
  info: LoopInfo64,
  __reserved: koffi.array("uint64_t", 8),
});

type Fn = ReturnType<ReturnType<typeof koffi.load>["func"]>;

interface Libc {
  ioctlPtr: Fn;
  ioctlInt: Fn;
  ioctlLoopConfig: Fn;
  ioctlLoopInfo: Fn;
  fallocate: Fn;
  pwritev2: Fn;
  fcntlInt: Fn;
  getsockopt: Fn;
  setsockopt: Fn;
  sendfile: Fn;
  strerror: Fn;
}

let libc: Libc | null = null;

function bind(): Libc {
  if (libc) return libc;
  if (process.platform !== "linux" || process.arch !== "x64") {
    throw new Error(`udm syscall bindings support Linux x86_64 only (this is ${process.platform}/${process.arch})`);
  }
  if (koffi.sizeof(LoopInfo64) !== 232 || koffi.sizeof(LoopConfig) !== 304) {
    throw new Error("udm: unexpected struct loop_info64/loop_config layout");
  }
  const lib = koffi.load("libc.so.6");
  // ioctl is variadic, but koffi cannot call variadic functions asynchronously. On x86_64 a fixed
  // prototype passes integer/pointer arguments in the same registers, so one binding per argument
  // shape is safe.
  libc = {
    ioctlPtr: lib.func("ioctl", "int", ["int", "unsigned long", "void *"]),
    ioctlInt: lib.func("ioctl", "int", ["int", "unsigned long", "unsigned long"]),
    ioctlLoopConfig: lib.func("ioctl", "int", ["int", "unsigned long", koffi.pointer(LoopConfig)]),
    ioctlLoopInfo: lib.func("ioctl", "int", ["int", "unsigned long", koffi.pointer(LoopInfo64)]),
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

function check(ret: number, syscall: string, what?: string): number {
  if (ret < 0) throw new SyscallError(syscall, lastErrno(), what);
  return ret;
}

// koffi refuses (throws) beyond 256 concurrent async calls; queue instead of failing I/O.
const MAX_ASYNC = 64;
let asyncRunning = 0;
const asyncQueue: (() => void)[] = [];

function callAsync(fn: Fn, args: unknown[], syscall: string, what: string): Promise<number> {
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

// ---- loop devices ----

export interface LoopInfo {
  /** LO_FLAGS_* bits. */
  flags?: number;
  /** Recorded for `losetup -l` display; truncated to 63 bytes. */
  fileName?: string;
  /** Byte offset into the backing file. */
  offset?: number;
  /** Size limit in bytes, 0 = whole file. */
  sizeLimit?: number;
}

function loopInfo64(info: LoopInfo): Record<string, unknown> {
  const name = new Uint8Array(64);
  name.set(Buffer.from(info.fileName ?? "").subarray(0, 63));
  return {
    lo_device: 0,
    lo_inode: 0,
    lo_rdevice: 0,
    lo_offset: info.offset ?? 0,
    lo_sizelimit: info.sizeLimit ?? 0,
    lo_number: 0,
    lo_encrypt_type: 0,
    lo_encrypt_key_size: 0,
    lo_flags: info.flags ?? 0,
    lo_file_name: Array.from(name),
    lo_crypt_name: new Array(64).fill(0),
    lo_encrypt_key: new Array(32).fill(0),
    lo_init: [0, 0],
  };
}

/** On an fd of /dev/loop-control: the number N of a free /dev/loopN. */
export function loopCtlGetFree(controlFd: number): number {
  return check(bind().ioctlInt(controlFd, LOOP_CTL_GET_FREE, 0), "ioctl", "LOOP_CTL_GET_FREE");
}

/**
 * Bind loop device `loopFd` to backing file `backingFd`. Uses LOOP_CONFIGURE; kernels before 5.8
 * reject it with EINVAL, and then LOOP_SET_FD + LOOP_SET_STATUS64 does the same in two steps.
 */
export function loopConfigure(loopFd: number, backingFd: number, info: LoopInfo = {}, blockSize = 0): void {
  const config = { fd: backingFd, block_size: blockSize, info: loopInfo64(info), __reserved: new Array(8).fill(0) };
  if (bind().ioctlLoopConfig(loopFd, LOOP_CONFIGURE, config) === 0) return;
  const errnum = lastErrno();
  if (errnum !== koffi.os.errno.EINVAL && errnum !== koffi.os.errno.ENOTTY) {
    throw new SyscallError("ioctl", errnum, "LOOP_CONFIGURE");
  }
  if (blockSize !== 0) throw new SyscallError("ioctl", errnum, "LOOP_CONFIGURE (block size needs Linux 5.8+)");
  loopSetFdLegacy(loopFd, backingFd, info);
}

/** The pre-5.8 two-step bind. Not atomic: the device briefly exists with default status. */
export function loopSetFdLegacy(loopFd: number, backingFd: number, info: LoopInfo = {}): void {
  const lc = bind();
  check(lc.ioctlInt(loopFd, LOOP_SET_FD, backingFd), "ioctl", "LOOP_SET_FD");
  if (lc.ioctlLoopInfo(loopFd, LOOP_SET_STATUS64, loopInfo64(info)) !== 0) {
    const err = new SyscallError("ioctl", lastErrno(), "LOOP_SET_STATUS64");
    lc.ioctlInt(loopFd, LOOP_CLR_FD, 0);
    throw err;
  }
}

/** Unbind a loop device (deferred by the kernel until the last opener closes it). */
export function loopClrFd(loopFd: number): void {
  check(bind().ioctlInt(loopFd, LOOP_CLR_FD, 0), "ioctl", "LOOP_CLR_FD");
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
