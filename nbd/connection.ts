/**
 * One NBD client connection: the fixed newstyle handshake, then transmission, where every request
 * becomes a bio on the exported device and is answered as soon as that bio completes (replies go
 * out of order; the handle tells the client which is which).
 *
 * Flow control: requests are only taken from the parser while the connection has room (in-flight
 * count and bytes, and the reply backlog in the socket are bounded); otherwise the socket is
 * paused and the rest stays in the parser/kernel buffers until completions free room. Replies
 * written in the same event-loop turn are corked together so many small completions leave in one writev.
 *
 * Failure scope: anything wrong with this client's bytes closes this connection only; a request
 * the device or the checks reject gets an error reply and the connection goes on.
 *
 * TLS: after NBD_OPT_STARTTLS is acknowledged the socket is handed to a TLS socket (tls.ts) and
 * the connection goes on over it with the copying paths only: Node's own read buffers instead of
 * the ReceiveBuffer, and no sendfile (the kernel would send file bytes unencrypted).
 */
import type { Socket } from "node:net";
import type { TLSSocket } from "node:tls";
import { Bio, type BioEndIo, BioFlags, type BioOp, SECTOR_SIZE } from "../core/bio.js";
import type { Logger } from "../core/logger.js";
import { FileRangeRead } from "../core/file-ranges.js";
import { dupFd } from "../core/sys/file.js";
import type { BufferPool } from "./buffer-pool.js";
import type { ReceiveBuffer } from "./receive-buffer.js";
import { ReplyWriter } from "./reply-writer.js";
import {
  type ExportDevice,
  type ExportProvider,
  type FoundExport,
  MIN_BLOCK_SIZE,
  exportSizeBytes,
  nbdErrorFor,
} from "./exports.js";
import type { NbdTlsMode, TlsCredentials } from "./tls.js";
import { Handshake } from "./handshake.js";
import { submitWriteZeroes } from "./zero-fill.js";
import { HandshakeParser, RequestParser } from "./parser.js";
import { Cmd, CmdFlags, HandshakeFlags, NbdErrno, NbdProtocolError, type NbdRequest, commandName } from "./protocol.js";
import {
  greeting,
  readReplyPrefix,
  simpleReply,
  structuredError,
  structuredNone,
  writeOffsetDataHeader,
  writeSimpleReplyHeader,
} from "./serializer.js";

export interface ConnectionSettings {
  exports: ExportProvider;
  logger: Logger;
  /** Largest READ/WRITE length and the advertised maximum block size. */
  maxPayload: number;
  /** Requests in flight per connection before the socket is paused. */
  maxInFlight: number;
  /** Payload bytes (read buffers + write data) in flight before the socket is paused. */
  maxInFlightBytes: number;
  /** Reply bytes queued in the socket before the socket is paused. */
  maxQueuedReplyBytes: number;
  /** After a graceful end, how long to wait for the client before destroying the socket. */
  lingerMs: number;
  /** Large READ reply and WRITE payload buffers, shared by the server's connections. */
  buffers: BufferPool;
  /** Large READ replies from files go by sendfile (NbdServerOptions.zeroCopy). */
  zeroCopy: boolean;
  /** A connection not in transmission after this long is closed (0: never). */
  handshakeTimeoutMs: number;
}

/** TLS as the listener a connection came in on offers it. */
export interface ConnectionTls {
  mode: NbdTlsMode;
  /** Null only with mode "off". */
  credentials: TlsCredentials | null;
}

/**
 * Reads from this size up may be answered with file ranges (sendfile) instead of a copy; so may
 * each piece of them a file device serves. Below it, one sendfile costs more than the copy.
 */
const ZERO_COPY_MIN = 128 * 1024;

/** Per-request state the completion needs; rides on `bio.owner`. */
class PendingRequest {
  constructor(
    readonly handle: bigint,
    readonly type: number,
    /** Prebuilt READ reply (header + data the bio filled), from the pool; null for other commands. */
    readonly reply: Buffer | null,
    readonly cost: number,
    /** WRITE payload from the pool, returned when the bio completes. */
    readonly payload: Buffer | null,
  ) {}
}

