/**
 * The one binding of libc (koffi): the functions udm calls that Node does not expose, the check
 * that turns a failed call into a SyscallError, and the async call helper that runs a call on
 * koffi's worker threads.
 *
 * Linux x86_64 only: ioctl numbers, struct layouts and declaring the variadic `ioctl` and
 * `fcntl` with fixed prototypes all assume the x86_64 SysV ABI. libc is bound lazily, so
 * importing this module elsewhere works and only the first call fails, with a clear message.
 */
import koffi, { type LibraryHandle } from "koffi";
import { SyscallError } from "./errors.js";

export type LibcFunction = ReturnType<LibraryHandle["func"]>;

export interface Libc {
  ioctlPtr: LibcFunction;
  ioctlInt: LibcFunction;
  fallocate: LibcFunction;
  preadv2: LibcFunction;
  pwritev2: LibcFunction;
  fcntlInt: LibcFunction;
  flock: LibcFunction;
  getrlimit: LibcFunction;
  sendfile: LibcFunction;
  socket: LibcFunction;
  connect: LibcFunction;
  getsockopt: LibcFunction;
  getsockname: LibcFunction;
  setsockopt: LibcFunction;
  read: LibcFunction;
  write: LibcFunction;
  close: LibcFunction;
  strerror: LibcFunction;
  prctl: LibcFunction;
}

let library: LibraryHandle | null = null;
let table: Libc | null = null;

function load(): LibraryHandle {
  if (library) return library;
  if (process.platform !== "linux" || process.arch !== "x64") {
    throw new Error(`udm syscall bindings support Linux x86_64 only (this is ${process.platform}/${process.arch})`);
  }
  library = koffi.load("libc.so.6");
  return library;
}

/** The libc functions, bound at the first call (per thread: each worker has its own). */
export function libc(): Libc {
  if (table) return table;
  const lib = load();
  // ioctl and fcntl are variadic, but koffi cannot call variadic functions asynchronously. On
  // x86_64 a fixed prototype passes integer/pointer arguments in the same registers, so one
  // binding per argument shape is safe.
  table = {
    ioctlPtr: lib.func("ioctl", "int", ["int", "unsigned long", "void *"]),
    ioctlInt: lib.func("ioctl", "int", ["int", "unsigned long", "unsigned long"]),
    fallocate: lib.func("fallocate", "int", ["int", "int", "int64_t", "int64_t"]),
    preadv2: lib.func("preadv2", "int64_t", ["int", "void *", "int", "int64_t", "int"]),
    pwritev2: lib.func("pwritev2", "int64_t", ["int", "void *", "int", "int64_t", "int"]),
    fcntlInt: lib.func("fcntl", "int", ["int", "int", "int"]),
    flock: lib.func("flock", "int", ["int", "int"]),
    getrlimit: lib.func("getrlimit", "int", ["int", "void *"]),
    sendfile: lib.func("sendfile", "int64_t", ["int", "int", "void *", "size_t"]),
    socket: lib.func("socket", "int", ["int", "int", "int"]),
    connect: lib.func("connect", "int", ["int", "void *", "uint32_t"]),
    getsockopt: lib.func("getsockopt", "int", ["int", "int", "int", "void *", "void *"]),
    getsockname: lib.func("getsockname", "int", ["int", "void *", "void *"]),
    setsockopt: lib.func("setsockopt", "int", ["int", "int", "int", "void *", "uint32_t"]),
    read: lib.func("read", "long", ["int", "void *", "size_t"]),
    write: lib.func("write", "long", ["int", "void *", "size_t"]),
    close: lib.func("close", "int", ["int"]),
    // Known errnos get static strings; only unknown ones use a buffer (thread-local since glibc 2.32).
    strerror: lib.func("strerror", "str", ["int"]),
    // Variadic in the header; every option udm uses takes one unsigned long.
    prctl: lib.func("prctl", "int", ["int", "unsigned long", "unsigned long", "unsigned long", "unsigned long"]),
  };
  return table;
}

/** Bind a libc function the table above does not have (tests: posix_fadvise). */
export function libcFunction(name: string, result: string, params: string[]): LibcFunction {
  return load().func(name, result, params);
}

/** The calling thread's errno, as left by the last koffi call. */
export function lastErrno(): number {
  return koffi.errno();
}

/** `ret`, or a SyscallError with errno if it is negative. */
export function check(ret: number, syscall: string, what?: string): number {
  if (ret < 0) throw new SyscallError(syscall, lastErrno(), what);
  return ret;
}

// koffi refuses (throws) beyond 256 concurrent async calls; queue instead of failing I/O.
const MAX_ASYNC = 64;
let asyncRunning = 0;
const asyncQueue: (() => void)[] = [];

/**
 * `fn(...args)` on one of koffi's worker threads, for calls that can take long (the disk, the
 * kernel fsyncing a file). Resolves with the result; a negative one rejects with a SyscallError.
 * koffi restores the worker's errno on the main thread before the callback, so errno is valid.
 */
export function callAsync(fn: LibcFunction, args: unknown[], syscall: string, what: string): Promise<number> {
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
