/**
 * The transmission-phase replies a server sends (proto.md, "Simple reply message", "Structured
 * reply chunk message", "Structured reply types"; with NBD_OPT_EXTENDED_HEADERS, "Extended reply
 * chunk message" of the extension-ext-header branch: every reply is a chunk with a 32-byte header
 * that repeats the request's offset and has a 64-bit length), parsed incrementally from whatever
 * the socket delivers, and matched to requests by cookie.
 *
 * READ data is copied (or, through `directSpace`, read by the kernel) straight into the request's
 * buffer; OFFSET_HOLE chunks zero their range; error chunks record the first error. A READ whose
 * chunks do not cover it exactly once is answered EIO. Anything that breaks the framing (a bad
 * magic, an unknown cookie, a chunk that does not fit its request, a simple reply to a READ after
 * structured replies were negotiated, any simple reply or an offset other than the request's with
 * extended headers) throws NbdReplyError: the stream cannot be trusted any more
 * and the connection is dropped. Nothing the server sends can make this allocate more than one
 * small buffer per chunk (error messages are at most MAX_SMALL_PAYLOAD bytes).
 */
import {
  Cmd,
  EXTENDED_REPLY_HEADER_LENGTH,
  EXTENDED_REPLY_MAGIC,
  NbdErrno,
  OFFSET_DATA_PREFIX,
  REPLY_TYPE_ERROR_BIT,
  ReplyFlags,
  ReplyType,
  SIMPLE_REPLY_LENGTH,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_LENGTH,
  STRUCTURED_REPLY_MAGIC,
  readCookie,
} from "./wire.js";

/** A request as the reader needs to see it. */
export interface ReplyTarget {
  readonly cmd: number;
  /** Byte offset and length of the request. */
  readonly offset: number;
  readonly length: number;
  /** READ only: where the data goes (`length` bytes). */
  readonly buffer: Buffer | null;
}

export interface ReplyHandler {
  /** The request in flight under `cookie`, if any. */
  target(cookie: number): ReplyTarget | undefined;
  /** The whole reply to `cookie` has arrived; `errno` is 0 on success (an NBD error value otherwise). */
  replied(cookie: number, errno: number, message: string | null): void;
}

/** The server broke the framing: the connection must be dropped. */
export class NbdReplyError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "NbdReplyError";
  }
}

/** Largest non-data chunk payload accepted: error chunks carry at most a 4096-byte message. */
const MAX_SMALL_PAYLOAD = 4 + 2 + 4096 + 8;
/** After data chunks this large, the next read takes only a header, so the next data lands in place. */
const LARGE_DATA = 64 * 1024;

const enum State {
  /** Collecting a reply header into `header`. */
  Header,
  /** Collecting an OFFSET_DATA chunk's 8-byte offset. */
  DataOffset,
  /** Filling `dest`. */
  Data,
  /** Collecting a small chunk payload into `small`. */
  Small,
}

/** A structured reply in progress (more chunks to come). */
interface Partial {
  errno: number;
  message: string | null;
  /** READ: [start, end) byte ranges received, relative to the request. */
  covered: [number, number][];
}

export class ReplyReader {
  private state = State.Header;
  private readonly header = Buffer.alloc(EXTENDED_REPLY_HEADER_LENGTH + OFFSET_DATA_PREFIX);
  private have = 0;
  /** Header bytes to collect: 4 (the magic) first, then the rest of the header it names. */
  private want = 4;
  /** A chunk header's length (structured or extended): an OFFSET_DATA chunk's offset follows it. */
  private readonly chunkHeaderLength: number;
  // The chunk being read.
  private cookie = 0;
  private chunkFlags = 0;
  private chunkType = 0;
  private chunkLength = 0;
  private target: ReplyTarget | undefined;
  /** Data: the destination and how much of it is filled. */
  private dest: Buffer | null = null;
  private filled = 0;
  /** Small payloads. */
  private small: Buffer | null = null;
  private readonly partial = new Map<number, Partial>();
  private lastDataLarge = false;
  /** The current READ's reply is one chunk covering all of it. */
  private whole = false;

