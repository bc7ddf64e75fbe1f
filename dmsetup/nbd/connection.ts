/**
 * One NBD client connection: the fixed newstyle handshake, then transmission, where every request
 * becomes a bio on the exported device and is answered as soon as that bio completes (replies go
 * out of order; the handle tells the client which is which).
 *
 * Flow control: requests are only taken from the parser while the connection has room (in-flight
 * count and bytes, and the reply backlog in the socket are bounded); otherwise the socket is
 * paused and the rest stays in the parser/kernel buffers until completions free room. Replies
 * written in the same tick are corked together so many small completions leave in one writev.
 *
 * Failure scope: anything wrong with this client's bytes closes this connection only; a request
 * the device or the checks reject gets an error reply and the connection goes on.
 */
import type { Socket } from "node:net";
import { Bio, type BioEndIo, BioFlags, type BioOp, type BioSink, type BioStatus, SECTOR_SIZE } from "../../core/bio.js";
import type { Logger } from "../../core/logger.js";
import { HandshakeParser, RequestParser } from "./parser.js";
import {
  ClientFlags,
  Cmd,
  CmdFlags,
  type HandshakeMessage,
  HandshakeFlags,
  Info,
  KNOWN_CLIENT_FLAGS,
  NbdErrno,
  NbdProtocolError,
  type NbdRequest,
  Opt,
  Rep,
  TransmissionFlags,
  commandName,
  optionName,
} from "./protocol.js";
import {
  exportNameReply,
  greeting,
  readReplyPrefix,
  repAck,
  repError,
  repInfoBlockSize,
  repInfoExport,
  repInfoString,
  repServer,
  simpleReply,
  structuredError,
  structuredNone,
  writeOffsetDataHeader,
  writeSimpleReplyHeader,
} from "./serializer.js";

/** What the server needs from an exported device. A MappedDevice satisfies it as is. */
export interface ExportDevice extends BioSink {
  readonly sizeSectors: number;
  readonly readOnly: boolean;
  readonly supportsDiscard: boolean;
  readonly supportsWriteZeroes: boolean;
  /**
   * Write-zeroes is known to be much cheaper than writing zeros (NBD_CMD_FLAG_FAST_ZERO may
   * proceed). Absent or false: FAST_ZERO requests fail at once with ENOTSUP, as proto.md asks
   * of a server that cannot tell in advance.
   */
  readonly fastZeroes?: boolean;
  /** Called when a connection enters transmission on this device... */
  open(): void;
  /** ...and when that connection is gone. */
  close(): void | Promise<void>;
}

/** Where exports come from; names are what clients put in NBD_OPT_GO / EXPORT_NAME. */
export interface ExportProvider {
  list(): string[];
  get(name: string): ExportDevice | undefined;
}

/**
 * Block size constraints we advertise (NBD_INFO_BLOCK_SIZE): the core addresses 512-byte sectors,
 * so requests must be sector-aligned; unaligned ones get EINVAL (see README in this directory).
 */
export const MIN_BLOCK_SIZE = SECTOR_SIZE;
export const PREFERRED_BLOCK_SIZE = 4096;

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
}

/** Per-request state the completion needs; rides on `bio.owner`. */
class PendingRequest {
  constructor(
    readonly handle: bigint,
    readonly type: number,
    /** Prebuilt READ reply (header + data the bio filled), null for other commands. */
    readonly reply: Buffer | null,
    readonly cost: number,
  ) {}
}

type Found = { name: string; device: ExportDevice };

function uncork(socket: Socket): void {
  socket.uncork();
}

export class NbdConnection implements BioEndIo {
  /** Canonical export name once in transmission. */
  exportName: string | null = null;
  readonly closed: Promise<void>;

  private device: ExportDevice | null = null;
  private handshake: HandshakeParser | null = new HandshakeParser();
  private requests: RequestParser | null = null;
  private structured = false;
  private noZeroes = false;
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
  private corked = false;
  private pumping = false;
  private timers: NodeJS.Timeout[] = [];
  private resolveClosed!: () => void;
  private readonly stats = { requests: 0, errors: 0 };

  constructor(
    private readonly socket: Socket,
    readonly id: number,
    private readonly settings: ConnectionSettings,
  ) {
    this.closed = new Promise((r) => (this.resolveClosed = r));
  }

  get inTransmission(): boolean {
    return this.requests !== null;
  }

  start(): void {
    const s = this.socket;
    s.on("data", (chunk: Buffer) => {
      (this.requests ?? this.handshake)?.push(chunk);
      this.starved = false;
      this.pump();
    });
    s.on("end", () => {
      this.eof = true;
      this.pump();
    });
    s.on("drain", () => this.pump());
    s.on("error", (err) => this.log().debug("nbd socket error", { error: err.message }));
    s.on("close", () => this.onClose());
    this.send(greeting(HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES));
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
      while (!this.stopped && this.hasRoom()) {
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
      this.socket.writableLength <= this.settings.maxQueuedReplyBytes
    );
  }

