/**
 * The bytes of one event-loop turn's requests, in as few buffers as possible: headers, and the
 * payloads of small WRITEs, are written one after another into an arena; a large WRITE's payload
 * goes as a buffer of its own (the bio's memory, never copied). A turn of sixteen 4 KiB reads then
 * leaves as one buffer in one socket write, instead of sixteen header buffers corked into a writev
 * (every write() costs the stream machinery an allocation or two and a callback, and every header
 * an allocation of its own); a 1 MiB WRITE as two buffers, its header and its payload.
 *
 * Bytes handed out by `take` are never written again (the socket may still hold them): the arena
 * only fills forward, and a new one is allocated when it is full.
 */
import {
  EXTENDED_REQUEST_HEADER_LENGTH,
  REQUEST_HEADER_LENGTH,
  writeExtendedRequestHeader,
  writeRequestHeader,
} from "./wire.js";

/** WRITE payloads up to this size are copied next to their header (a copy costs less than a write() of its own). */
export const COPY_LIMIT = 16 * 1024;
const ARENA_BYTES = 256 * 1024;

export class RequestBatch {
  private arena: Buffer;
  /** Bytes of the arena written; [sealed, used) is not handed out yet. */
  private used = 0;
  private sealed = 0;
  private segments: Buffer[] = [];
  private readonly headerLength: number;
  private readonly write: typeof writeRequestHeader;

  constructor(
    /** NBD_OPT_EXTENDED_HEADERS was negotiated: 32-byte headers with 64-bit lengths. */
    extended: boolean,
    private readonly arenaBytes = ARENA_BYTES,
  ) {
    this.headerLength = extended ? EXTENDED_REQUEST_HEADER_LENGTH : REQUEST_HEADER_LENGTH;
    this.write = extended ? writeExtendedRequestHeader : writeRequestHeader;
    this.arena = Buffer.allocUnsafeSlow(arenaBytes);
  }

  /** Nothing added since the last `take`. */
  get empty(): boolean {
    return this.segments.length === 0 && this.used === this.sealed;
  }

  /** A request: its header, then `payload` (a WRITE's, exactly `length` bytes) if any. */
  add(cmd: number, flags: number, cookie: number, offset: number, length: number, payload: Buffer | null): void {
    const copy = payload !== null && payload.length <= COPY_LIMIT;
    const need = this.headerLength + (copy ? payload.length : 0);
    if (this.arena.length - this.used < need) {
      this.seal();
      this.arena = Buffer.allocUnsafeSlow(Math.max(this.arenaBytes, need));
      this.used = this.sealed = 0;
    }
    this.write(this.arena, this.used, cmd, flags, cookie, offset, length);
    this.used += this.headerLength;
    if (payload === null) return;
    if (copy) {
      this.used += payload.copy(this.arena, this.used);
      return;
    }
    this.seal();
    this.segments.push(payload);
  }

  /** What to write, in order; the batch is empty afterwards. */
  take(): Buffer[] {
    this.seal();
    const segments = this.segments;
    this.segments = [];
    return segments;
  }

  private seal(): void {
    if (this.used === this.sealed) return;
    this.segments.push(this.arena.subarray(this.sealed, this.used));
    this.sealed = this.used;
  }
}
