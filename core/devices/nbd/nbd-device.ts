/**
 * NbdDevice: an NBD export as a BlockDevice, so a table can name `nbd://HOST/EXPORT` wherever it
 * names a file or a block device. The kernel's nbd driver is the model: bios become NBD requests,
 * many in flight, answered in any order.
 *
 * - **Geometry.** Size, read-only flag and block size constraints come from the server
 *   (NBD_OPT_GO with NBD_INFO_BLOCK_SIZE). The logical block size is the server's minimum block
 *   size, at least 512; bios not aligned to it fail with EINVAL. READ and WRITE are cut at the
 *   server's maximum block size (at most 32 MiB), TRIM and WRITE_ZEROES at 1 GiB, or not at all
 *   where the server took NBD_OPT_EXTENDED_HEADERS (64-bit lengths; if it refuses such a request
 *   with EOVERFLOW or EINVAL, it goes again cut at 1 GiB, and so do the device's later ones).
 * - **Flags as the server allows them** (proto.md, "Transmission flags"): FLUSH only with
 *   SEND_FLUSH (else a flush completes at once: the server keeps no volatile cache); FUA as the
 *   request flag with SEND_FUA, else as a FLUSH after the write; PREFLUSH as a FLUSH before it;
 *   discard as TRIM only with SEND_TRIM, write-zeroes only with SEND_WRITE_ZEROES (NOUNMAP →
 *   NO_HOLE); otherwise EOPNOTSUPP, as the BlockDevice contract says.
 * - **Multi-conn.** Where the server sets CAN_MULTI_CONN, `connections` connections (default 4)
 *   share the requests, each to the one with the fewest in flight; a FLUSH on any of them covers
 *   writes answered on all (proto.md). Otherwise one connection.
 * - **Faults.** A connection that drops (or sends garbage, or answers ESHUTDOWN) is reconnected
 *   with backoff (50 ms doubling to 2 s, for as long as the device is open). Requests it had in
 *   flight are sent again once a connection is back: reads, writes, trims and zeroes are
 *   idempotent and the submitter has not seen them complete. When every connection was lost, the
 *   server may have restarted and lost writes it had acknowledged but not flushed, so those
 *   (unflushed-writes.ts) are written again first, before anything else is sent; if there were more
 *   than the replay buffer holds, the next FLUSH fails with EIO. Requests fail with EIO instead when
 *   the I/O timeout (`timeoutMs`, default 30 s) runs out: a request unanswered that long (its
 *   connection is dropped: the server is presumed hung), a request still not done that long after
 *   its connection was lost, and everything waiting once the device has had no connection for that
 *   long; from then on new requests fail at once until a connection is back.
 * - **Nothing the server sends crashes the daemon**: framing errors drop the connection
 *   (reply-reader.ts); a server that comes back smaller makes requests past its new end fail with
 *   EIO; an error reply fails only its request.
 */
import { type Bio, BioFlags, type BioStatus, SECTOR_SIZE } from "../../bio.js";
import { JsonLineLogger, type Logger } from "../../logger.js";
import type { BlockDevice, OpenOptions } from "../block-device.js";
import { type NbdConnection, type NbdRequest, openConnection } from "./connection.js";
import type { ExportInfo } from "./handshake.js";
import { type ClientTls, loadClientTls } from "./tls.js";
import { type NbdUri, describeTransport, parseNbdUri } from "./uri.js";
import { UnflushedWrites } from "./unflushed-writes.js";
import { Cmd, CmdFlags, NbdErrno, TransmissionFlags, cmdName } from "./wire.js";

export interface NbdDeviceOptions {
  /** Connections when the server allows multi-conn (default 4; the URI's x-udm-connections wins). */
  connections?: number;
  /** The I/O timeout in ms (default 30 000; the URI's x-udm-timeout wins). */
  timeoutMs?: number;
  /** Connect + handshake limit per attempt, ms (default 10 000, and never above the I/O timeout). */
  connectTimeoutMs?: number;
  /** Reconnect backoff: the first delay and the largest, ms (default 50 and 2000). */
  reconnectDelayMs?: { first: number; max: number };
  /** Bytes of acknowledged, unflushed writes kept for sending again (default 32 MiB; the URI's x-udm-replay-mib wins). */
  replayLimitBytes?: number;
  logger?: Logger;
}