export class NbdConnection implements BioEndIo {
  /** Canonical export name once in transmission. */
  exportName: string | null = null;
  readonly closed: Promise<void>;
  /** The client's address ("unix" on a unix socket), for log lines and limits. */
  readonly remote: string;

  private device: ExportDevice | null = null;
  private handshake: HandshakeParser | null = new HandshakeParser();
  private readonly negotiation: Handshake;
  private requests: RequestParser | null = null;
  private structured = false;
  private inFlight = 0;
  private inFlightBytes = 0;
  /** No more messages will be taken (NBD_CMD_DISC, NBD_OPT_ABORT, protocol error). */
  private stopped = false;
  /** The client has closed its sending side. */
  private eof = false;
  /** The parser has nothing complete left: with `eof`, all input has been handled. */
  private starved = false;
  /** closeExport/close: new requests are answered with ESHUTDOWN. */
  private shuttingDown = false;
  private ending = false;
  private warnedTruncated = false;
  /** Between the STARTTLS ACK and the end of the TLS handshake: nothing is read or parsed. */
  private upgrading = false;
  private handshakeTimer: NodeJS.Timeout | null = null;
  private isClosed = false;
  private out: ReplyWriter;
  /** WRITE payloads the parser assembled in pool buffers, until a bio or a rejection takes them. */
  private readonly pooledPayloads = new WeakSet<Buffer>();
  private pumping = false;
  private timers: NodeJS.Timeout[] = [];
  private resolveClosed!: () => void;
  private readonly stats = { requests: 0, errors: 0 };

  constructor(
    private socket: Socket,
    readonly id: number,
    private readonly settings: ConnectionSettings,
    /** The socket's onread memory, when the server created it that way (else 'data' events). */
    private receive: ReceiveBuffer | null = null,
    private readonly tls: ConnectionTls = { mode: "off", credentials: null },
  ) {
    this.closed = new Promise((r) => (this.resolveClosed = r));
    this.remote = socket.remoteAddress ?? "unix";
    this.out = new ReplyWriter(socket, settings.buffers, this.writerEvents, settings.zeroCopy);
    this.negotiation = new Handshake(settings.exports, settings.maxPayload, (reply) => this.send(reply), tls.mode);
  }

  private readonly writerEvents = {
    failed: (err: Error) => {
      this.log().error("nbd: sending file data failed, closing connection", { error: err.message });
      this.socket.destroy();
    },
    drained: () => this.pump(),
  };

  get inTransmission(): boolean {
    return this.requests !== null;
  }

  start(): void {
    if (this.receive) {
      this.receive.sink = {
        received: this.onData,
        directSpace: () => this.requests?.payloadSpace() ?? null,
        headerBytes: () => this.requests?.headerSpace() ?? 0,
      };
    }
    this.listen(this.socket);
    if (this.settings.handshakeTimeoutMs > 0) {
      // qemu-nbd's handshake limit: a client that never finishes must not hold a descriptor.
      this.handshakeTimer = setTimeout(() => this.handshakeTimedOut(), this.settings.handshakeTimeoutMs).unref();
    }
    this.send(greeting(HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES));
  }

  private readonly onData = (chunk: Buffer): void => {
    (this.requests ?? this.handshake)?.push(chunk);
    this.starved = false;
    this.pump();
  };
  private readonly onEnd = (): void => {
    this.eof = true;
    this.pump();
  };
  private readonly onDrain = (): void => this.pump();
  private readonly onError = (err: Error): void => this.log().debug("nbd socket error", { error: err.message });
  private readonly onSocketClose = (): void => this.onClose();

  /** Take input and events from `s` (the accepted socket, later its TLS socket). */
  private listen(s: Socket): void {
    if (!this.receive) s.on("data", this.onData);
    s.on("end", this.onEnd);
    s.on("drain", this.onDrain);
    s.on("error", this.onError);
    s.on("close", this.onSocketClose);
  }

