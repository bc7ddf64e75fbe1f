/**
 * Resource limits Node does not expose: getrlimit(2) for RLIMIT_NOFILE, the number of
 * descriptors the process may hold. Node raises the soft limit to the hard one at start-up, so
 * the soft limit read here is the one in force.
 */
import { check, libc } from "./libc.js";

const RLIMIT_NOFILE = 7;
const RLIM_INFINITY = 0xffffffffffffffffn;

export interface ResourceLimit {
  /** The limit in force; Infinity for RLIM_INFINITY. */
  soft: number;
  /** The ceiling the soft limit may be raised to; Infinity for RLIM_INFINITY. */
  hard: number;
}

/** getrlimit(RLIMIT_NOFILE): how many descriptors this process may have open. */
export function openFileLimit(): ResourceLimit {
  const rlimit = Buffer.alloc(16); // struct rlimit { rlim_t rlim_cur; rlim_t rlim_max; }
  check(libc().getrlimit(RLIMIT_NOFILE, rlimit) as number, "getrlimit", "RLIMIT_NOFILE");
  const value = (v: bigint): number => (v === RLIM_INFINITY ? Infinity : Number(v));
  return { soft: value(rlimit.readBigUInt64LE(0)), hard: value(rlimit.readBigUInt64LE(8)) };
}

const PR_SET_PDEATHSIG = 1;

/**
 * prctl(PR_SET_PDEATHSIG): the kernel sends `signal` to this process when the thread that forked
 * it exits (nbdkit's --exit-with-parent). Returns false if the parent is already gone, which the
 * kernel would never report: `parentPid` is the parent as first seen (process.ppid at start).
 */
export function exitWithParent(signal: number, parentPid: number): boolean {
  check(libc().prctl(PR_SET_PDEATHSIG, signal, 0, 0, 0) as number, "prctl", "PR_SET_PDEATHSIG");
  return process.ppid === parentPid;
}
