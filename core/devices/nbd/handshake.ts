/**
 * The client's side of the handshake (proto.md, "Fixed newstyle negotiation"): greeting, client
 * flags, NBD_OPT_STARTTLS when the URI asks for TLS, NBD_OPT_EXTENDED_HEADERS (the extension-ext-
 * header branch of proto.md: 32-byte requests and replies with 64-bit lengths) and, where the server
 * does not know it, NBD_OPT_STRUCTURED_REPLY; then NBD_OPT_GO with NBD_INFO_BLOCK_SIZE, which answers
 * the export's size, transmission flags and block size constraints. A server that does not know
 * NBD_OPT_GO gets NBD_OPT_EXPORT_NAME instead (never after extended headers: the extension forbids
 * it, and a server that offers them MUST know NBD_OPT_GO).
 *
 * Failures are Errors with an errno code the table load reports: ENOENT (no such export), EACCES
 * (TLS required, refused or failed), EPROTO (not an NBD server, or one breaking the protocol),
 * ECONNRESET (the server hung up, or is shutting down), ETIMEDOUT.
 */
import type net from "node:net";
import type tls from "node:tls";
import type { ByteSink, SocketInput } from "./socket-input.js";
import { type ClientTls, startTls } from "./tls.js";
import type { NbdUri } from "./uri.js";
import {
  ClientFlags,
  DEFAULT_MAX_PAYLOAD,
  GREETING_LENGTH,
  HandshakeFlags,
  IHAVEOPT,
  Info,
  NBDMAGIC,
  OLDSTYLE_MAGIC,
  OPTION_REPLY_HEADER_LENGTH,
  OPTION_REPLY_MAGIC,
  Opt,
  Rep,
  TransmissionFlags,
  goData,
  optionRequest,
  repErrorName,
} from "./wire.js";

/** What the handshake learnt about the export. */
export interface ExportInfo {
  /** Bytes. */
  size: number;
  /** Transmission flags. */
  flags: number;
  /** Block size constraints (proto.md, "Block size constraints"), with the defaults filled in. */
  minBlock: number;
  preferredBlock: number;
  /** The largest READ/WRITE this client sends: the server's maximum, at most 32 MiB. */
  maxPayload: number;
  /** Structured replies: negotiated with NBD_OPT_STRUCTURED_REPLY, or implied by extended headers. */
  structured: boolean;
  /** NBD_OPT_EXTENDED_HEADERS: every request and reply has the 32-byte extended header. */
  extended: boolean;
}

export interface Negotiated {
  /** The socket transmission goes on over: the plain one, or the TLS one wrapping it. */
  socket: net.Socket | tls.TLSSocket;
  info: ExportInfo;
}

/** Longest option reply payload read (an INFO reply is tens of bytes, error messages ≤ 4096). */
const MAX_OPTION_REPLY = 64 * 1024;

export function handshakeError(code: string, message: string, cause?: unknown): Error {
  return Object.assign(new Error(message, cause ? { cause } : undefined), { code });
}

/** Collects handshake bytes and hands out exact counts. */
class HandshakeReader implements ByteSink {
  private chunks: Buffer[] = [];
  private length = 0;
  private waiter: (() => void) | null = null;
  private ended: Error | null = null;

  received(chunk: Buffer): void {
    this.chunks.push(Buffer.from(chunk)); // the input's scratch buffer is reused
    this.length += chunk.length;
    this.waiter?.();
  }

  end(err: Error): void {
    this.ended ??= err;
    this.waiter?.();
  }

  /** Bytes received and not read (must be none when transmission starts). */
  get buffered(): number {
    return this.length;
  }

  async read(n: number): Promise<Buffer> {
    while (this.length < n) {
      if (this.ended) throw this.ended;
      await new Promise<void>((resolve) => (this.waiter = resolve));
      this.waiter = null;
    }
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    this.chunks = all.length > n ? [all.subarray(n)] : [];
    this.length -= n;
    return all.subarray(0, n);
  }
}

interface OptionReply {
  type: number;
  data: Buffer;
}

/**
 * Negotiate on a connected socket. `input` already feeds the socket's bytes somewhere; the
 * handshake takes them over and leaves `input.sink` null when done. Rejects (and destroys the
 * socket) on any failure, or after `timeoutMs`.
 */