export const DEFAULT_TIMEOUT_MS = 30_000;
export const DEFAULT_CONNECTIONS = 4;
const DEFAULT_REPLAY_LIMIT = 32 * 1024 * 1024;
/** Per connection: requests and bytes in flight before new ones wait in the device's queue. */
const MAX_IN_FLIGHT = 64;
const MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;
/**
 * Requests a connection takes before the next one gets any: a burst stays on one connection (one
 * writev, one stream of replies) unless it is deep enough to be worth spreading.
 */
const SPILL = 16;
/** TRIM and WRITE_ZEROES carry a 32-bit length in a compact request header; cut them at 1 GiB. */
const MAX_ZERO_LENGTH = 1 << 30;
/**
 * With extended headers their length is 64 bits: no cut in practice (2^52 is a multiple of every
 * block size and above every export size a Number can address).
 */
const MAX_EXTENDED_ZERO_LENGTH = 2 ** 52;

let defaultLogger: Logger = new JsonLineLogger("info", process.stderr, { component: "nbd-client" });

/** Where NBD devices opened without a logger of their own log (udmd: its JSON lines on stderr). */
export function setNbdClientLogger(logger: Logger): void {
  defaultLogger = logger;
}

/** What `udmsetup info` says about a remote device (docs/nbd.md, "Connection state"). */
export interface NbdConnectionState {
  /** connected: every connection up; degraded: some; reconnecting: none yet; failed: none for longer than the timeout. */
  state: "connected" | "degraded" | "reconnecting" | "failed" | "closed";
  /** Where the device connects: `unix socket PATH` or `HOST:PORT`. */
  server: string;
  /** Connections the device keeps (1, or x-udm-connections with multi-conn) and how many are up. */
  connections: number;
  connected: number;
  /**
   * While a connection is down: the number of the reconnect attempt under way or next (1 after the
   * loss, counting up with each failure; the highest over the connections that are down), else 0.
   */
  attempt: number;
  /** Times the device got a connection back after having none. */
  reconnects: number;
  /** Requests sent and not answered, and requests waiting for room or for a connection. */
  inFlight: number;
  queued: number;
  /** Acknowledged writes not yet covered by a FLUSH, kept for sending again. */
  unflushedBytes: number;
  /** The reply format the last connection negotiated: NBD_OPT_EXTENDED_HEADERS, structured, or simple replies. */
  replies: "extended" | "structured" | "simple";
  lastError: string | null;
}

function openError(uri: string, err: unknown): Error {
  const e = err as NodeJS.ErrnoException;
  return Object.assign(new Error(`${uri}: ${e.message}`, { cause: err }), { code: e.code ?? "EIO" });
}

/** An NBD error value as a bio status (proto.md, "Error values"). */
export function nbdErrnoToStatus(errno: number): BioStatus {
  switch (errno) {
    case 0:
      return "ok";
    case NbdErrno.EPERM:
      return "EPERM";
    case NbdErrno.ENOSPC:
      return "ENOSPC";
    case NbdErrno.ENOTSUP:
      return "EOPNOTSUPP";
    default:
      return "EIO";
  }
}

/** One request of one bio (or of a replay). */
class Req implements NbdRequest {
  conn: NbdConnection | null = null;
  sentAt = 0;
  /** FLUSH: the unflushed-writes mark when it was sent. */
  flushMark = 0;
  /** When a connection carrying it was first lost (0: never): its retries end a timeout later. */
  lostAt = 0;
  /** Its connection was dropped because this request got no reply in time. */
  timedOut = false;
  /** A replayed write: the round it belongs to. */
  round = 0;

  constructor(
    readonly cmd: number,
    readonly flags: number,
    readonly offset: number,
    readonly length: number,
    readonly buffer: Buffer | null,
    readonly payload: Buffer | null,
    /** The bio's work, or null for a replayed write. */
    readonly work: BioWork | null,
    /** Submission order (requeued requests go back in this order). */
    readonly seq: number,
  ) {}
}

/** What one bio needs: an optional FLUSH first, the body's requests, an optional FLUSH after. */
class BioWork {
  private outstanding = 0;
  private status: BioStatus = "ok";
  private stage: "preflush" | "body" | "postflush" = "body";

  constructor(
    private readonly device: NbdDevice,
    readonly bio: Bio,
    /** The body: one FLUSH, or `cmd` requests of at most `max` bytes over the bio's range. */
    private readonly cmd: number,
    private readonly flags: number,
    private readonly max: number,
    private readonly preflush: boolean,
    private readonly postflush: boolean,
  ) {}

  start(): void {
    if (this.preflush) {
      this.stage = "preflush";
      this.issue([this.device.flushReq(this)]);
    } else this.startBody();
  }

