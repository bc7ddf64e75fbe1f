/**
 * Inline (main-thread) reads for buffered file descriptors: what the page cache holds is read in
 * the calling thread instead of through libuv's thread pool.
 *
 * Why: handing a 4 KiB read to the pool costs the event loop more than the read itself (a mutex,
 * a futex wake-up of a worker that on 2 cores often preempts the loop, and a second wake-up to
 * deliver the completion): about 5 µs of main-thread CPU against ~1.2 µs for a page-cache hit
 * served inline. Over NBD this took 4 KiB random reads from ~70k to ~200k IOPS (bench/results.md).
 *
 * preadv2(RWF_NOWAIT) returns EAGAIN (or a short count) instead of waiting for the disk, so an
 * inline read never blocks the event loop; FdDevice sends the rest to the pool.
 *
 * Writes stay in the pool. Buffered writes have no such flag on ext4 (EOPNOTSUPP), and measured
 * inline they were slower, not faster (62–67k vs 82–107k IOPS for 4 KiB random writes over NBD):
 * a page-cache write costs the kernel far more than a read, and the pool runs it on the other core.
 *
 * `UDM_INLINE_IO=0` in the environment turns inline reads off (every read goes to the pool).
 */
import { RWF_NOWAIT, preadFlags } from "../sys/file.js";

const EAGAIN = 11;

let enabled: boolean | null = null;

/** Inline reads are on unless UDM_INLINE_IO=0 (read at the first device open). */
export function inlineReadsEnabled(): boolean {
  enabled ??= process.env.UDM_INLINE_IO !== "0" && process.platform === "linux" && process.arch === "x64";
  return enabled;
}

/** For tests and benchmarks: force inline reads on or off for devices opened from now on (null: back to the environment). */
export function setInlineReads(on: boolean | null): void {
  enabled = on;
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