export async function negotiate(
  socket: net.Socket,
  input: SocketInput,
  uri: NbdUri,
  tlsOptions: ClientTls | null,
  timeoutMs: number,
): Promise<Negotiated> {
  let reader = new HandshakeReader();
  let current: net.Socket | tls.TLSSocket = socket;
  input.sink = reader;
  input.failed = (err) => reader.end(err);
  const closed = () =>
    reader.end(handshakeError("ECONNRESET", "the server closed the connection during the handshake"));
  socket.once("close", closed);
  let closedAfterTls = closed;
  const timer = setTimeout(
    () => reader.end(handshakeError("ETIMEDOUT", `no NBD handshake within ${timeoutMs} ms`)),
    timeoutMs,
  );
  try {
    const send = (b: Buffer) => current.write(b);
    const optionReply = async (option: number): Promise<OptionReply> => {
      const h = await reader.read(OPTION_REPLY_HEADER_LENGTH);
      if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw handshakeError("EPROTO", "bad option reply magic");
      if (h.readUInt32BE(8) !== option) {
        throw handshakeError("EPROTO", `option reply for option ${h.readUInt32BE(8)}, expected ${option}`);
      }
      const length = h.readUInt32BE(16);
      if (length > MAX_OPTION_REPLY) throw handshakeError("EPROTO", `option reply of ${length} bytes`);
      return { type: h.readUInt32BE(12), data: length > 0 ? await reader.read(length) : Buffer.alloc(0) };
    };

    const g = await reader.read(GREETING_LENGTH);
    if (g.readBigUInt64BE(0) !== NBDMAGIC) throw handshakeError("EPROTO", "not an NBD server (no NBDMAGIC)");
    if (g.readBigUInt64BE(8) === OLDSTYLE_MAGIC) {
      throw handshakeError("EPROTO", "the server speaks the oldstyle handshake only (udm needs fixed newstyle)");
    }
    if (g.readBigUInt64BE(8) !== IHAVEOPT) throw handshakeError("EPROTO", "not an NBD server (no IHAVEOPT)");
    const serverFlags = g.readUInt16BE(16);
    if (!(serverFlags & HandshakeFlags.FIXED_NEWSTYLE)) {
      throw handshakeError("EPROTO", "the server does not speak the fixed newstyle handshake");
    }
    const noZeroes = (serverFlags & HandshakeFlags.NO_ZEROES) !== 0;
    const clientFlags = Buffer.allocUnsafe(4);
    clientFlags.writeUInt32BE(ClientFlags.FIXED_NEWSTYLE | (noZeroes ? ClientFlags.NO_ZEROES : 0));
    send(clientFlags);

    if (tlsOptions) {
      // proto.md, "Client-side requirements": STARTTLS first, and no plaintext fallback.
      send(optionRequest(Opt.STARTTLS));
      const r = await optionReply(Opt.STARTTLS);
      if (r.type !== Rep.ACK) {
        throw handshakeError("EACCES", `the server refused TLS (${repErrorName(r.type)}${message(r.data)})`);
      }
      if (reader.buffered > 0) throw handshakeError("EPROTO", "the server sent bytes after its STARTTLS reply");
      input.sink = null;
      socket.off("close", closed);
      const secure = await startTls(socket, tlsOptions);
      current = secure;
      reader = new HandshakeReader();
      input.sink = reader;
      input.attachTls(secure);
      // With TLS 1.3 the server checks our certificate after our side of the handshake is done:
      // a refusal arrives as an alert, then the close.
      secure.on("error", (err: Error & { reason?: string }) =>
        reader.end(handshakeError("EACCES", `TLS: ${err.reason ?? err.message}`, err)),
      );
      // Without an alert (udm's and nbdkit's servers just hang up), a close before the first
      // reply over TLS is, in practice, the server refusing our certificate.
      closedAfterTls = () =>
        reader.end(
          handshakeError(
            "EACCES",
            "the server closed the connection right after the TLS handshake (did it refuse our certificate?)",
          ),
        );
      secure.once("close", closedAfterTls);
    }

    // Extended headers where the server offers them; it answers ERR_UNSUP (or another error) if not.
    send(optionRequest(Opt.EXTENDED_HEADERS));
    const eh = await optionReply(Opt.EXTENDED_HEADERS);
    if (eh.type === Rep.ERR_TLS_REQD) throw tlsRequired(eh.data);
    const extended = eh.type === Rep.ACK;
    let structured = extended;
    if (!extended) {
      send(optionRequest(Opt.STRUCTURED_REPLY));
      const sr = await optionReply(Opt.STRUCTURED_REPLY);
      if (sr.type === Rep.ERR_TLS_REQD) throw tlsRequired(sr.data);
      structured = sr.type === Rep.ACK;
    }

    send(optionRequest(Opt.GO, goData(uri.exportName, [Info.BLOCK_SIZE])));
    let size: number | null = null;
    let flags = 0;
    let blocks: [number, number, number] | null = null;
    for (;;) {
      const r = await optionReply(Opt.GO);
      if (r.type === Rep.INFO) {
        if (r.data.length < 2) throw handshakeError("EPROTO", "empty NBD_REP_INFO");
        const item = r.data.readUInt16BE(0);
        if (item === Info.EXPORT) {
          if (r.data.length !== 12) throw handshakeError("EPROTO", "NBD_INFO_EXPORT of the wrong length");
          size = exportSize(r.data.readBigUInt64BE(2));
          flags = r.data.readUInt16BE(10);
        } else if (item === Info.BLOCK_SIZE) {
          if (r.data.length !== 14) throw handshakeError("EPROTO", "NBD_INFO_BLOCK_SIZE of the wrong length");
          blocks = [r.data.readUInt32BE(2), r.data.readUInt32BE(6), r.data.readUInt32BE(10)];
        }
        continue; // NAME, DESCRIPTION and items from later versions are not needed
      }
      if (r.type === Rep.ACK) {
        if (size === null) throw handshakeError("EPROTO", "NBD_OPT_GO succeeded without NBD_INFO_EXPORT");
        break;
      }
      if (r.type === Rep.ERR_UNSUP && !extended) {
        // A server from before NBD_OPT_GO (proto.md: such servers only know EXPORT_NAME).
        send(optionRequest(Opt.EXPORT_NAME, Buffer.from(uri.exportName, "utf8")));
        const e = await reader.read(noZeroes ? 10 : 134);
        size = exportSize(e.readBigUInt64BE(0));
        flags = e.readUInt16BE(8);
        break;
      }
      throw goError(uri, r);
    }
    if (reader.buffered > 0) throw handshakeError("EPROTO", "the server sent bytes before the first request");
    input.sink = null;
    return { socket: current, info: exportInfo(size, flags, blocks, structured, extended) };
  } catch (err) {
    current.destroy();
    socket.destroy();
    throw err;
  } finally {
    clearTimeout(timer);
    current.off("close", closedAfterTls);
    socket.off("close", closed);
  }
}