  private startBody(): void {
    this.stage = "body";
    const bio = this.bio;
    const reqs =
      this.cmd === Cmd.FLUSH
        ? [this.device.flushReq(this)]
        : this.device.cut(this, this.cmd, this.flags, bio.sector * SECTOR_SIZE, bio.sectors * SECTOR_SIZE, this.max);
    if (reqs.length === 0) return this.afterBody();
    this.issue(reqs);
  }

  private afterBody(): void {
    if (this.postflush && this.status === "ok") {
      this.stage = "postflush";
      this.issue([this.device.flushReq(this)]);
    } else this.bio.complete(this.status);
  }

  private issue(reqs: Req[]): void {
    this.outstanding = reqs.length;
    for (const r of reqs) this.device.enqueue(r);
  }

  /** One of its requests was cut into `pieces` sent in its place. */
  replaced(pieces: number): void {
    this.outstanding += pieces - 1;
  }

  done(status: BioStatus): void {
    if (status !== "ok" && this.status === "ok") this.status = status;
    if (--this.outstanding > 0) return;
    if (this.stage === "preflush") {
      if (this.status !== "ok") return this.bio.complete(this.status);
      return this.startBody();
    }
    if (this.stage === "body") return this.afterBody();
    this.bio.complete(this.status);
  }
}

interface Slot {
  conn: NbdConnection | null;
  connecting: boolean;
  attempts: number;
  timer: NodeJS.Timeout | null;
}

export class NbdDevice implements BlockDevice {
  readonly tableName: string;
  readonly displayName: string;
  readOnly: boolean;
  private info: ExportInfo;
  private readonly slots: Slot[] = [];
  private queue: Req[] = [];
  /** Writes being sent again after every connection was lost; the queue waits for them. */
  private replayQueue: Req[] = [];
  private replayOutstanding = 0;
  private replayNeeded = false;
  /** Which round of replayed writes is current (a lost connection starts a new one). */
  private replayRound = 0;
  private readonly unflushed: UnflushedWrites | null;
  /** Writes may have been lost: the next FLUSH reports EIO. */
  private lostWrites = false;
  private disconnectedSince: number | null = null;
  private failFast = false;
  /** TRIM and WRITE_ZEROES go uncut over extended headers, until the server refuses one. */
  private largeZeroes = true;
  private closed = false;
  private seq = 0;
  private reconnects = 0;
  private lastError: string | null = null;
  private readonly watchdog: NodeJS.Timeout;
  private readonly timeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly backoff: { first: number; max: number };
  private readonly logger: Logger;
  /** Waiting for a connection (whenConnected). */
  private connectedWaiters: (() => void)[] = [];

  /** Connect to the export `spec` names (an NBD URI) and negotiate; the first connection must succeed. */
  static async open(spec: string, opts: OpenOptions, devOpts: NbdDeviceOptions = {}): Promise<NbdDevice> {
    const uri = parseNbdUri(spec);
    const tls = uri.tls ? loadClientTls(uri) : null;
    const timeoutMs = uri.timeoutMs ?? devOpts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const connectTimeoutMs = Math.min(devOpts.connectTimeoutMs ?? 10_000, timeoutMs);
    const device = new NbdDevice(uri, tls, opts, devOpts, timeoutMs, connectTimeoutMs);
    try {
      await device.connectFirst();
    } catch (err) {
      await device.close();
      throw openError(spec, err);
    }
    return device;
  }

  private constructor(
    private readonly uri: NbdUri,
    private readonly tls: ClientTls | null,
    opts: OpenOptions,
    private readonly devOpts: NbdDeviceOptions,
    timeoutMs: number,
    connectTimeoutMs: number,
  ) {
    this.tableName = uri.text;
    this.displayName = uri.text;
    this.readOnly = opts.mode !== "rw";
    this.timeoutMs = timeoutMs;
    this.connectTimeoutMs = connectTimeoutMs;
    this.backoff = devOpts.reconnectDelayMs ?? { first: 50, max: 2000 };
    this.logger = devOpts.logger ?? defaultLogger;
    this.info = {
      size: 0,
      flags: 0,
      minBlock: 512,
      preferredBlock: 4096,
      maxPayload: 512,
      structured: false,
      extended: false,
    };
    this.unflushed = new UnflushedWrites(uri.replayBytes ?? devOpts.replayLimitBytes ?? DEFAULT_REPLAY_LIMIT);
    const period = Math.min(1000, Math.max(10, Math.floor(timeoutMs / 4)));
    this.watchdog = setInterval(() => this.checkTimeouts(), period);
    this.watchdog.unref();
  }