  constructor(
    private readonly handler: ReplyHandler,
    private readonly structured: boolean,
    /** NBD_OPT_EXTENDED_HEADERS was negotiated: only extended replies are valid. */
    private readonly extended = false,
  ) {
    this.chunkHeaderLength = extended ? EXTENDED_REPLY_HEADER_LENGTH : STRUCTURED_REPLY_HEADER_LENGTH;
  }

  /** Where the kernel may read the next bytes directly: the unfilled part of a READ's buffer. */
  directSpace(): Buffer | null {
    if (this.state !== State.Data || this.dest === null) return null;
    return this.dest.subarray(this.filled);
  }

  /** After a large data chunk: read only the next header, betting on another large one. */
  headerBytes(): number {
    if (this.state !== State.Header || this.have !== 0 || !this.lastDataLarge) return 0;
    return this.structured ? this.chunkHeaderLength + OFFSET_DATA_PREFIX : SIMPLE_REPLY_LENGTH;
  }

  /** Requests with a structured reply begun and not finished (for tests). */
  get openReplies(): number {
    return this.partial.size;
  }

  received(chunk: Buffer): void {
    let at = 0;
    // Bytes the kernel put straight into the destination.
    if (this.state === State.Data && this.dest !== null && isView(chunk, this.dest, this.filled)) {
      this.filled += chunk.length;
      if (this.filled === this.dest.length) this.dataDone();
      return;
    }
    while (at < chunk.length) {
      switch (this.state) {
        case State.Header:
        case State.DataOffset: {
          const n = Math.min(this.want - this.have, chunk.length - at);
          chunk.copy(this.header, this.have, at, at + n);
          this.have += n;
          at += n;
          if (this.have === this.want) this.headerPart();
          break;
        }
        case State.Data: {
          const dest = this.dest!;
          const n = Math.min(dest.length - this.filled, chunk.length - at);
          chunk.copy(dest, this.filled, at, at + n);
          this.filled += n;
          at += n;
          if (this.filled === dest.length) this.dataDone();
          break;
        }
        case State.Small: {
          const small = this.small!;
          const n = Math.min(small.length - this.filled, chunk.length - at);
          chunk.copy(small, this.filled, at, at + n);
          this.filled += n;
          at += n;
          if (this.filled === small.length) this.smallDone(small);
          break;
        }
      }
    }
  }

  /** `want` bytes of header are in: decide what follows. */
  private headerPart(): void {
    const h = this.header;
    if (this.state === State.DataOffset) return this.dataOffset();
    if (this.want === 4) {
      // The magic is checked alone first, so a reply of the wrong kind fails at once instead of
      // waiting for the bytes of a header that is not coming.
      const magic = h.readUInt32BE(0);
      if (this.extended) {
        // With extended headers a server MUST NOT send simple or structured replies.
        if (magic !== EXTENDED_REPLY_MAGIC) throw new NbdReplyError(`bad reply magic ${hex(magic)} (extended headers)`);
        this.want = EXTENDED_REPLY_HEADER_LENGTH;
      } else if (magic === SIMPLE_REPLY_MAGIC) this.want = SIMPLE_REPLY_LENGTH;
      else if (magic === STRUCTURED_REPLY_MAGIC && this.structured) this.want = STRUCTURED_REPLY_HEADER_LENGTH;
      else throw new NbdReplyError(`bad reply magic ${hex(magic)}`);
      return;
    }
    if (this.extended) return this.extendedHeader(h);
    if (this.want === SIMPLE_REPLY_LENGTH) return this.simple(h.readUInt32BE(4), readCookie(h, 8));
    this.structuredHeader(h.readUInt16BE(4), h.readUInt16BE(6), readCookie(h, 8), h.readUInt32BE(16));
  }