function message(data: Buffer): string {
  const text = data.toString("utf8").replace(/[^\x20-\x7e]/g, "?");
  return text ? `: ${text}` : "";
}

function tlsRequired(data: Buffer): Error {
  return handshakeError("EACCES", `the server requires TLS (use an nbds: or nbds+unix: URI)${message(data)}`);
}

function goError(uri: NbdUri, r: OptionReply): Error {
  const what = `${repErrorName(r.type)}${message(r.data)}`;
  switch (r.type) {
    case Rep.ERR_UNKNOWN:
      return handshakeError("ENOENT", `the server has no export "${uri.exportName}" (${what})`);
    case Rep.ERR_TLS_REQD:
      return tlsRequired(r.data);
    case Rep.ERR_POLICY:
      return handshakeError("EACCES", `the server refused the export (${what})`);
    case Rep.ERR_SHUTDOWN:
      return handshakeError("ECONNRESET", `the server is shutting down (${what})`);
    default:
      return handshakeError("EPROTO", `NBD_OPT_GO failed (${what})`);
  }
}

function exportSize(size: bigint): number {
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw handshakeError("EPROTO", `export size ${size} is too large`);
  return Number(size);
}

const isPowerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0;

/** Check the constraints and fill in proto.md's defaults for those not sent. */
function exportInfo(
  size: number,
  flags: number,
  blocks: [number, number, number] | null,
  structured: boolean,
  extended: boolean,
) {
  if (!(flags & TransmissionFlags.HAS_FLAGS)) flags = 0; // proto.md: HAS_FLAGS MUST be set; else no flag is meaningful
  const [min, preferred, max] = blocks ?? [1, 4096, DEFAULT_MAX_PAYLOAD];
  if (!isPowerOfTwo(min) || min > 64 * 1024) throw handshakeError("EPROTO", `minimum block size ${min} is invalid`);
  if (!isPowerOfTwo(preferred)) throw handshakeError("EPROTO", `preferred block size ${preferred} is invalid`);
  const unit = Math.max(min, 512);
  // The largest request: the server's maximum (at least one block), capped at 32 MiB, whole blocks.
  const cap = Math.min(Math.max(max, unit), DEFAULT_MAX_PAYLOAD);
  const info: ExportInfo = {
    size,
    flags,
    minBlock: min,
    preferredBlock: Math.max(preferred, unit),
    maxPayload: cap - (cap % unit),
    structured,
    extended,
  };
  return info;
}