  // ---- BlockDevice ----

  get sizeSectors(): number {
    return Math.floor(this.info.size / SECTOR_SIZE);
  }

  get logicalBlockSize(): number {
    return Math.max(SECTOR_SIZE, this.info.minBlock);
  }

  get supportsDiscard(): boolean {
    return this.has(TransmissionFlags.SEND_TRIM);
  }

  get supportsWriteZeroes(): boolean {
    return this.has(TransmissionFlags.SEND_WRITE_ZEROES);
  }

  /** The export's transmission flags as the server last stated them. */
  get transmissionFlags(): number {
    return this.info.flags;
  }

  private has(flag: number): boolean {
    return (this.info.flags & flag) !== 0;
  }

  submit(bio: Bio): void {
    const status = this.check(bio);
    if (status !== "ok") return bio.complete(status);
    const flush = this.has(TransmissionFlags.SEND_FLUSH);
    const fua = bio.isFua && this.has(TransmissionFlags.SEND_FUA) ? CmdFlags.FUA : 0;
    const emulateFua = bio.isFua && fua === 0 && flush;
    const preflush = bio.isPreflush && flush && bio.op !== "flush" && bio.op !== "read";
    const payload = this.info.maxPayload;
    switch (bio.op) {
      case "flush":
        if (!flush) return bio.complete("ok");
        return new BioWork(this, bio, Cmd.FLUSH, 0, 0, false, false).start();
      case "read":
        return new BioWork(this, bio, Cmd.READ, 0, payload, false, false).start();
      case "write":
        return new BioWork(this, bio, Cmd.WRITE, fua, payload, preflush, emulateFua).start();
      case "discard":
        return new BioWork(this, bio, Cmd.TRIM, 0, this.zeroMax(), preflush, false).start();
      case "write-zeroes": {
        const noHole = bio.flags & BioFlags.NOUNMAP ? CmdFlags.NO_HOLE : 0;
        return new BioWork(this, bio, Cmd.WRITE_ZEROES, fua | noHole, this.zeroMax(), preflush, emulateFua).start();
      }
    }
  }

  private check(bio: Bio): BioStatus {
    if (this.closed) return "ENXIO";
    if (bio.op === "flush") return "ok";
    if (!Number.isSafeInteger(bio.sector) || !Number.isSafeInteger(bio.sectors) || bio.sector < 0 || bio.sectors < 0) {
      return "EINVAL";
    }
    if (this.readOnly && bio.op !== "read") return "EPERM";
    if (bio.sector + bio.sectors > this.sizeSectors) return "EIO";
    if ((bio.op === "read" || bio.op === "write") && bio.data.length < bio.sectors * SECTOR_SIZE) return "EINVAL";
    if (bio.op === "discard" && !this.supportsDiscard) return "EOPNOTSUPP";
    if (bio.op === "write-zeroes" && !this.supportsWriteZeroes) return "EOPNOTSUPP";
    const unit = this.logicalBlockSize;
    if (unit > SECTOR_SIZE && ((bio.sector * SECTOR_SIZE) % unit !== 0 || (bio.sectors * SECTOR_SIZE) % unit !== 0)) {
      return "EINVAL";
    }
    return "ok";
  }

  private zeroMax(): number {
    if (this.info.extended && this.largeZeroes) return MAX_EXTENDED_ZERO_LENGTH;
    const unit = this.logicalBlockSize;
    return MAX_ZERO_LENGTH - (MAX_ZERO_LENGTH % unit);
  }

  /** A TRIM or WRITE_ZEROES too long for `conn` (compact headers, or a server that refused one). */
  private tooLong(req: Req, conn: NbdConnection): boolean {
    return (
      req.length > MAX_ZERO_LENGTH &&
      (req.cmd === Cmd.TRIM || req.cmd === Cmd.WRITE_ZEROES) &&
      !(conn.info.extended && this.largeZeroes)
    );
  }

  /** `req` cut at 1 GiB: the pieces to send instead (its bio, or the replay, waits for each). */
  private recut(req: Req): Req[] {
    const unit = this.logicalBlockSize;
    const max = MAX_ZERO_LENGTH - (MAX_ZERO_LENGTH % unit);
    const pieces: Req[] = [];
    for (let at = 0; at < req.length; at += max) {
      const n = Math.min(max, req.length - at);
      const piece = new Req(req.cmd, req.flags, req.offset + at, n, null, null, req.work, req.seq);
      piece.round = req.round;
      piece.lostAt = req.lostAt;
      pieces.push(piece);
    }
    if (req.work) req.work.replaced(pieces.length);
    else this.replayOutstanding += pieces.length - 1;
    return pieces;
  }

