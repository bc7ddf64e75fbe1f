/**
 * Writes the server acknowledged but no FLUSH has covered yet, kept so they can be sent again.
 *
 * A server that advertises NBD_FLAG_SEND_FLUSH has a volatile cache: an acknowledged write is only
 * safe once a FLUSH the server received after it is acknowledged (proto.md, "Ordering of messages
 * and writes"). If every connection to it is lost, the server may have restarted and lost such
 * writes while the submitter has long been told they are done. So the device copies each write as
 * it is acknowledged, drops the copies a FLUSH covers, and after reconnecting writes what is left
 * again before anything else (nbd-device.ts).
 *
 * The copies form a map of byte ranges where a later write replaces what it overlaps, so what is
 * sent again is what the device held last, never an older version. A FUA write or a TRIM removes
 * its range (its data is durable, or may read back as anything). The map holds at most
 * `limitBytes`; beyond that it is emptied and stops recording until a FLUSH covers the writes it
 * missed: a connection lost meanwhile cannot be repaired, and the device then fails the next FLUSH
 * with EIO rather than claim durability it cannot vouch for.
 */

export interface UnflushedExtent {
  /** Byte offset and end. */
  start: number;
  end: number;
  /** The bytes, or null for a range written with WRITE_ZEROES. */
  data: Buffer | null;
  /** Acknowledgement number of the write that left these bytes. */
  seq: number;
}

export class UnflushedWrites {
  private extents: UnflushedExtent[] = [];
  private held = 0;
  private acks = 0;
  /** Nonzero: writes acknowledged up to this number were not recorded. */
  private missedUpTo = 0;

  constructor(readonly limitBytes: number) {}

  /** Bytes of data held. */
  get bytes(): number {
    return this.held;
  }

  get count(): number {
    return this.extents.length;
  }

  /** The acknowledgement number now: a FLUSH sent now covers everything up to it. */
  get mark(): number {
    return this.acks;
  }

  /** Some acknowledged writes were not recorded (the limit was reached) and no FLUSH covered them yet. */
  get incomplete(): boolean {
    return this.missedUpTo > 0;
  }

  /** A WRITE was acknowledged: keep a copy of `data` (copied now: the submitter gets its buffer back). */
  written(offset: number, data: Buffer): void {
    this.record(offset, offset + data.length, data);
  }

  /** A WRITE_ZEROES was acknowledged. */
  zeroed(offset: number, length: number): void {
    this.record(offset, offset + length, null);
  }

  /** A FUA write or a TRIM was acknowledged: nothing older in its range needs sending again. */
  forget(offset: number, length: number): void {
    this.acks++;
    this.cut(offset, offset + length);
  }

  /** A FLUSH sent at `mark` was acknowledged: everything acknowledged before it is durable. */
  flushed(mark: number): void {
    if (this.missedUpTo > 0 && this.missedUpTo <= mark) this.missedUpTo = 0;
    const keep = this.extents.filter((e) => e.seq > mark);
    if (keep.length === this.extents.length) return;
    this.extents = keep;
    this.held = keep.reduce((n, e) => n + (e.data ? e.data.length : 0), 0);
  }

  /** What to send again, in offset order (the ranges do not overlap). */
  pending(): readonly UnflushedExtent[] {
    return this.extents;
  }

  /** Forget that some writes were missed (the device has reported it). */
  clearMissed(): void {
    this.missedUpTo = 0;
  }

  private record(start: number, end: number, data: Buffer | null): void {
    const seq = ++this.acks;
    if (this.missedUpTo > 0) {
      this.missedUpTo = seq;
      this.cut(start, end); // an older copy must not be sent over this newer write
      return;
    }
    const bytes = data ? data.length : 0;
    if (this.held + bytes > this.limitBytes) {
      this.extents = [];
      this.held = 0;
      this.missedUpTo = seq;
      return;
    }
    const at = this.cut(start, end);
    const copy = data ? copyOf(data) : null;
    this.extents.splice(at, 0, { start, end, data: copy, seq });
    this.held += bytes;
  }

  /** Remove [start, end) from every extent; returns where an extent starting at `start` goes. */
  private cut(start: number, end: number): number {
    // First extent that ends after `start`.
    let lo = 0;
    let hi = this.extents.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.extents[mid]!.end <= start) lo = mid + 1;
      else hi = mid;
    }
    const replaced: UnflushedExtent[] = [];
    let i = lo;
    for (; i < this.extents.length && this.extents[i]!.start < end; i++) {
      const e = this.extents[i]!;
      this.held -= e.data ? e.data.length : 0;
      if (e.start < start) replaced.push(this.piece(e, e.start, start));
      if (e.end > end) replaced.push(this.piece(e, end, e.end));
    }
    this.extents.splice(lo, i - lo, ...replaced);
    // The left remainder (if any) stays before the new range.
    return lo + (replaced.length > 0 && replaced[0]!.start < start ? 1 : 0);
  }

  /** [from, to) of `e`, its bytes copied so a small remainder does not keep a large buffer alive. */
  private piece(e: UnflushedExtent, from: number, to: number): UnflushedExtent {
    const data = e.data ? copyOf(e.data.subarray(from - e.start, to - e.start)) : null;
    this.held += data ? data.length : 0;
    return { start: from, end: to, data, seq: e.seq };
  }
}

/** A copy by memcpy (Buffer.from(buffer) goes through the typed-array constructor, slower at 1 MiB). */
function copyOf(data: Buffer): Buffer {
  const copy = Buffer.allocUnsafe(data.length);
  data.copy(copy);
  return copy;
}
