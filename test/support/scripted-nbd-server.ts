/**
 * An NBD server a test scripts byte by byte, for the client's fault tests: it speaks the fixed
 * newstyle handshake with udm's own parser and serializer (nbd/parser.ts, nbd/serializer.ts) and
 * serves a RAM store with a volatile cache (writes land in the cache, FLUSH and FUA make them
 * durable, `restart` keeps only what is durable, as a server that was killed), unless the test's
 * `onRequest` answers a request itself: garbage, a wrong chunk, an error, silence, a hang-up.
 *
 * With `extended` it also accepts NBD_OPT_EXTENDED_HEADERS (proto.md's extension-ext-header
 * branch), which neither Debian 12's nbdkit (1.32) and qemu-nbd (7.2) nor udm's server speak: its
 * requests and replies then have 32-byte headers with 64-bit lengths, and it drops a client that
 * breaks the extension's rules (a WRITE without NBD_CMD_FLAG_PAYLOAD_LEN, a compact header).
 */
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { HandshakeParser, RequestParser } from "../../nbd/parser.js";
import {
  Cmd,
  CmdFlags,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_MAGIC,
  HandshakeFlags,
  type NbdRequest,
  Opt,
  Rep,
  ReplyFlags,
  ReplyType,
  TransmissionFlags,
} from "../../nbd/protocol.js";
import {
  exportNameReply,
  greeting,
  readReplyPrefix,
  repAck,
  repError,
  repInfoBlockSize,
  repInfoExport,
  simpleReply,
  structuredError,
  writeOffsetDataHeader,
  writeSimpleReplyHeader,
} from "../../nbd/serializer.js";

export interface ScriptedExport {
  name: string;
  size: number;
  /** Transmission flags (HAS_FLAGS is added). Default: flush, FUA, trim, write-zeroes, multi-conn. */
  flags?: number;
  /** NBD_INFO_BLOCK_SIZE's minimum, preferred, maximum; none: the info is not sent. */
  blockSizes?: [number, number, number];
  /** Accept NBD_OPT_STRUCTURED_REPLY (default yes). */
  structured?: boolean;
  /** Accept NBD_OPT_EXTENDED_HEADERS (default no). */
  extended?: boolean;
  /**
   * The export size the handshake states, when larger than the RAM store (`size`): for tests of
   * 64-bit lengths, which answer requests past the store themselves (the store refuses them).
   */
  statedSize?: number;
}

export const DEFAULT_FLAGS =
  TransmissionFlags.SEND_FLUSH |
  TransmissionFlags.SEND_FUA |
  TransmissionFlags.SEND_TRIM |
  TransmissionFlags.SEND_WRITE_ZEROES |
  TransmissionFlags.CAN_MULTI_CONN;

/** What `onRequest` returns: "default" lets the store answer. */
export type Handling = "default" | "handled";

export class ScriptedConnection {
  structured = false;
  /** NBD_OPT_EXTENDED_HEADERS was negotiated: replies are extended chunks. */
  extended = false;
  /** Requests received in transmission, in order. */
  readonly requests: NbdRequest[] = [];
  /** Each request's offset by cookie: an extended reply repeats it. */
  readonly offsets = new Map<bigint, number>();

  constructor(
    readonly socket: net.Socket,
    readonly server: ScriptedNbdServer,
  ) {}

  write(bytes: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(bytes);
  }

  ok(handle: bigint): void {
    if (this.extended)
      return this.write(extendedChunk(ReplyFlags.DONE, ReplyType.NONE, handle, this.offsetOf(handle), 0));
    this.write(simpleReply(handle, 0));
  }

  /** An error reply: a structured ERROR chunk with a message when negotiated, else a simple reply. */
  error(handle: bigint, errno: number, message = "scripted error"): void {
    if (this.extended) {
      const text = Buffer.from(message, "utf8");
      const payload = Buffer.alloc(6 + text.length);
      payload.writeUInt32BE(errno, 0);
      payload.writeUInt16BE(text.length, 4);
      text.copy(payload, 6);
      const h = extendedChunk(ReplyFlags.DONE, ReplyType.ERROR, handle, this.offsetOf(handle), payload.length);
      return this.write(Buffer.concat([h, payload]));
    }
    this.write(this.structured ? structuredError(handle, errno, message) : simpleReply(handle, errno));
  }

  /** The offset of the request `handle` names (0 for one never received: a test's made-up cookie). */
  offsetOf(handle: bigint): number {
    return this.offsets.get(handle) ?? 0;
  }