  /** `work`'s requests: at most `max` bytes each, covering [pos, pos + bytes) (its bio's data for READ and WRITE). */
  cut(work: BioWork, cmd: number, flags: number, pos: number, bytes: number, max: number): Req[] {
    const data = cmd === Cmd.READ || cmd === Cmd.WRITE ? work.bio.data : null;
    if (bytes <= max) {
      const view = data && data.length !== bytes ? data.subarray(0, bytes) : data;
      return [
        new Req(
          cmd,
          flags,
          pos,
          bytes,
          cmd === Cmd.READ ? view : null,
          cmd === Cmd.WRITE ? view : null,
          work,
          this.seq++,
        ),
      ];
    }
    const reqs: Req[] = [];
    for (let done = 0; done < bytes; done += max) {
      const n = Math.min(max, bytes - done);
      const view = data ? data.subarray(done, done + n) : null;
      reqs.push(
        new Req(
          cmd,
          flags,
          pos + done,
          n,
          cmd === Cmd.READ ? view : null,
          cmd === Cmd.WRITE ? view : null,
          work,
          this.seq++,
        ),
      );
    }
    return reqs;
  }

  /** A FLUSH for `work`. */
  flushReq(work: BioWork): Req {
    return new Req(Cmd.FLUSH, 0, 0, 0, null, null, work, this.seq++);
  }

  // ---- scheduling ----

  /** Queue a request and send what the connections have room for. */
  enqueue(req: Req): void {
    if (this.failFast) return this.finish(req, "EIO");
    this.queue.push(req);
    this.dispatch();
  }

  private readyConnections(): NbdConnection[] {
    const ready: NbdConnection[] = [];
    for (const s of this.slots) if (s.conn?.isOpen) ready.push(s.conn);
    return ready;
  }

  /**
   * Where `req` goes: the first ready connection with fewer than SPILL requests in flight, so the
   * requests of one turn leave together in one writev; past that, the one with the fewest in
   * flight that has room. Null when none has room.
   */
  private pick(ready: NbdConnection[], req: Req): NbdConnection | null {
    let best: NbdConnection | null = null;
    for (const c of ready) {
      const room =
        c.inFlightCount === 0 ||
        (c.inFlightCount < MAX_IN_FLIGHT && c.inFlightBytes + req.length <= MAX_IN_FLIGHT_BYTES);
      if (!room) continue;
      if (c.inFlightCount < SPILL) return c;
      if (best === null || c.inFlightCount < best.inFlightCount) best = c;
    }
    return best;
  }

  private dispatch(): void {
    if (this.closed) return;
    const ready = this.readyConnections();
    if (ready.length === 0) return;
    const now = Date.now();
    while (this.replayQueue.length > 0) {
      const conn = this.pick(ready, this.replayQueue[0]!);
      if (!conn) return;
      const req = this.replayQueue.shift()!;
      if (this.tooLong(req, conn)) this.replayQueue.unshift(...this.recut(req));
      else conn.send(req, now);
    }
    if (this.replayOutstanding > 0) return; // nothing overtakes the writes being sent again
    while (this.queue.length > 0) {
      const req = this.queue[0]!;
      const conn = this.pick(ready, req);
      if (!conn) return;
      this.queue.shift();
      // The server may have come back smaller, or with smaller limits, since the request was made.
      if (req.cmd !== Cmd.FLUSH && req.offset + req.length > this.info.size) {
        this.finish(req, "EIO");
        continue;
      }
      if ((req.cmd === Cmd.READ || req.cmd === Cmd.WRITE) && req.length > this.info.maxPayload) {
        this.finish(req, "EIO");
        continue;
      }
      if (this.tooLong(req, conn)) {
        this.queue.unshift(...this.recut(req));
        continue;
      }
      if (req.cmd === Cmd.FLUSH) req.flushMark = this.unflushed?.mark ?? 0;
      conn.send(req, now);
    }
  }

  private finish(req: Req, status: BioStatus): void {
    req.work?.done(status);
  }

  // ---- connection events ----

  private readonly events = {
    replied: (conn: NbdConnection, req: NbdRequest, errno: number, message: string | null) =>
      this.onReplied(conn, req as Req, errno, message),
    closed: (conn: NbdConnection, reason: Error, inFlight: NbdRequest[]) =>
      this.onClosed(conn, reason, inFlight as Req[]),
  };