  private unlisten(s: Socket): void {
    s.off("data", this.onData);
    s.off("end", this.onEnd);
    s.off("drain", this.onDrain);
    s.off("error", this.onError);
    s.off("close", this.onSocketClose);
  }

  private handshakeTimedOut(): void {
    if (this.inTransmission || this.socket.destroyed) return;
    const seconds = this.settings.handshakeTimeoutMs / 1000;
    const fields = { remote: this.remote, timeoutSeconds: seconds, tls: this.negotiation.tlsActive };
    this.log().warn("nbd handshake timed out, closing connection", fields);
    this.socket.destroy();
  }

  /**
   * End the connection for closeExport/close: answer what is in flight (up to `graceMs`), refuse
   * new requests with ESHUTDOWN (the client then disconnects cleanly), then close.
   */
  shutdown(graceMs: number): Promise<void> {
    if (!this.inTransmission) {
      this.socket.destroy();
      return this.closed;
    }
    this.shuttingDown = true;
    this.timers.push(setTimeout(() => this.socket.destroy(), graceMs).unref());
    this.pump();
    if (this.inFlight === 0) this.endGracefully();
    return this.closed;
  }

  // ---- input ----

  /** Take messages while there is room; then pause or resume the socket, or finish. */
  private pump(): void {
    if (this.pumping) return; // a completion inside submit(): the outer loop carries on
    this.pumping = true;
    try {
      while (!this.stopped && !this.upgrading && this.hasRoom()) {
        const more = this.requests ? this.takeRequest(this.requests) : this.takeHandshake();
        if (!more) {
          this.starved = true;
          break;
        }
      }
    } catch (err) {
      this.protocolError(err);
    } finally {
      this.pumping = false;
    }
    this.settle();
  }

  private hasRoom(): boolean {
    return (
      this.inFlight < this.settings.maxInFlight &&
      this.inFlightBytes < this.settings.maxInFlightBytes &&
      this.out.queuedBytes <= this.settings.maxQueuedReplyBytes
    );
  }

  private settle(): void {
    const inputDone = this.eof && this.starved;
    if (inputDone && !this.stopped && !this.warnedTruncated && (this.requests ?? this.handshake)?.midMessage) {
      this.warnedTruncated = true;
      this.log().warn("nbd client closed mid-message (truncated packet)");
    }
    if (this.inFlight === 0 && (this.stopped || inputDone || this.shuttingDown)) this.endGracefully();
    if (this.stopped || this.upgrading || !this.hasRoom()) this.socket.pause();
    else this.socket.resume();
  }

  private takeHandshake(): boolean {
    const m = this.handshake?.next() ?? null;
    if (m === null) return false;
    const outcome = this.negotiation.handle(m);
    if (outcome.next === "transmission") this.enterTransmission(outcome.found);
    else if (outcome.next === "abort") this.stopped = true;
    else if (outcome.next === "starttls") this.startTls();
    return true;
  }

  /**
   * NBD_OPT_STARTTLS was acknowledged: once the ACK is out, the client's next bytes are its TLS
   * ClientHello. The plain socket stops reading so that the TLS socket gets them.
   */
  private startTls(): void {
    const credentials = this.tls.credentials!;
    // The client may send nothing until it has the ACK (proto.md): bytes here would be lost.
    if (this.handshake!.takeRemaining().length > 0) {
      throw new NbdProtocolError("data after NBD_OPT_STARTTLS before the server's reply");
    }
    this.upgrading = true;
    const plain = this.socket;
    plain.pause();
    plain.off("data", this.onData);
    plain.off("end", this.onEnd);
    plain.off("drain", this.onDrain);
    if (this.receive) this.receive.sink = null;
    this.receive = null;
    this.out.flushed(() => {
      if (plain.destroyed) return;
      credentials.upgrade(plain).then(
        (secure) => this.tlsUp(plain, secure),
        (err: Error) => {
          this.log().warn("nbd TLS handshake failed, closing connection", { remote: this.remote, error: err.message });
          plain.destroy();
        },
      );
    });
  }