  /** A READ's data: one OFFSET_DATA chunk with DONE, or a simple reply and the data. */
  data(handle: bigint, offset: number, data: Buffer): void {
    if (this.extended) {
      const h = extendedChunk(ReplyFlags.DONE, ReplyType.OFFSET_DATA, handle, this.offsetOf(handle), 8 + data.length);
      const at = Buffer.alloc(8);
      at.writeBigUInt64BE(BigInt(offset));
      return this.write(Buffer.concat([h, at, data]));
    }
    const prefix = readReplyPrefix(this.structured);
    const b = Buffer.allocUnsafe(prefix + data.length);
    if (this.structured) writeOffsetDataHeader(b, handle, offset, data.length);
    else writeSimpleReplyHeader(b, handle, 0);
    data.copy(b, prefix);
    this.write(b);
  }

  destroy(): void {
    this.socket.destroy();
  }
}

export class ScriptedNbdServer {
  /** The durable contents, and the cache over it (sector-aligned writes not yet flushed). */
  readonly disk: Buffer;
  private cache = new Map<number, Buffer>();
  readonly connections: ScriptedConnection[] = [];
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  /** Answer a request yourself (return "handled"), or let the store do it. */
  onRequest: (req: NbdRequest, conn: ScriptedConnection) => Handling = () => "default";
  /** Fail the handshake instead (hang up after the greeting): a server that is not ready. */
  refuse = false;
  exp: ScriptedExport;

  private constructor(
    readonly sock: string,
    exp: ScriptedExport,
  ) {
    this.exp = exp;
    this.disk = Buffer.alloc(exp.size);
    this.server = net.createServer((s) => this.accept(s));
  }

  static async start(dir: string, exp: ScriptedExport): Promise<ScriptedNbdServer> {
    const s = new ScriptedNbdServer(path.join(dir, `${exp.name || "default"}.sock`), exp);
    await s.listen();
    return s;
  }

  get uri(): string {
    return `nbd+unix:///${encodeURIComponent(this.exp.name)}?socket=${this.sock}`;
  }

  private listen(): Promise<void> {
    fs.rmSync(this.sock, { force: true });
    return new Promise((resolve) => this.server.listen(this.sock, resolve));
  }

  /** Every connection ends (as a killed server's); the cache is lost. */
  dropConnections(): void {
    for (const s of this.sockets) s.destroy();
    this.cache.clear();
  }

