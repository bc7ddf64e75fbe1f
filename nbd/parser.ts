/**
 * Incremental parsers for what an NBD client sends: the handshake (client flags, then option
 * requests) and transmission requests (28-byte header, plus the payload of a WRITE).
 *
 * Like pg-protocol's parser they never assume one socket read is one message: input is `push`ed
 * as it arrives, partial messages wait for more, and one chunk may hold many messages. Unlike it
 * they are pulled (`next()` returns one message or null) rather than pushing every message to a
 * callback, so the connection can stop taking requests when it has enough in flight and leave
 * the rest buffered (a callback loop would have to admit a whole chunk of requests at once).
 *
 * Hard limits keep a hostile client from making the server buffer much: option payloads beyond
 * MAX_OPTION_LENGTH and WRITE payloads beyond the payload limit are skipped as they stream past
 * (never stored) and reported, so the server can answer with an error and carry on. Anything
 * that breaks the framing itself throws NbdProtocolError; the parser is then dead.
 */
import {
  type HandshakeMessage,
  Cmd,
  IHAVEOPT,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  MAX_STRING_LENGTH,
  NbdProtocolError,
  type NbdRequest,
  Opt,
  OPTION_HEADER_LENGTH,
  REQUEST_HEADER_LENGTH,
  REQUEST_MAGIC,
  optionName,
} from "./protocol.js";

const EMPTY = Buffer.alloc(0);
/** From this payload size up, the read after a WRITE takes only the next header (headerSpace). */
const LARGE_PAYLOAD = 64 * 1024;
const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Buffered input with a read position; subclasses consume it one message at a time. */
abstract class IncrementalParser<M> {
  protected buffer: Buffer = EMPTY;
  protected offset = 0;
  private failure: NbdProtocolError | null = null;

  /** Add bytes as they arrive. Cheap when nothing is left over from the previous chunk. */
  push(chunk: Buffer): void {
    if (this.offset >= this.buffer.length) {
      this.buffer = chunk;
    } else {
      // Only a partial message (or bytes held while the consumer is paused) is copied. Buffers
      // are never written after creation: messages may keep subarrays of them.
      this.buffer = Buffer.concat([this.buffer.subarray(this.offset), chunk]);
    }
    this.offset = 0;
  }

  /** The next complete message, or null until more input arrives. */
  next(): M | null {
    if (this.failure) throw this.failure;
    try {
      return this.step();
    } catch (err) {
      if (err instanceof NbdProtocolError) this.failure = err;
      throw err;
    }
  }

  /** pg-protocol style: push a chunk and hand every complete message to `callback`. */
  parse(chunk: Buffer, callback: (message: M) => void): void {
    this.push(chunk);
    for (let m = this.next(); m !== null; m = this.next()) callback(m);
  }

  /** Bytes received but not yet consumed (for the next parser after a phase change). */
  takeRemaining(): Buffer {
    const rest = this.buffer.subarray(this.offset);
    this.buffer = EMPTY;
    this.offset = 0;
    return rest;
  }

  /** True when input ended in the middle of a message (a truncated packet). */
  get midMessage(): boolean {
    return this.available > 0 || this.inPayload;
  }

  protected get available(): number {
    return this.buffer.length - this.offset;
  }

  protected abstract get inPayload(): boolean;
  protected abstract step(): M | null;

  /** Drop up to `n` bytes; returns how many were dropped. */
  protected skip(n: number): number {
    const k = Math.min(n, this.available);
    this.offset += k;
    return k;
  }
}

/**
 * The client's side of the fixed newstyle handshake: 32-bit client flags, then option requests
 * (IHAVEOPT, option, length, payload) until the server switches to transmission.
 */
export class HandshakeParser extends IncrementalParser<HandshakeMessage> {
  private gotFlags = false;
  /** Header of an option whose payload is still to come (or to be skipped). */
  private pending: { option: number; length: number } | null = null;
  private skipping = 0;

  protected get inPayload(): boolean {
    return this.pending !== null;
  }

