/**
 * Zero-copy reads. A submitter that can send file data on its own (the NBD server, with
 * sendfile(2)) attaches a `FileRangeRead` to a read bio. The bio goes through the mapped devices
 * as usual, but where every layer only remaps it (targets that declare `zeroCopyReads`) the file
 * device at the bottom does not copy the data into `bio.data`: it records which file, where, and
 * completes. The submitter then sends those ranges straight from the page cache, and the parts no
 * file device took (a `zero` target, a memory device, a target that looks at read data) from the
 * bio's buffer as usual.
 *
 * Why: a 1 MiB read otherwise costs two copies in the server (page cache → buffer → socket); with
 * sendfile into a unix socket the kernel passes page references instead (bench/results.md).
 *
 * Each range holds its own duplicate of the file descriptor, so closing or replacing the device
 * while the submitter is still sending cannot point the send at another file.
 */
import fs from "node:fs";

export interface FileRange {
  /** Byte offset of this range within the bio's data. */
  readonly offset: number;
  readonly length: number;
  /** A duplicate descriptor owned by this range; closed by `release`. */
  readonly fd: number;
  /** Byte position in that file. */
  readonly position: number;
}

/**
 * Descriptors all FileRangeReads of this process may hold at once. Each range holds one until it
 * is sent; past this many, reads are copied instead, so that many connections with many large
 * reads in flight cannot use up the descriptor limit (accept and open would then fail).
 */
export const MAX_OPEN_RANGES = 256;
let openRanges = 0;

/** Range descriptors held right now, process-wide (for tests and diagnostics). */
export function openRangeCount(): number {
  return openRanges;
}

/** A buffer slice or a file range, in the order they make up the read. */
export type ReadSegment = Buffer | FileRange;

export class FileRangeRead {
  private list: FileRange[] = [];

  /**
   * @param base the read bio's own data buffer: ranges are located by where a clone's data view
   *   lies in it.
   * @param minLength smaller pieces are read into the buffer (one send each would cost more than
   *   the copy).
   * @param dup duplicates a descriptor (fcntl F_DUPFD_CLOEXEC in the server).
   */
  constructor(
    readonly base: Buffer,
    private readonly minLength: number,
    private readonly dup: (fd: number) => number,
  ) {}

  get ranges(): readonly FileRange[] {
    return this.list;
  }

  /**
   * Called by a file device for a read clone whose data is `data` (a view of `base`): record that
   * it lies in `fd` at `position` instead of reading it. False when it cannot (not a view of
   * `base`, too small, overlaps a range already taken, no descriptor left): the device then reads
   * into `data` as usual.
   */
  take(data: Buffer, fd: number, position: number): boolean {
    if (data.length < this.minLength || data.buffer !== this.base.buffer) return false;
    const offset = data.byteOffset - this.base.byteOffset;
    if (offset < 0 || offset + data.length > this.base.length) return false;
    if (this.list.some((r) => offset < r.offset + r.length && r.offset < offset + data.length)) return false;
    if (openRanges >= MAX_OPEN_RANGES) return false;
    let copy: number;
    try {
      copy = this.dup(fd);
    } catch {
      return false; // EMFILE and the like: copying is slower but works
    }
    openRanges++;
    this.list.push({ offset, length: data.length, fd: copy, position });
    return true;
  }

  /** The read, in order: buffer slices for what no file device took, and the file ranges. */
  segments(): ReadSegment[] {
    const sorted = [...this.list].sort((a, b) => a.offset - b.offset);
    const out: ReadSegment[] = [];
    let at = 0;
    for (const r of sorted) {
      if (r.offset > at) out.push(this.base.subarray(at, r.offset));
      out.push(r);
      at = r.offset + r.length;
    }
    if (at < this.base.length) out.push(this.base.subarray(at));
    return out;
  }

  /**
   * Close the descriptors of the ranges and forget them: all of them (the submitter, done), or
   * only those inside `within`, a view of `base` (a bio requeued in a stacked device is mapped
   * afresh, while the other parts of the read keep the ranges they took).
   */
  release(within?: Buffer): void {
    const from = within ? within.byteOffset - this.base.byteOffset : 0;
    const to = within ? from + within.length : this.base.length;
    const keep: FileRange[] = [];
    for (const r of this.list) {
      if (r.offset < from || r.offset >= to) {
        keep.push(r);
        continue;
      }
      openRanges--;
      try {
        fs.closeSync(r.fd);
      } catch {
        // already closed: nothing to give back
      }
    }
    this.list = keep;
  }
}
