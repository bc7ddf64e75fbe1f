/**
 * One connection to an NBD server in the transmission phase: requests go out with a cookie each
 * (any number in flight, replies in any order, proto.md "Transmission"), the ReplyReader matches
 * replies to them. A turn's requests leave together at its end (request-batch.ts: headers and small
 * payloads in one buffer, one socket write; a large WRITE's payload from the bio's own buffer).
 *
 * The connection knows nothing about retries: when it ends (the server hung up, sent garbage, or
 * the device dropped it) it hands every request still in flight to `closed`, and the device
 * decides what to do with them (nbd-device.ts).
 */
import type net from "node:net";
import type tls from "node:tls";
import { type ExportInfo, negotiate } from "./handshake.js";
import { type ReplyHandler, ReplyReader, type ReplyTarget } from "./reply-reader.js";
import { SocketInput, connectSocket } from "./socket-input.js";
import type { ClientTls } from "./tls.js";
import type { NbdUri } from "./uri.js";
import { RequestBatch } from "./request-batch.js";
import { Cmd } from "./wire.js";

/** A request as it travels: built by the device, sent by a connection, answered by the reader. */
export interface NbdRequest extends ReplyTarget {
  readonly cmd: number;
  readonly flags: number;
  readonly offset: number;
  readonly length: number;
  /** READ: the destination. */
  readonly buffer: Buffer | null;
  /** WRITE: the payload. */
  readonly payload: Buffer | null;
  /** Set by `send`: the connection it is in flight on, and when it left. */
  conn: NbdConnection | null;
  sentAt: number;
}

export interface ConnectionEvents {
  /** The reply to `req` arrived (errno 0: success). */
  replied(conn: NbdConnection, req: NbdRequest, errno: number, message: string | null): void;
  /** The connection ended; `inFlight` were sent and never answered. Called once. */
  closed(conn: NbdConnection, reason: Error, inFlight: NbdRequest[]): void;
}

export interface ConnectOptions {
  uri: NbdUri;
  tls: ClientTls | null;
  /** Connect and handshake must be done within this time. */
  timeoutMs: number;
}

/** Connect, negotiate, and return the connection in transmission. */
export async function openConnection(opts: ConnectOptions, events: ConnectionEvents): Promise<NbdConnection> {
  const input = new SocketInput();
  const deadline = Date.now() + opts.timeoutMs;
  const socket = await connectSocket(opts.uri.transport, input, opts.timeoutMs);
  const { socket: live, info } = await negotiate(socket, input, opts.uri, opts.tls, Math.max(1, deadline - Date.now()));
  return new NbdConnection(live, input, info, events);
}

export class NbdConnection implements ReplyHandler {
  private readonly inFlight = new Map<number, NbdRequest>();
  private nextCookie = 1;
  /** This turn's requests, written when it ends (`flush`). */
  private readonly batch: RequestBatch;
  private flushQueued = false;
  private ended = false;
  private reason: Error | null = null;
  /** Payload and destination bytes of the requests in flight. */
  inFlightBytes = 0;

  constructor(
    private readonly socket: net.Socket | tls.TLSSocket,
    input: SocketInput,
    readonly info: ExportInfo,
    private readonly events: ConnectionEvents,
  ) {
    this.batch = new RequestBatch(info.extended);
    const reader = new ReplyReader(this, info.structured, info.extended);
    input.sink = reader;
    input.failed = (err) => this.destroy(err);
    socket.on("error", (err) => (this.reason ??= err));
    socket.once("close", () => this.onClose());
  }

  /** Requests sent and not answered. */
  get inFlightCount(): number {
    return this.inFlight.size;
  }

  get isOpen(): boolean {
    return !this.ended;
  }

  /** The oldest request in flight (Map order is send order), for the device's timeout check. */
  oldest(): NbdRequest | undefined {
    return this.inFlight.values().next().value;
  }

  send(req: NbdRequest, now: number): void {
    if (this.ended) throw new Error("send on a closed NBD connection");
    const cookie = this.nextCookie++;
    req.conn = this;
    req.sentAt = now;
    this.inFlight.set(cookie, req);
    this.inFlightBytes += req.length;
    const payload = req.cmd === Cmd.WRITE && req.length > 0 ? req.payload : null;
    this.batch.add(req.cmd, req.flags, cookie, req.offset, req.length, payload);
    if (!this.flushQueued) {
      this.flushQueued = true;
      process.nextTick(this.flush);
    }
  }

  /** Write what the batch holds: one buffer alone, several corked into one writev. */
  private readonly flush = (): void => {
    this.flushQueued = false;
    const segments = this.batch.take();
    if (segments.length === 0 || this.socket.destroyed) return;
    if (segments.length === 1) {
      this.socket.write(segments[0]!);
      return;
    }
    this.socket.cork();
    for (const s of segments) this.socket.write(s);
    this.socket.uncork();
  };

  // ---- ReplyHandler ----

  target(cookie: number): ReplyTarget | undefined {
    return this.inFlight.get(cookie);
  }

  replied(cookie: number, errno: number, message: string | null): void {
    const req = this.inFlight.get(cookie)!;
    this.inFlight.delete(cookie);
    this.inFlightBytes -= req.length;
    req.conn = null;
    this.events.replied(this, req, errno, message);
  }

  // ---- ending ----

  /**
   * Soft disconnect (proto.md, "Terminating the transmission phase"): NBD_CMD_DISC, then close our
   * side. Requests still in flight are handed to `closed` when the socket closes.
   */
  disconnect(): void {
    if (this.ended || this.socket.destroyed) return;
    this.reason ??= new Error("disconnected");
    // After the requests of this turn, which the server must see first.
    this.batch.add(Cmd.DISC, 0, 0, 0, 0, null);
    this.flush();
    this.socket.end();
    // A server that never closes its side must not keep the socket (and the device's close) waiting.
    setTimeout(() => this.socket.destroy(), 1000).unref();
  }

  /** Hard disconnect: no more bytes either way. */
  destroy(reason: Error): void {
    this.reason ??= reason;
    this.socket.destroy();
  }

  /** Resolves once the socket has closed. */
  whenClosed(): Promise<void> {
    if (this.ended) return Promise.resolve();
    return new Promise((resolve) => this.socket.once("close", () => resolve()));
  }

  private onClose(): void {
    if (this.ended) return;
    this.ended = true;
    const inFlight = [...this.inFlight.values()];
    this.inFlight.clear();
    this.inFlightBytes = 0;
    for (const req of inFlight) req.conn = null;
    this.events.closed(this, this.reason ?? new Error("the server closed the connection"), inFlight);
  }
}