  private settle(): void {
    const inputDone = this.eof && this.starved;
    if (inputDone && !this.stopped && !this.warnedTruncated && (this.requests ?? this.handshake)?.midMessage) {
      this.warnedTruncated = true;
      this.log().warn("nbd client closed mid-message (truncated packet)");
    }
    if (this.inFlight === 0 && (this.stopped || inputDone || this.shuttingDown)) this.endGracefully();
    if (this.stopped || !this.hasRoom()) this.socket.pause();
    else this.socket.resume();
  }

  private takeHandshake(): boolean {
    const m = this.handshake?.next() ?? null;
    if (m === null) return false;
    this.onHandshake(m);
    return true;
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
    this.socket.destroy(); // a hard disconnect: the stream can no longer be trusted
  }

  // ---- handshake ----

  private onHandshake(m: HandshakeMessage): void {
    switch (m.kind) {
      case "clientFlags":
        if ((m.flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
          throw new NbdProtocolError(`unknown client flags 0x${m.flags.toString(16)}`);
        }
        this.noZeroes = (m.flags & ClientFlags.NO_ZEROES) !== 0;
        return;
      case "exportName": {
        const found = this.resolve(m.name);
        // EXPORT_NAME cannot be answered with an error: the spec says to drop the connection.
        if (!found) throw new NbdProtocolError(`NBD_OPT_EXPORT_NAME: no export "${m.name}"`);
        this.send(exportNameReply(this.sizeBytes(found.device), this.transmissionFlags(found.device), this.noZeroes));
        this.enterTransmission(found);
        return;
      }
      case "info":
        return this.onInfo(m.option, m.name, m.requests);
      case "option":
        return this.onOption(m.option, m.data);
      case "invalidOption":
        if (m.option === Opt.EXPORT_NAME) throw new NbdProtocolError(m.reason);
        this.send(repError(m.option, Rep.ERR_INVALID, m.reason));
        return;
      case "oversizeOption": {
        if (m.option === Opt.EXPORT_NAME) throw new NbdProtocolError(`NBD_OPT_EXPORT_NAME of ${m.length} bytes`);
        const known = m.option === Opt.INFO || m.option === Opt.GO || m.option === Opt.LIST || m.option === Opt.STRUCTURED_REPLY;
        this.send(repError(m.option, known ? Rep.ERR_TOO_BIG : Rep.ERR_UNSUP, `${optionName(m.option)}: ${m.length}-byte option ignored`));
        return;
      }
    }
  }

  /** NBD_OPT_INFO / NBD_OPT_GO: describe the export; GO then enters transmission. */
  private onInfo(option: number, name: string, requests: number[]): void {
    const found = this.resolve(name);
    if (!found) {
      const why = name === "" ? `no default export (there are ${this.settings.exports.list().length} exports)` : `no export named "${name}"`;
      this.send(repError(option, Rep.ERR_UNKNOWN, why));
      return;
    }
    const { device } = found;
    this.send(repInfoExport(option, this.sizeBytes(device), this.transmissionFlags(device)));
    // Sent even when not asked for (allowed): clients that understand it will then align.
    this.send(repInfoBlockSize(option, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, this.settings.maxPayload));
    if (requests.includes(Info.NAME)) this.send(repInfoString(option, Info.NAME, found.name));
    this.send(repAck(option));
    if (option === Opt.GO) this.enterTransmission(found);
  }

  private onOption(option: number, data: Buffer): void {
    switch (option) {
      case Opt.ABORT:
        this.send(repAck(option));
        this.stopped = true;
        return;
      case Opt.LIST:
        if (data.length !== 0) return void this.send(repError(option, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data"));
        for (const name of this.settings.exports.list()) this.send(repServer(option, name));
        this.send(repAck(option));
        return;
      case Opt.STRUCTURED_REPLY:
        if (data.length !== 0) return void this.send(repError(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"));
        if (this.structured) return void this.send(repError(option, Rep.ERR_INVALID, "structured replies already negotiated"));
        this.structured = true;
        this.send(repAck(option));
        return;
      case Opt.STARTTLS:
        this.send(repError(option, Rep.ERR_UNSUP, "TLS is not supported by this server"));
        return;
      default:
        this.send(repError(option, Rep.ERR_UNSUP, `${optionName(option)} is not supported`));
    }
  }

  /** The export for `name`; "" means the only export when there is exactly one. */
  private resolve(name: string): Found | null {
    const exports = this.settings.exports;
    const direct = exports.get(name);
    if (direct) return { name, device: direct };
    if (name !== "") return null;
    const all = exports.list();
    if (all.length !== 1) return null;
    const device = exports.get(all[0]!);
    return device ? { name: all[0]!, device } : null;
  }

  private transmissionFlags(device: ExportDevice): number {
    const T = TransmissionFlags;
    // One device object serves every connection, and a flush reaches its backing files: the
    // effects of FLUSH/FUA are visible to all connections, which is what CAN_MULTI_CONN promises.
    let flags = T.HAS_FLAGS | T.SEND_FLUSH | T.SEND_FUA | T.CAN_MULTI_CONN | T.SEND_CACHE;
    if (device.readOnly) flags |= T.READ_ONLY;
    else {
      if (device.supportsDiscard) flags |= T.SEND_TRIM;
      if (device.supportsWriteZeroes) flags |= T.SEND_WRITE_ZEROES | T.SEND_FAST_ZERO;
    }
    // Reads are always one chunk, so "don't fragment" is free to honour.
    if (this.structured) flags |= T.SEND_DF;
    return flags;
  }

  private sizeBytes(device: ExportDevice): number {
    return device.sizeSectors * SECTOR_SIZE;
  }

  private enterTransmission(found: Found): void {
    found.device.open();
    this.device = found.device;
    this.exportName = found.name;
    this.requests = new RequestParser({ maxPayload: this.settings.maxPayload });
    this.requests.push(this.handshake!.takeRemaining());
    this.handshake = null;
    this.log().info("nbd client attached", { structured: this.structured, sizeBytes: this.sizeBytes(found.device) });
  }

  // ---- transmission ----

  private onRequest(r: NbdRequest): void {
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
    const reply = Buffer.allocUnsafe(prefix + r.length);
    if (this.structured) writeOffsetDataHeader(reply, r.handle, r.offset, r.length);
    else writeSimpleReplyHeader(reply, r.handle, 0);
    this.submit(r, "read", reply.subarray(prefix), 0, reply, reply.length);
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
    this.fail(r, NbdErrno.EINVAL, `${commandName(r.type)}: unsupported flags 0x${r.flags.toString(16)}`);
    return false;
  }

  /** Length limit (payload commands), sector alignment, and the export's end. */
  private rangeOk(r: NbdRequest, pastEnd: number, carriesPayload: boolean): boolean {
    const name = commandName(r.type);
    if (r.payloadDropped || (carriesPayload && r.length > this.settings.maxPayload)) {
      return this.reject(r, NbdErrno.EINVAL, `${name}: length ${r.length} exceeds the maximum ${this.settings.maxPayload}`);
    }
    if (r.offset % MIN_BLOCK_SIZE !== 0 || r.length % MIN_BLOCK_SIZE !== 0) {
      return this.reject(r, NbdErrno.EINVAL, `${name}: offset ${r.offset} / length ${r.length} not aligned to ${MIN_BLOCK_SIZE} bytes`);
    }
    const size = this.sizeBytes(this.device!);
    if (r.offset + r.length > size) {
      return this.reject(r, pastEnd, `${name}: ${r.offset}+${r.length} is past the end of the export (${size} bytes)`);
    }
    return true;
  }

  private reject(r: NbdRequest, error: number, message: string): false {
    this.fail(r, error, message);
    return false;
  }

  private submit(r: NbdRequest, op: BioOp, data: Buffer | null, flags: number, reply: Buffer | null, cost: number): void {
    const bio = new Bio(op, r.offset / SECTOR_SIZE, r.length / SECTOR_SIZE, data, flags, this);
    bio.owner = new PendingRequest(r.handle, r.type, reply, cost);
    this.inFlight++;
    this.inFlightBytes += cost;
    bio.submitTo(this.device!); // may complete synchronously (RAM disks): bioDone copes
  }

  bioDone(bio: Bio): void {
    const p = bio.owner as PendingRequest;
    this.inFlight--;
    this.inFlightBytes -= p.cost;
    if (bio.status === "ok") {
      if (p.reply) this.send(p.reply);
      else this.send(simpleReply(p.handle, 0));
    } else {
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

  private send(buf: Buffer): void {
    const s = this.socket;
    if (s.destroyed || s.writableEnded) return; // completions after the client left
    if (!this.corked) {
      this.corked = true;
      s.cork();
      process.nextTick(() => {
        this.corked = false;
        uncork(s);
      });
    }
    s.write(buf);
  }

  /** Flush queued replies, then close; destroy anyway if the client stops reading. */
  private endGracefully(): void {
    if (this.ending || this.socket.destroyed) return;
    this.ending = true;
    this.socket.end(() => this.socket.destroy());
    this.timers.push(setTimeout(() => this.socket.destroy(), this.settings.lingerMs).unref());
  }

  private onClose(): void {
    for (const t of this.timers) clearTimeout(t);
    this.stopped = true;
    this.ending = true;
    const device = this.device;
    this.device = null;
    this.log().info("nbd client detached", { ...this.stats, inFlight: this.inFlight });
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

/** Bio status → NBD error value (the protocol's fixed set, not host errno numbers). */
export function nbdErrorFor(status: BioStatus): number {
  switch (status) {
    case "EPERM":
      return NbdErrno.EPERM;
    case "ENOSPC":
      return NbdErrno.ENOSPC;
    case "EINVAL":
      return NbdErrno.EINVAL;
    case "EOPNOTSUPP":
      return NbdErrno.ENOTSUP;
    case "ENXIO":
      // The device was removed under us: ESHUTDOWN makes the client disconnect cleanly.
      return NbdErrno.ESHUTDOWN;
    default:
      return NbdErrno.EIO;
  }
}