  private onReplied(conn: NbdConnection, req: Req, errno: number, message: string | null): void {
    if (errno === NbdErrno.ESHUTDOWN && !this.closed) {
      // proto.md: a client that receives ESHUTDOWN MUST initiate a soft disconnect. The request
      // was not carried out; it goes again on the next connection.
      this.lastError = "the server is shutting down (ESHUTDOWN)";
      if (req.work === null) {
        if (req.round === this.replayRound) this.replayQueue.unshift(req);
      } else this.requeue([req]);
      conn.disconnect();
      return;
    }
    if (
      (errno === NbdErrno.EOVERFLOW || errno === NbdErrno.EINVAL) &&
      req.length > MAX_ZERO_LENGTH &&
      (req.cmd === Cmd.TRIM || req.cmd === Cmd.WRITE_ZEROES) &&
      !this.closed
    ) {
      // The extension lets a server refuse a long effect length this way: send it again cut at
      // 1 GiB (dispatch cuts it), and cut every later one.
      if (this.largeZeroes) {
        this.largeZeroes = false;
        this.logger.info("nbd: the server refused a TRIM or WRITE_ZEROES over 1 GiB; cutting them at 1 GiB", {
          uri: this.uri.text,
          command: cmdName(req.cmd),
          length: req.length,
          error: message ?? errno,
        });
      }
      if (req.work === null) {
        if (req.round === this.replayRound) this.replayQueue.unshift(req);
      } else this.requeue([req]);
      this.dispatch();
      return;
    }
    if (req.work === null) {
      // A replayed write; one of an abandoned round (its connection was lost, the round started
      // over) no longer counts.
      if (req.round !== this.replayRound) return;
      if (errno !== 0) {
        this.lostWrites = true;
        this.logger.error("nbd: writing an unflushed write again failed; the next flush fails", {
          uri: this.uri.text,
          offset: req.offset,
          length: req.length,
          error: message ?? errno,
        });
      }
      if (--this.replayOutstanding === 0) this.dispatch();
      return;
    }
    let status = nbdErrnoToStatus(errno);
    if (errno === 0) status = this.acknowledged(req);
    else {
      this.logger.debug("nbd: request failed", {
        uri: this.uri.text,
        command: cmdName(req.cmd),
        offset: req.offset,
        length: req.length,
        error: errno,
        message,
      });
    }
    this.finish(req, status);
    this.dispatch();
  }

  /** Bookkeeping for an acknowledged request; the status its bio sees. */
  private acknowledged(req: Req): BioStatus {
    const u = this.has(TransmissionFlags.SEND_FLUSH) ? this.unflushed : null;
    switch (req.cmd) {
      case Cmd.WRITE:
        if (req.flags & CmdFlags.FUA) u?.forget(req.offset, req.length);
        else u?.written(req.offset, req.payload!);
        break;
      case Cmd.WRITE_ZEROES:
        if (req.flags & CmdFlags.FUA) u?.forget(req.offset, req.length);
        else u?.zeroed(req.offset, req.length);
        break;
      case Cmd.TRIM:
        u?.forget(req.offset, req.length);
        break;
      case Cmd.FLUSH:
        u?.flushed(req.flushMark);
        if (this.lostWrites) {
          this.lostWrites = false;
          return "EIO";
        }
        break;
    }
    return "ok";
  }

  private onClosed(conn: NbdConnection, reason: Error, inFlight: Req[]): void {
    const slot = this.slots.find((s) => s.conn === conn);
    if (slot) slot.conn = null;
    if (this.closed) {
      for (const req of inFlight) if (req.work) this.finish(req, "ENXIO");
      return;
    }
    this.lastError = reason.message;
    const now = Date.now();
    const retry: Req[] = [];
    let replayLost = false;
    for (const req of inFlight) {
      if (req.work === null) replayLost = true;
      else if (req.timedOut) this.finish(req, "EIO");
      else {
        if (req.lostAt === 0) req.lostAt = now;
        retry.push(req);
      }
    }
    if (replayLost) {
      // The writes being sent again are still in the map: start over on the next connection.
      this.replayQueue = [];
      this.replayOutstanding = 0;
      this.replayRound++;
      this.replayNeeded = true;
    }
    const left = this.readyConnections().length;
    this.logger.warn("nbd: connection lost", {
      uri: this.uri.text,
      reason: reason.message,
      retrying: retry.length,
      connected: left,
    });
    if (left === 0) {
      this.disconnectedSince ??= now;
      // The server may have restarted: what it acknowledged and never flushed may be gone.
      if (this.has(TransmissionFlags.SEND_FLUSH)) this.replayNeeded = true;
    }
    this.requeue(retry);
    if (slot) this.scheduleReconnect(slot);
    this.startReplay();
    this.dispatch();
  }