  private tlsUp(plain: Socket, secure: TLSSocket): void {
    if (this.isClosed) return void secure.destroy();
    this.unlisten(plain);
    this.out.close();
    this.socket = secure;
    // Copying paths only: sendfile would bypass the encryption.
    this.out = new ReplyWriter(secure, this.settings.buffers, this.writerEvents, false);
    this.negotiation.tlsActive = true;
    this.upgrading = false;
    this.listen(secure);
    const fields = { remote: this.remote, protocol: secure.getProtocol(), cipher: secure.getCipher().name };
    this.log().info("nbd TLS established", fields);
    this.pump();
  }

  private takeRequest(parser: RequestParser): boolean {
    const r = parser.next();
    if (r === null) return false;
    this.stats.requests++;
    this.onRequest(r);
    return true;
  }

  private protocolError(err: unknown): void {
    const message = err instanceof Error ? err.message : String(err);
    if (err instanceof NbdProtocolError) this.log().warn("nbd protocol error, closing connection", { error: message });
    else this.log().error("nbd connection failed", { error: message, stack: (err as Error)?.stack });
    this.stopped = true;
    // Nothing more is read (the stream can no longer be trusted), but the replies already queued
    // for earlier messages (corked in this event-loop turn) still go out before the close.
    this.endGracefully();
  }