  /** An extended reply chunk: magic, flags, type, cookie, the request's offset, a 64-bit length. */
  private extendedHeader(h: Buffer): void {
    const cookie = readCookie(h, 8);
    const target = this.lookup(cookie);
    const offset = readOffset(h, 16);
    if (offset !== target.offset) {
      throw new NbdReplyError(`reply to cookie ${cookie} names offset ${offset}; the request's is ${target.offset}`);
    }
    // Reply payloads never pass 32 bits (the extension says so); a larger length is garbage.
    if (h.readUInt32BE(24) !== 0) throw new NbdReplyError(`reply chunk of ${readOffset(h, 24)} bytes`);
    this.structuredHeader(h.readUInt16BE(4), h.readUInt16BE(6), cookie, h.readUInt32BE(28));
  }

  private lookup(cookie: number): ReplyTarget {
    const target = this.handler.target(cookie);
    if (!target) throw new NbdReplyError(`reply for cookie ${cookie}, which is not in flight`);
    return target;
  }

  private nextHeader(): void {
    this.state = State.Header;
    this.have = 0;
    this.want = 4;
    this.dest = null;
    this.small = null;
  }

  private simple(errno: number, cookie: number): void {
    const target = this.lookup(cookie);
    if (this.partial.has(cookie)) throw new NbdReplyError(`simple reply to cookie ${cookie} inside a structured one`);
    if (target.cmd === Cmd.READ && errno === 0) {
      // proto.md: after structured replies were negotiated a READ MUST NOT get a simple reply; a
      // successful one would be followed by data we could not tell from the next reply.
      if (this.structured) throw new NbdReplyError("simple reply with data to a READ after structured replies");
      this.cookie = cookie;
      this.target = target;
      this.chunkFlags = ReplyFlags.DONE;
      this.cover(0, target.length);
      this.startData(target.buffer!);
      return;
    }
    this.nextHeader();
    this.handler.replied(cookie, errno === 0 ? 0 : errno, null);
  }

  private structuredHeader(flags: number, type: number, cookie: number, length: number): void {
    const target = this.lookup(cookie);
    this.cookie = cookie;
    this.chunkFlags = flags;
    this.chunkType = type;
    this.chunkLength = length;
    this.target = target;
    if (type === ReplyType.NONE) {
      if (length !== 0) throw new NbdReplyError(`NONE chunk with ${length} bytes`);
      if (!(flags & ReplyFlags.DONE)) throw new NbdReplyError("NONE chunk without the DONE flag");
      this.nextHeader();
      return this.chunkDone();
    }
    if (type === ReplyType.OFFSET_DATA) {
      if (target.cmd !== Cmd.READ) throw new NbdReplyError(`OFFSET_DATA chunk for a non-READ request`);
      if (length <= OFFSET_DATA_PREFIX || length - OFFSET_DATA_PREFIX > target.length) {
        throw new NbdReplyError(`OFFSET_DATA chunk of ${length} bytes for a ${target.length}-byte READ`);
      }
      this.state = State.DataOffset;
      this.want = this.chunkHeaderLength + OFFSET_DATA_PREFIX;
      return;
    }
    const isError = (type & REPLY_TYPE_ERROR_BIT) !== 0;
    if (type === ReplyType.OFFSET_HOLE) {
      if (target.cmd !== Cmd.READ) throw new NbdReplyError("OFFSET_HOLE chunk for a non-READ request");
      if (length !== 12) throw new NbdReplyError(`OFFSET_HOLE chunk of ${length} bytes`);
    } else if (isError) {
      if (length < 6 || length > MAX_SMALL_PAYLOAD) throw new NbdReplyError(`error chunk of ${length} bytes`);
    } else {
      // BLOCK_STATUS (never asked for: no meta context is negotiated) or a type from the future.
      throw new NbdReplyError(`unexpected chunk type ${type}`);
    }
    this.state = State.Small;
    this.small = Buffer.allocUnsafe(length);
    this.filled = 0;
  }