  /** Put requests back at the head of the queue, in the order they were made. */
  private requeue(reqs: Req[]): void {
    if (reqs.length === 0) return;
    reqs.sort((a, b) => a.seq - b.seq);
    this.queue = [...reqs, ...this.queue];
  }

  /** If writes must be sent again and a connection is up, queue them (the rest waits). */
  private startReplay(): void {
    if (!this.replayNeeded || this.readyConnections().length === 0 || !this.unflushed) return;
    this.replayNeeded = false;
    if (this.unflushed.incomplete) {
      this.unflushed.clearMissed();
      this.lostWrites = true;
      this.logger.error(
        "nbd: every connection was lost with more unflushed writes than could be kept; the next flush fails",
        {
          uri: this.uri.text,
          limitBytes: this.unflushed.limitBytes,
        },
      );
    }
    const reqs: Req[] = [];
    for (const e of this.unflushed.pending()) {
      if (e.end > this.info.size) {
        this.lostWrites = true; // the export shrank under them
        continue;
      }
      const cmd = e.data ? Cmd.WRITE : Cmd.WRITE_ZEROES;
      const max = e.data ? this.info.maxPayload : this.zeroMax();
      for (let at = e.start; at < e.end; at += max) {
        const n = Math.min(max, e.end - at);
        const data = e.data ? e.data.subarray(at - e.start, at - e.start + n) : null;
        const req = new Req(cmd, 0, at, n, null, data, null, this.seq++);
        req.round = this.replayRound;
        reqs.push(req);
      }
    }
    if (reqs.length === 0) return;
    this.logger.info("nbd: writing unflushed writes again after reconnecting", {
      uri: this.uri.text,
      writes: reqs.length,
      bytes: this.unflushed.bytes,
    });
    this.replayQueue = reqs;
    this.replayOutstanding = reqs.length;
  }

  // ---- connecting ----

  private connectOptions() {
    return { uri: this.uri, tls: this.tls, timeoutMs: this.connectTimeoutMs };
  }

  private async connectFirst(): Promise<void> {
    const conn = await openConnection(this.connectOptions(), this.events);
    this.adopt(conn.info, true);
    if (!this.readOnly && this.has(TransmissionFlags.READ_ONLY)) {
      conn.disconnect();
      throw Object.assign(new Error("the export is read-only (open it from a read-only table)"), { code: "EROFS" });
    }
    const wanted = this.has(TransmissionFlags.CAN_MULTI_CONN)
      ? (this.uri.connections ?? this.devOpts.connections ?? DEFAULT_CONNECTIONS)
      : 1;
    this.slots.push({ conn, connecting: false, attempts: 0, timer: null });
    const more = Array.from({ length: wanted - 1 }, () => {
      const slot: Slot = { conn: null, connecting: true, attempts: 0, timer: null };
      this.slots.push(slot);
      return slot;
    });
    await Promise.all(more.map((slot) => this.connectSlot(slot)));
  }

  /** Take the export's description from a (re)connected connection. */
  private adopt(info: ExportInfo, first: boolean): void {
    const old = this.info;
    this.info = info;
    if (first) return;
    if (info.size !== old.size) {
      this.logger.warn("nbd: the export changed size across a reconnect", {
        uri: this.uri.text,
        oldBytes: old.size,
        newBytes: info.size,
      });
    }
    if ((info.flags ^ old.flags) & TransmissionFlags.READ_ONLY) {
      this.logger.warn("nbd: the export's read-only flag changed across a reconnect", {
        uri: this.uri.text,
        readOnly: (info.flags & TransmissionFlags.READ_ONLY) !== 0,
      });
    }
  }

  private async connectSlot(slot: Slot): Promise<void> {
    slot.connecting = true;
    slot.timer = null;
    try {
      const conn = await openConnection(this.connectOptions(), this.events);
      if (this.closed) {
        conn.disconnect();
        return;
      }
      slot.conn = conn;
      slot.attempts = 0;
      this.adopt(conn.info, false);
      if (this.disconnectedSince !== null) {
        this.reconnects++;
        this.logger.info("nbd: reconnected", {
          uri: this.uri.text,
          downMs: Date.now() - this.disconnectedSince,
        });
      }
      this.disconnectedSince = null;
      this.failFast = false;
      this.startReplay();
      this.dispatch();
      for (const wake of this.connectedWaiters.splice(0)) wake();
    } catch (err) {
      if (this.closed) return;
      this.lastError = (err as Error).message;
      if (slot.attempts === 0 || slot.attempts % 10 === 0) {
        this.logger.warn("nbd: connecting failed", {
          uri: this.uri.text,
          server: describeTransport(this.uri),
          error: (err as Error).message,
          attempt: slot.attempts + 1,
        });
      }
      this.scheduleReconnect(slot);
    } finally {
      slot.connecting = false;
    }
  }

