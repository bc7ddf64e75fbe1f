/**
 * Inline (main-thread) reads for buffered file descriptors: what the page cache holds is read in
 * the calling thread instead of through libuv's thread pool.
 *
 * Why: handing a small read to the pool costs the event loop more than the read itself (a mutex,
 * a futex wake-up of a worker, which on a small machine often preempts the loop, and a second
 * wake-up to deliver the completion); a page-cache hit served inline costs a fraction of that.
 * bench/results.md has the measurements.
 *
 * preadv2(RWF_NOWAIT) returns EAGAIN (or a short count) instead of waiting for the disk, so an
 * inline read never blocks the event loop; FdDevice sends the rest to the pool.
 *
 * Writes stay in the pool: buffered writes have no such flag on ext4 (EOPNOTSUPP), and inline
 * they measured slower, as a page-cache write costs the kernel far more than a read and the pool
 * runs it on another core.
 */
import { RWF_NOWAIT, preadFlags } from "../sys/file.js";

const EAGAIN = 11;

/** The default of `io.inlineReads`: where the preadv2 binding exists (Linux x86_64). */
export function inlineReadsSupported(): boolean {
  return process.platform === "linux" && process.arch === "x64";
}

/**
 * Read into `buf` at `pos` from the page cache only. Returns the number of bytes read (fewer than
 * asked, down to 0, when not all of it is cached or the file ends), or a negative errno for an
 * error other than EAGAIN. Never waits for the disk.
 */
export function readCached(fd: number, buf: Buffer, pos: number): number {
  const n = preadFlags(fd, buf, pos, RWF_NOWAIT);
  return n === -EAGAIN ? 0 : n;
}