  private enterTransmission(found: FoundExport): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    found.device.open();
    this.device = found.device;
    this.exportName = found.name;
    this.structured = this.negotiation.structured;
    const buffers = this.settings.buffers;
    const allocPayload = (n: number): Buffer => {
      const buf = buffers.take(n);
      this.pooledPayloads.add(buf);
      return buf;
    };
    this.requests = new RequestParser({ maxPayload: this.settings.maxPayload, allocPayload });
    this.requests.push(this.handshake!.takeRemaining());
    this.handshake = null;
    const sizeBytes = exportSizeBytes(found.device);
    this.log().info("nbd client attached", { structured: this.structured, tls: this.negotiation.tlsActive, sizeBytes });
  }

  // ---- transmission ----

  private onRequest(r: NbdRequest): void {
    this.handleRequest(r);
    // A pooled WRITE payload that did not become a bio (rejected, or the connection is ending).
    if (r.data && this.pooledPayloads.delete(r.data)) this.settings.buffers.give(r.data);
  }

  private handleRequest(r: NbdRequest): void {
    if (r.type === Cmd.DISC) {
      // Answer everything in flight, then close (settle/bioDone end the socket when idle).
      this.stopped = true;
      return;
    }
    if (this.shuttingDown) return this.fail(r, NbdErrno.ESHUTDOWN, "server is closing this export");
    const F = CmdFlags;
    switch (r.type) {
      case Cmd.READ:
        return this.read(r);
      case Cmd.WRITE:
        return this.modify(r, "write", F.FUA, NbdErrno.ENOSPC);
      case Cmd.TRIM:
        return this.modify(r, "discard", F.FUA, NbdErrno.EINVAL);
      case Cmd.WRITE_ZEROES:
        return this.modify(r, "write-zeroes", F.FUA | F.NO_HOLE | F.FAST_ZERO, NbdErrno.ENOSPC);
      case Cmd.FLUSH:
        if (!this.flagsOk(r, F.FUA)) return;
        return this.submit(r, "flush", null, BioFlags.PREFLUSH, null, 0);
      case Cmd.CACHE:
        // A hint we have no cache for: check it like a read, then succeed.
        if (this.flagsOk(r, F.FUA) && this.rangeOk(r, NbdErrno.EINVAL, false)) this.succeed(r);
        return;
      default:
        return this.fail(r, NbdErrno.EINVAL, `${commandName(r.type)} is not supported`);
    }
  }

  private read(r: NbdRequest): void {
    const allowed = CmdFlags.FUA | (this.structured ? CmdFlags.DF : 0);
    if (!this.flagsOk(r, allowed) || !this.rangeOk(r, NbdErrno.EINVAL, true)) return;
    if (r.length === 0) return this.succeed(r);
    // One allocation for reply header + data: the device reads straight into the reply.
    const prefix = readReplyPrefix(this.structured);
    const reply = this.settings.buffers.take(prefix + r.length);
    if (this.structured) writeOffsetDataHeader(reply, r.handle, r.offset, r.length);
    else writeSimpleReplyHeader(reply, r.handle, 0);
    const data = reply.subarray(prefix);
    // Large reads may come back as file ranges, sent without copying (reply-writer.ts).
    const ranges =
      this.out.zeroCopy && r.length >= ZERO_COPY_MIN ? new FileRangeRead(data, ZERO_COPY_MIN, dupFd) : null;
    this.submit(r, "read", data, 0, reply, reply.length, ranges);
  }

  /** WRITE, TRIM, WRITE_ZEROES: flags, limits, permission and range, then the bio. */
  private modify(r: NbdRequest, op: "write" | "discard" | "write-zeroes", allowed: number, pastEnd: number): void {
    if (!this.flagsOk(r, allowed) || !this.rangeOk(r, pastEnd, op === "write")) return;
    const device = this.device!;
    if (device.readOnly) return this.fail(r, NbdErrno.EPERM, "export is read-only");
    if (op === "write-zeroes" && r.flags & CmdFlags.FAST_ZERO && !device.fastZeroes) {
      return this.fail(r, NbdErrno.ENOTSUP, "fast zeroing is not known to be cheaper than writing");
    }
    // TRIM is advisory: a device that cannot discard simply ignores it.
    if (r.length === 0 || (op === "discard" && !device.supportsDiscard)) return this.succeed(r);
    let flags = r.flags & CmdFlags.FUA ? BioFlags.FUA : 0;
    if (r.flags & CmdFlags.NO_HOLE) flags |= BioFlags.NOUNMAP;
    const data = op === "write" ? r.data : null;
    this.submit(r, op, data, flags, null, data?.length ?? 0);
  }

  private flagsOk(r: NbdRequest, allowed: number): boolean {
    if ((r.flags & ~allowed) === 0) return true;
    return this.reject(r, NbdErrno.EINVAL, `unsupported flags 0x${r.flags.toString(16)}`);
  }

  /** Length limit (payload commands), sector alignment, and the export's end. */
  private rangeOk(r: NbdRequest, pastEnd: number, carriesPayload: boolean): boolean {
    if (r.payloadDropped || (carriesPayload && r.length > this.settings.maxPayload)) {
      return this.reject(r, NbdErrno.EINVAL, `length ${r.length} exceeds the maximum ${this.settings.maxPayload}`);
    }
    if (r.offset % MIN_BLOCK_SIZE !== 0 || r.length % MIN_BLOCK_SIZE !== 0) {
      return this.reject(
        r,
        NbdErrno.EINVAL,
        `offset ${r.offset} / length ${r.length} not aligned to ${MIN_BLOCK_SIZE} bytes`,
      );
    }
    const size = exportSizeBytes(this.device!);
    if (r.offset + r.length > size) {
      return this.reject(r, pastEnd, `${r.offset}+${r.length} is past the end of the export (${size} bytes)`);
    }
    return true;
  }

  private reject(r: NbdRequest, error: number, message: string): false {
    this.fail(r, error, `${commandName(r.type)}: ${message}`);
    return false;
  }

  private submit(
    r: NbdRequest,
    op: BioOp,
    data: Buffer | null,
    flags: number,
    reply: Buffer | null,
    cost: number,
    ranges: FileRangeRead | null = null,
  ): void {
    const bio = new Bio(op, r.offset / SECTOR_SIZE, r.length / SECTOR_SIZE, data, flags, this);
    bio.fileRanges = ranges;
    // A pooled payload now belongs to the bio; bioDone returns it.
    const payload = data && this.pooledPayloads.delete(data) ? data : null;
    bio.owner = new PendingRequest(r.handle, r.type, reply, cost, payload);
    this.inFlight++;
    this.inFlightBytes += cost;
    // may complete synchronously (RAM disks): bioDone copes
    const device = this.device!;
    if (op === "write-zeroes") bio.submitTo({ submit: (b) => submitWriteZeroes(device, b, () => this.isClosed) });
    else bio.submitTo(device);
  }

  bioDone(bio: Bio): void {
    const p = bio.owner as PendingRequest;
    this.inFlight--;
    this.inFlightBytes -= p.cost;
    // A completed bio no longer refers to its data (the bio contract), so the payload is free.
    if (p.payload) this.settings.buffers.give(p.payload);
    // TRIM is advisory: a target that cannot discard after all has still done what was asked.
    const ranges = bio.fileRanges;
    if (bio.status === "ok" || (p.type === Cmd.TRIM && bio.status === "EOPNOTSUPP")) {
      if (ranges && ranges.ranges.length > 0) this.out.writeRanges(p.reply!, readReplyPrefix(this.structured), ranges);
      else if (p.reply) this.send(p.reply, true);
      else this.send(simpleReply(p.handle, 0));
    } else {
      ranges?.release();
      if (p.reply) this.settings.buffers.give(p.reply);
      this.replyError(p.handle, nbdErrorFor(bio.status), `${commandName(p.type)} failed: ${bio.status}`);
      this.log().debug("nbd request failed", { command: commandName(p.type), status: bio.status, sector: bio.sector });
    }
    this.pump();
  }

  /** Success without a bio (zero lengths, CACHE, ignored TRIM). */
  private succeed(r: NbdRequest): void {
    if (r.type === Cmd.READ && this.structured) this.send(structuredNone(r.handle));
    else this.send(simpleReply(r.handle, 0));
  }

  private fail(r: NbdRequest, error: number, message: string): void {
    this.replyError(r.handle, error, message);
    this.log().debug("nbd request rejected", { command: commandName(r.type), error, message });
  }

  private replyError(handle: bigint, error: number, message: string): void {
    this.stats.errors++;
    // With structured replies, errors carry a message (and READ must not get a simple reply).
    this.send(this.structured ? structuredError(handle, error, message) : simpleReply(handle, error));
  }

  // ---- output and teardown ----

  /** Queue a message; `pooled`: `buf` goes back to the buffer pool once the socket is done with it. */
  private send(buf: Buffer, pooled = false): void {
    this.out.write(buf, pooled);
  }

  /** Flush queued replies, then close; destroy anyway if the client stops reading. */
  private endGracefully(): void {
    if (this.ending || this.socket.destroyed) return;
    this.ending = true;
    this.out.end(() => this.socket.destroy());
    this.timers.push(setTimeout(() => this.socket.destroy(), this.settings.lingerMs).unref());
  }

  private onClose(): void {
    this.isClosed = true;
    for (const t of this.timers) clearTimeout(t);
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.stopped = true;
    this.ending = true;
    this.out.close();
    const device = this.device;
    this.device = null;
    this.log().info("nbd client disconnected", {
      ...this.stats,
      zeroCopyBytes: this.out.zeroCopyBytes,
      inFlight: this.inFlight,
    });
    if (device) {
      // Requests still in flight complete into bioDone, whose replies are then dropped.
      void Promise.resolve()
        .then(() => device.close())
        .catch((err: Error) => this.log().error("nbd export close failed", { error: err.message }));
    }
    this.resolveClosed();
  }

  private log(): Logger {
    const fields = { conn: this.id, export: this.exportName ?? undefined };
    const logger = this.settings.logger;
    return {
      debug: (msg, f) => logger.debug(msg, { ...fields, ...f }),
      info: (msg, f) => logger.info(msg, { ...fields, ...f }),
      warn: (msg, f) => logger.warn(msg, { ...fields, ...f }),
      error: (msg, f) => logger.error(msg, { ...fields, ...f }),
    };
  }
}