  private scheduleReconnect(slot: Slot): void {
    if (this.closed || slot.timer !== null || slot.conn !== null) return;
    const delay = Math.min(this.backoff.max, this.backoff.first * 2 ** Math.min(slot.attempts, 20));
    slot.attempts++;
    slot.timer = setTimeout(() => void this.connectSlot(slot), delay);
  }

  // ---- timeouts ----

  private checkTimeouts(): void {
    if (this.closed) return;
    const now = Date.now();
    const limit = this.timeoutMs;
    for (const slot of this.slots) {
      const oldest = slot.conn?.oldest() as Req | undefined;
      if (oldest && now - oldest.sentAt > limit) {
        oldest.timedOut = true;
        this.logger.warn("nbd: no reply within the timeout; dropping the connection", {
          uri: this.uri.text,
          command: cmdName(oldest.cmd),
          offset: oldest.offset,
          timeoutMs: limit,
        });
        slot.conn!.destroy(Object.assign(new Error(`no reply within ${limit} ms`), { code: "ETIMEDOUT" }));
      }
    }
    let expired = 0;
    const keep: Req[] = [];
    const down = this.disconnectedSince !== null && now - this.disconnectedSince > limit;
    for (const req of this.queue) {
      if (down || (req.lostAt !== 0 && now - req.lostAt > limit)) {
        expired++;
        this.finish(req, "EIO");
      } else keep.push(req);
    }
    if (expired > 0) {
      this.queue = keep;
      this.logger.warn("nbd: requests failed after the timeout", { uri: this.uri.text, requests: expired });
    }
    if (down && !this.failFast) {
      this.failFast = true;
      this.logger.error("nbd: no connection within the timeout; I/O fails until it is back", {
        uri: this.uri.text,
        timeoutMs: limit,
      });
    }
  }

  // ---- the rest of the contract ----

  async upgradeToReadWrite(): Promise<void> {
    if (!this.readOnly) return;
    if (this.has(TransmissionFlags.READ_ONLY)) {
      throw Object.assign(new Error(`${this.uri.text}: the export is read-only`), { code: "EROFS" });
    }
    this.readOnly = false;
  }

  /** Resolves once at least one connection is up (at once if one is). */
  whenConnected(): Promise<void> {
    if (this.closed || this.readyConnections().length > 0) return Promise.resolve();
    return new Promise((resolve) => this.connectedWaiters.push(resolve));
  }

  connectionState(): NbdConnectionState {
    const connected = this.readyConnections().length;
    const state = this.closed
      ? "closed"
      : connected === this.slots.length
        ? "connected"
        : connected > 0
          ? "degraded"
          : this.failFast
            ? "failed"
            : "reconnecting";
    const down = this.slots.filter((s) => s.conn === null || !s.conn.isOpen);
    return {
      state,
      server: describeTransport(this.uri),
      connections: this.slots.length,
      connected,
      attempt: this.closed ? 0 : down.reduce((n, s) => Math.max(n, s.attempts), 0),
      reconnects: this.reconnects,
      inFlight: this.slots.reduce((n, s) => n + (s.conn?.inFlightCount ?? 0), 0),
      queued: this.queue.length,
      unflushedBytes: this.unflushed?.bytes ?? 0,
      replies: this.info.extended ? "extended" : this.info.structured ? "structured" : "simple",
      lastError: this.lastError,
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.watchdog);
    const waits: Promise<void>[] = [];
    for (const slot of this.slots) {
      if (slot.timer) clearTimeout(slot.timer);
      slot.timer = null;
      if (slot.conn) {
        waits.push(slot.conn.whenClosed());
        slot.conn.disconnect();
      }
    }
    for (const req of this.queue.splice(0)) this.finish(req, "ENXIO");
    for (const wake of this.connectedWaiters.splice(0)) wake();
    await Promise.all(waits);
  }

  toString(): string {
    return `NbdDevice(${this.uri.text})`;
  }
}