  protected step(): HandshakeMessage | null {
    if (!this.gotFlags) {
      if (this.available < 4) return null;
      const flags = this.buffer.readUInt32BE(this.offset);
      this.offset += 4;
      this.gotFlags = true;
      return { kind: "clientFlags", flags };
    }
    if (this.pending === null) {
      if (this.available < OPTION_HEADER_LENGTH) return null;
      const magic = this.buffer.readBigUInt64BE(this.offset);
      if (magic !== IHAVEOPT) {
        throw new NbdProtocolError(`bad option magic 0x${magic.toString(16).padStart(16, "0")} (expected IHAVEOPT)`);
      }
      const option = this.buffer.readUInt32BE(this.offset + 8);
      const length = this.buffer.readUInt32BE(this.offset + 12);
      this.offset += OPTION_HEADER_LENGTH;
      this.pending = { option, length };
      this.skipping = length > MAX_OPTION_LENGTH ? length : 0;
    }
    const { option, length } = this.pending;
    if (length > MAX_OPTION_LENGTH) {
      this.skipping -= this.skip(this.skipping);
      if (this.skipping > 0) return null;
      this.pending = null;
      return { kind: "oversizeOption", option, length };
    }
    if (this.available < length) return null;
    const data = this.buffer.subarray(this.offset, this.offset + length);
    this.offset += length;
    this.pending = null;
    return decodeOption(option, data);
  }
}

/** Give the options we understand a typed shape; malformed payloads become invalidOption. */
function decodeOption(option: number, data: Buffer): HandshakeMessage {
  const invalid = (reason: string): HandshakeMessage => ({
    kind: "invalidOption",
    option,
    reason: `${optionName(option)}: ${reason}`,
  });
  switch (option) {
    case Opt.EXPORT_NAME: {
      const name = decodeString(data);
      return typeof name === "string" ? { kind: "exportName", name } : invalid(name.error);
    }
    case Opt.INFO:
    case Opt.GO: {
      if (data.length < 6) return invalid(`payload of ${data.length} bytes is shorter than 6`);
      const nameLength = data.readUInt32BE(0);
      if (nameLength > data.length - 6)
        return invalid(`name length ${nameLength} overruns the ${data.length}-byte payload`);
      const name = decodeString(data.subarray(4, 4 + nameLength));
      if (typeof name !== "string") return invalid(name.error);
      const count = data.readUInt16BE(4 + nameLength);
      const rest = data.length - 6 - nameLength;
      if (rest !== count * 2)
        return invalid(`${count} information requests need ${count * 2} bytes, ${rest} were sent`);
      const requests: number[] = [];
      for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(6 + nameLength + 2 * i));
      return { kind: "info", option, name, requests };
    }
    default:
      return { kind: "option", option, data };
  }
}

/** An NBD string: UTF-8, no NUL, at most 4096 bytes. */
function decodeString(bytes: Buffer): string | { error: string } {
  if (bytes.length > MAX_STRING_LENGTH)
    return { error: `string of ${bytes.length} bytes is longer than ${MAX_STRING_LENGTH}` };
  if (bytes.includes(0)) return { error: "string contains NUL" };
  try {
    return utf8.decode(bytes);
  } catch {
    return { error: "string is not valid UTF-8" };
  }
}

export interface RequestParserOptions {
  /** Largest WRITE payload accepted (default MAX_PAYLOAD); longer ones are skipped and flagged. */
  maxPayload?: number;
  /** Where a payload that spans socket reads is assembled (default Buffer.allocUnsafe). */
  allocPayload?: (bytes: number) => Buffer;
}

/**
 * A 64-bit byte offset as a number: exact below 2^53, and sector-aligned offsets stay exact up to
 * 2^62 (past the end of the largest export, 2^53 - 1 sectors). An unaligned offset above 2^53
 * would be rounded, possibly onto a sector boundary, and then served at the wrong place; it
 * becomes +Infinity instead, which is unaligned and past the end of anything.
 */
function byteOffset(hi: number, lo: number): number {
  const offset = hi * 0x1_0000_0000 + lo;
  return Number.isSafeInteger(offset) || lo % 512 === 0 ? offset : Number.POSITIVE_INFINITY;
}

