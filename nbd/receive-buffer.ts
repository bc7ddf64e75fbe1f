/**
 * Where the kernel puts the bytes an NBD client sends: the socket reads into memory we choose
 * (net.Socket's `onread`), instead of Node allocating a fresh 64 KiB buffer per read.
 *
 * Why: with Node's default reads a 1 MiB WRITE arrived as 16 separate buffers that were each
 * allocated, then copied into the payload, then collected; the event loop spent a third of its
 * time in the garbage collector and writes to a `zero` target topped out at half of what nbdkit's
 * null plugin takes (bench/results.md). Here:
 *   - while a WRITE payload is being received and nothing else is buffered, the next read goes
 *     straight into the unfilled part of that payload: no copy, nothing to collect;
 *   - right after a large WRITE, with nothing else buffered, the next read takes only a request
 *     header (the parser's headerSpace), so that the next large payload also lands in place;
 *   - otherwise reads fill an arena of ARENA_BYTES, one after another, so one allocation serves
 *     many reads. Parsed messages keep views of the arena (a small WRITE's payload is such a view),
 *     which is why a region is never read into twice: the arena is dropped, not reused, and the
 *     collector frees it once no message refers to it.
 */

/** Size of one arena, and the least free space worth reading into (else a new arena). */
const ARENA_BYTES = 256 * 1024;
const MIN_READ_SPACE = 64 * 1024;

export interface ReceiveSink {
  /** Bytes just received (a view of memory from `directSpace` or an arena). */
  received(chunk: Buffer): void;
  /** Where the next bytes should go when the receiver can take them in place, else null. */
  directSpace(): Buffer | null;
  /** Read at most this many bytes next (just a message header), or 0 for no limit. */
  headerBytes?(): number;
}

export class ReceiveBuffer {
  private arena: Buffer = Buffer.allocUnsafeSlow(ARENA_BYTES);
  private used = 0;
  sink: ReceiveSink | null = null;

  /**
   * For `net.Socket`'s onread.buffer: the memory for the next read. Node asks right after the
   * previous read was delivered, not when the next one happens; that is enough because what the
   * receiver offers (the parser's state) only changes when bytes are pushed, i.e. on a read.
   */
  readonly nextBuffer = (): Buffer => {
    const direct = this.sink?.directSpace() ?? null;
    if (direct && direct.length > 0) return direct;
    if (ARENA_BYTES - this.used < MIN_READ_SPACE) {
      this.arena = Buffer.allocUnsafeSlow(ARENA_BYTES);
      this.used = 0;
    }
    const limit = this.sink?.headerBytes?.() ?? 0;
    return limit > 0 ? this.arena.subarray(this.used, this.used + limit) : this.arena.subarray(this.used);
  };

  /** For `net.Socket`'s onread.callback: `n` bytes arrived in `buf` (the last `nextBuffer`). */
  readonly onRead = (n: number, buf: Buffer): boolean => {
    // The arena's free tail is the only part of it ever handed out, so a read into the arena's
    // memory filled the next `n` bytes of it.
    if (buf.buffer === this.arena.buffer) this.used += n;
    this.sink?.received(buf.subarray(0, n));
    return true; // flow control is the connection's (socket.pause/resume)
  };
}