  /** Stop listening and drop every connection; `listen` again with `restart`. */
  async stop(): Promise<void> {
    this.dropConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** Listen again after `stop`, maybe with a changed export. */
  async restart(exp: Partial<ScriptedExport> = {}): Promise<void> {
    this.exp = { ...this.exp, ...exp };
    await this.listen();
  }

  async close(): Promise<void> {
    if (this.server.listening) await this.stop();
    else this.dropConnections();
    fs.rmSync(this.sock, { force: true });
  }

  /** What a READ returns now: the cache over the disk. */
  read(offset: number, length: number): Buffer {
    const out = Buffer.from(this.disk.subarray(offset, offset + length));
    for (const [at, bytes] of this.cache) {
      const from = Math.max(at, offset);
      const to = Math.min(at + bytes.length, offset + length);
      if (from < to) bytes.copy(out, from - offset, from - at, to - at);
    }
    return out;
  }

  private writeCache(offset: number, data: Buffer, fua: boolean): void {
    if (fua) this.flushCache();
    // Writes are kept per request, in order: a later one wins where they overlap (Map order).
    this.cache.delete(offset);
    this.cache.set(offset, Buffer.from(data));
    if (fua) this.flushCache();
  }

  private flushCache(): void {
    for (const [at, bytes] of this.cache) bytes.copy(this.disk, at);
    this.cache.clear();
  }

  private accept(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.on("close", () => this.sockets.delete(socket));
    socket.on("error", () => undefined);
    if (this.refuse) {
      socket.destroy();
      return;
    }
    const conn = new ScriptedConnection(socket, this);
    this.connections.push(conn);
    const hs = new HandshakeParser();
    let requests: RequestParser | ExtendedRequestParser | null = null;
    const exp = this.exp;
    const flags = TransmissionFlags.HAS_FLAGS | (exp.flags ?? DEFAULT_FLAGS);
    const size = exp.statedSize ?? exp.size;
    socket.write(greeting(HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES));
    socket.on("data", (chunk: Buffer) => {
      try {
        if (requests) {
          requests.push(chunk);
          for (let r = requests.next(); r; r = requests.next()) this.request(conn, r);
          return;
        }
        hs.push(chunk);
        for (let m = hs.next(); m; m = hs.next()) {
          if (m.kind === "clientFlags") continue;
          if (m.kind === "info") {
            if (m.name !== exp.name) {
              socket.write(repError(m.option, Rep.ERR_UNKNOWN, "no such export"));
              continue;
            }
            socket.write(repInfoExport(m.option, size, flags));
            if (exp.blockSizes) socket.write(repInfoBlockSize(m.option, ...exp.blockSizes));
            socket.write(repAck(m.option));
            if (m.option === Opt.GO) {
              requests = conn.extended ? new ExtendedRequestParser() : new RequestParser();
              requests.push(hs.takeRemaining());
              for (let r = requests.next(); r; r = requests.next()) this.request(conn, r);
              return;
            }
          } else if (m.kind === "exportName") {
            if (conn.extended) throw new Error("NBD_OPT_EXPORT_NAME after extended headers");
            socket.write(exportNameReply(size, flags, true));
            requests = new RequestParser();
            requests.push(hs.takeRemaining());
            for (let r = requests.next(); r; r = requests.next()) this.request(conn, r);
            return;
          } else if (m.kind === "option" && m.option === Opt.STRUCTURED_REPLY && exp.structured !== false) {
            conn.structured = true;
            socket.write(repAck(m.option));
          } else if (m.kind === "option" && m.option === Opt.EXTENDED_HEADERS && exp.extended) {
            conn.extended = true;
            conn.structured = true;
            socket.write(repAck(m.option));
          } else {
            socket.write(repError(m.option, Rep.ERR_UNSUP));
          }
        }
      } catch {
        socket.destroy();
      }
    });
  }

  private request(conn: ScriptedConnection, r: NbdRequest): void {
    if (r.type === Cmd.DISC) {
      conn.socket.end();
      return;
    }
    conn.requests.push(r);
    conn.offsets.set(r.handle, r.offset);
    if (this.onRequest(r, conn) === "handled") return;
    const fua = (r.flags & CmdFlags.FUA) !== 0;
    switch (r.type) {
      case Cmd.READ:
        if (r.offset + r.length > this.exp.size) return conn.error(r.handle, 22, "beyond the end");
        return conn.data(r.handle, r.offset, this.read(r.offset, r.length));
      case Cmd.WRITE:
        if (r.offset + r.length > this.exp.size) return conn.error(r.handle, 28, "beyond the end");
        this.writeCache(r.offset, r.data!, fua);
        return conn.ok(r.handle);
      case Cmd.WRITE_ZEROES:
      case Cmd.TRIM:
        this.writeCache(r.offset, Buffer.alloc(r.length), fua);
        return conn.ok(r.handle);
      case Cmd.FLUSH:
        this.flushCache();
        return conn.ok(r.handle);
      default:
        return conn.error(r.handle, 22, "unsupported");
    }
  }
}

/** An extended reply chunk header (magic, flags, type, cookie, the request's offset, 64-bit length). */
export function extendedChunk(flags: number, type: number, handle: bigint, offset: number, length: number): Buffer {
  const b = Buffer.alloc(32);
  b.writeUInt32BE(EXTENDED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeBigUInt64BE(BigInt(length), 24);
  return b;
}

/**
 * Extended requests (32 bytes: magic, flags, type, cookie, offset, 64-bit length, then the payload
 * when NBD_CMD_FLAG_PAYLOAD_LEN is set). Throws on what the extension forbids, and the server hangs up.
 */
class ExtendedRequestParser {
  private buffer = Buffer.alloc(0);

  push(chunk: Buffer): void {
    this.buffer = Buffer.concat([this.buffer, chunk]);
  }

  next(): NbdRequest | null {
    const b = this.buffer;
    if (b.length < 32) return null;
    if (b.readUInt32BE(0) !== EXTENDED_REQUEST_MAGIC)
      throw new Error(`bad request magic 0x${b.readUInt32BE(0).toString(16)}`);
    const flags = b.readUInt16BE(4);
    const type = b.readUInt16BE(6);
    const length = Number(b.readBigUInt64BE(24));
    const hasPayload = (flags & CmdFlags.PAYLOAD_LEN) !== 0;
    if (type === Cmd.WRITE && !hasPayload) throw new Error("a WRITE without NBD_CMD_FLAG_PAYLOAD_LEN");
    if (hasPayload && type !== Cmd.WRITE) throw new Error(`a payload on command ${type}`);
    const payload = hasPayload ? length : 0;
    if (b.length < 32 + payload) return null;
    this.buffer = b.subarray(32 + payload);
    return {
      kind: "request",
      flags,
      type,
      handle: b.readBigUInt64BE(8),
      offset: Number(b.readBigUInt64BE(16)),
      length,
      data: hasPayload ? Buffer.from(b.subarray(32, 32 + payload)) : null,
      payloadDropped: false,
    };
  }

  takeRemaining(): Buffer {
    return this.buffer;
  }
}

/** A structured reply chunk header (proto.md, "Structured reply chunk message"), for hand-made replies. */
export function chunkHeader(flags: number, type: number, handle: bigint, length: number): Buffer {
  const b = Buffer.alloc(20);
  b.writeUInt32BE(0x668e33ef, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeUInt32BE(length, 16);
  return b;
}