/** Transmission-phase requests: magic, flags, type, handle, offset, length, [WRITE payload]. */
export class RequestParser extends IncrementalParser<NbdRequest> {
  private readonly maxPayload: number;
  private readonly allocPayload: (bytes: number) => Buffer;
  /** A WRITE whose payload is still arriving. */
  private pending: NbdRequest | null = null;
  /** Payload buffer of `pending` and how much of it is filled (null while skipping). */
  private payload: Buffer | null = null;
  private filled = 0;
  /** Payload length of the last message (0 for anything but a WRITE). */
  private lastPayload = 0;

  constructor(opts: RequestParserOptions = {}) {
    super();
    this.maxPayload = opts.maxPayload ?? MAX_PAYLOAD;
    this.allocPayload = opts.allocPayload ?? Buffer.allocUnsafe;
  }

  protected get inPayload(): boolean {
    return this.pending !== null;
  }

  protected step(): NbdRequest | null {
    if (this.pending === null) {
      if (this.available < REQUEST_HEADER_LENGTH) return null;
      const request = this.readHeader();
      this.lastPayload = request.type === Cmd.WRITE ? request.length : 0;
      if (request.type !== Cmd.WRITE || request.length === 0) {
        if (request.type === Cmd.WRITE) request.data = EMPTY;
        return request;
      }
      if (request.length > this.maxPayload) {
        request.payloadDropped = true;
        this.pending = request;
        this.payload = null;
        this.filled = 0;
      } else if (this.available >= request.length) {
        // The whole payload is already here: hand out a view, no copy.
        request.data = this.buffer.subarray(this.offset, this.offset + request.length);
        this.offset += request.length;
        return request;
      } else {
        this.pending = request;
        this.payload = this.allocPayload(request.length);
        this.filled = 0;
      }
    }
    return this.continuePayload(this.pending);
  }

  private readHeader(): NbdRequest {
    const b = this.buffer;
    const at = this.offset;
    const magic = b.readUInt32BE(at);
    if (magic !== REQUEST_MAGIC) {
      throw new NbdProtocolError(`bad request magic 0x${magic.toString(16).padStart(8, "0")} (expected 0x25609513)`);
    }
    this.offset += REQUEST_HEADER_LENGTH;
    return {
      kind: "request",
      flags: b.readUInt16BE(at + 4),
      type: b.readUInt16BE(at + 6),
      handle: b.readBigUInt64BE(at + 8),
      offset: byteOffset(b.readUInt32BE(at + 16), b.readUInt32BE(at + 20)),
      length: b.readUInt32BE(at + 24),
      data: null,
      payloadDropped: false,
    };
  }

  /**
   * The unfilled part of the pending WRITE payload when nothing else is buffered: the socket may
   * read straight into it (ReceiveBuffer), and `push`ing that view then costs no copy.
   */
  payloadSpace(): Buffer | null {
    if (this.payload === null || this.available > 0) return null;
    return this.payload.subarray(this.filled);
  }

  /**
   * How many bytes the next read should be limited to: a request header's, right after a large
   * WRITE when nothing else is buffered. A client streaming large writes most likely sends
   * another, and reading only its header lets the payload then land in place (payloadSpace)
   * instead of partly in an arena, whence it would be copied (and the arena soon dropped).
   * 0: no limit.
   */
  headerSpace(): number {
    return this.pending === null && this.available === 0 && this.lastPayload >= LARGE_PAYLOAD
      ? REQUEST_HEADER_LENGTH
      : 0;
  }

  /** Copy (or skip) whatever part of the pending WRITE payload is available. */
  private continuePayload(request: NbdRequest): NbdRequest | null {
    const want = request.length - this.filled;
    const n = Math.min(want, this.available);
    const p = this.payload;
    // Bytes the socket read into the payload in place (payloadSpace) are already where they belong.
    const inPlace =
      p !== null &&
      this.buffer.buffer === p.buffer &&
      this.buffer.byteOffset + this.offset === p.byteOffset + this.filled;
    if (p && !inPlace) this.buffer.copy(p, this.filled, this.offset, this.offset + n);
    this.offset += n;
    this.filled += n;
    if (this.filled < request.length) return null;
    request.data = this.payload;
    this.pending = null;
    this.payload = null;
    return request;
  }
}