  private dataOffset(): void {
    const target = this.target!;
    const offset = readOffset(this.header, this.chunkHeaderLength);
    const at = offset - target.offset;
    const bytes = this.chunkLength - OFFSET_DATA_PREFIX;
    if (!(at >= 0 && at + bytes <= target.length)) {
      throw new NbdReplyError(`OFFSET_DATA at ${offset}+${bytes} outside the READ ${target.offset}+${target.length}`);
    }
    this.cover(at, at + bytes);
    this.startData(target.buffer!.subarray(at, at + bytes));
  }

  private startData(dest: Buffer): void {
    this.state = State.Data;
    this.dest = dest;
    this.filled = 0;
    this.lastDataLarge = dest.length >= LARGE_DATA;
    if (dest.length === 0) this.dataDone();
  }

  private dataDone(): void {
    this.nextHeader();
    this.chunkDone();
  }

  private smallDone(p: Buffer): void {
    this.nextHeader();
    const target = this.target!;
    if (this.chunkType === ReplyType.OFFSET_HOLE) {
      const at = readOffset(p, 0) - target.offset;
      const bytes = p.readUInt32BE(8);
      if (!(at >= 0 && bytes > 0 && at + bytes <= target.length)) {
        throw new NbdReplyError(`OFFSET_HOLE outside the READ ${target.offset}+${target.length}`);
      }
      this.cover(at, at + bytes);
      target.buffer!.fill(0, at, at + bytes);
      return this.chunkDone();
    }
    // An error chunk: 32-bit error, 16-bit message length, message (ERROR_OFFSET: then an offset).
    const msgLength = p.readUInt16BE(4);
    if (6 + msgLength > p.length) throw new NbdReplyError("error chunk message longer than the chunk");
    let errno = p.readUInt32BE(0);
    if (errno === 0) errno = NbdErrno.EIO; // proto.md: an error chunk's value MUST be nonzero
    const state = this.partialOf(this.cookie);
    if (state.errno === 0) {
      state.errno = errno;
      state.message = p.toString("utf8", 6, 6 + msgLength);
    }
    this.chunkDone();
  }

  private partialOf(cookie: number): Partial {
    let p = this.partial.get(cookie);
    if (!p) this.partial.set(cookie, (p = { errno: 0, message: null, covered: [] }));
    return p;
  }

  private cover(from: number, to: number): void {
    // The usual reply: one chunk, with DONE, covering the whole read. No bookkeeping for it.
    const done = (this.chunkFlags & ReplyFlags.DONE) !== 0;
    if (done && from === 0 && to === this.target!.length && !this.partial.has(this.cookie)) {
      this.whole = true;
      return;
    }
    this.partialOf(this.cookie).covered.push([from, to]);
  }

  /** One chunk is complete; with DONE, so is the reply. */
  private chunkDone(): void {
    if (!(this.chunkFlags & ReplyFlags.DONE)) return;
    const cookie = this.cookie;
    const target = this.target!;
    const p = this.partial.get(cookie);
    this.partial.delete(cookie);
    this.target = undefined;
    let errno = p?.errno ?? 0;
    let message = p?.message ?? null;
    const whole = this.whole;
    this.whole = false;
    if (
      errno === 0 &&
      target.cmd === Cmd.READ &&
      target.length > 0 &&
      !whole &&
      !coversExactly(p?.covered ?? [], target.length)
    ) {
      errno = NbdErrno.EIO;
      message = "the server's reply did not cover the READ exactly once";
    }
    this.handler.replied(cookie, errno, message);
  }
}

/** Whether `chunk` is the memory of `dest` from `filled` on (the kernel read into directSpace). */
function isView(chunk: Buffer, dest: Buffer, filled: number): boolean {
  return chunk.buffer === dest.buffer && chunk.byteOffset === dest.byteOffset + filled && chunk.length > 0;
}

function hex(magic: number): string {
  return `0x${magic.toString(16).padStart(8, "0")}`;
}

function readOffset(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 0x1_0000_0000 + b.readUInt32BE(at + 4);
}

function coversExactly(ranges: [number, number][], length: number): boolean {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  let end = 0;
  for (const [from, to] of sorted) {
    if (from !== end) return false;
    end = to;
  }
  return end === length;
}
