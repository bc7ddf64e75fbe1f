/**
 * Errors of raw syscalls: SyscallError, shaped like Node's own fs errors, and the one errno
 * lookup (number to name, name to number, message). Names are the kernel's: libuv calls 95
 * ENOTSUP, the kernel EOPNOTSUPP.
 */
import koffi from "koffi";
import { libc } from "./libc.js";

/** A failed syscall: `code` is the errno name, `errno` is negative (libuv style). */
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

let names: Map<number, string> | null = null;

/** The kernel's name for errno `errnum` ("ENOENT"), or `E<number>` if unknown. */
export function errnoName(errnum: number): string {
  if (!names) {
    names = new Map();
    for (const [name, value] of Object.entries(koffi.os.errno)) {
      if (!names.has(value)) names.set(value, name);
    }
    names.set(koffi.os.errno.EOPNOTSUPP ?? 95, "EOPNOTSUPP");
  }
  return names.get(errnum) ?? `E${errnum}`;
}

/** The errno number of a name ("ENOENT" is 2); undefined for names that are not errnos. */
export function errnoNumber(name: string): number | undefined {
  return Object.hasOwn(koffi.os.errno, name) ? koffi.os.errno[name] : undefined;
}

/** strerror(3)'s text for `errnum`. */
export function errnoMessage(errnum: number): string {
  try {
    return libc().strerror(errnum) as string;
  } catch {
    return `errno ${errnum}`;
  }
}
