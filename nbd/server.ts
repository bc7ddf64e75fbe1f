/**
 * NbdServer: exports devices over NBD on a unix socket (mode 0600) and optionally TCP.
 *
 * The server only accepts connections and keeps track of them; each NbdConnection runs its own
 * handshake and transmission (connection.ts). Exports come from an ExportProvider consulted at
 * handshake time, so devices created or removed later are seen by the next client;
 * `closeExport(name)` ends the connections of an export that is going away (forced remove).
 *
 * Protection for a TCP listener (docs/security.md): TLS with STARTTLS (tls.ts), a handshake
 * timeout, and limits on connections in total and per client address (connection-limits.ts).
 */
import fs from "node:fs";
import net from "node:net";
import { type Logger, MemoryLogger } from "../core/logger.js";
import { dupFd } from "../core/sys/file.js";
import { setSendBuffer, socketFd } from "../core/sys/socket.js";
import { BufferPool } from "./buffer-pool.js";
import { type ConnectionSettings, type ConnectionTls, NbdConnection } from "./connection.js";
import {
  ConnectionLimits,
  DEFAULT_MAX_CONNECTIONS,
  DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
  connectionsForDescriptorLimit,
  descriptorLimit,
} from "./connection-limits.js";
import type { ExportProvider } from "./exports.js";
import { MAX_PAYLOAD } from "./protocol.js";
import { ReceiveBuffer } from "./receive-buffer.js";
import { zeroCopySupported } from "./reply-writer.js";
import { type NbdTlsMode, type NbdTlsOptions, TlsCredentials } from "./tls.js";

export { deviceMapperExports, type ExportDevice, type ExportProvider } from "./exports.js";
export { type NbdTlsMode, type NbdTlsOptions, TLS_MODES } from "./tls.js";

/** qemu-nbd's default handshake limit (handshake-max-seconds). */
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;

export interface NbdServerOptions {
  logger?: Logger;
  /** Largest READ/WRITE in bytes, advertised as the maximum block size (default 32 MiB). */
  maxPayload?: number;
  /** Requests in flight per connection before it stops reading (default 128). */
  maxInFlight?: number;
  /** Payload bytes in flight per connection before it stops reading (default 64 MiB). */
  maxInFlightBytes?: number;
  /**
   * How long closeExport/close let in-flight requests finish before dropping the connection
   * (default 1 s). Bounded because a suspended device may hold requests indefinitely.
   */
  closeGraceMs?: number;
  /**
   * Send large READ replies of file-backed devices straight from the files with sendfile(2)
   * instead of copying them through a buffer (docs/nbd-internals.md). Default on where supported
   * (Linux x86_64).
   */
  zeroCopy?: boolean;
  /**
   * NBD_OPT_STARTTLS (default mode "off"): "on" offers TLS, "require" refuses every option but
   * STARTTLS and ABORT until TLS is up; with a certificates directory or a PSK file (tls.ts).
   * It is every listener's mode unless listenUnix/listenTcp give their own.
   */
  tls?: NbdTlsOptions;
  /** Close a connection that has not entered transmission after this long (default 10 s; 0: never). */
  handshakeTimeoutMs?: number;
  /**
   * Connections held at once, on every listener (default 1024). Always capped so that half of
   * RLIMIT_NOFILE (up to 1024 descriptors) stays free for the rest of the process.
   */
  maxConnections?: number;
  /** Connections held at once from one TCP client address (default 16). */
  maxConnectionsPerClient?: number;
}

export class NbdServer {
  private readonly settings: ConnectionSettings;
  private readonly closeGraceMs: number;
  private readonly tlsMode: NbdTlsMode;
  private readonly credentials: TlsCredentials | null;
  private readonly limits: ConnectionLimits;
  private readonly listeners: net.Server[] = [];
  private readonly connections = new Set<NbdConnection>();
  /** Socket files we created, removed again by close() (never someone else's). */
  private readonly socketFiles: string[] = [];
  private nextId = 1;
  private closing = false;

  constructor(exports: ExportProvider, opts: NbdServerOptions = {}) {
    const maxPayload = opts.maxPayload ?? MAX_PAYLOAD;
    if (maxPayload < 512 || maxPayload % 512 !== 0) throw new Error("maxPayload must be a positive multiple of 512");
    this.closeGraceMs = opts.closeGraceMs ?? 1000;
    const logger = opts.logger ?? new MemoryLogger(false);
    this.tlsMode = opts.tls?.mode ?? "off";
    this.credentials = this.tlsMode === "off" ? null : TlsCredentials.load(opts.tls!);
    this.limits = connectionLimits(opts, logger);
    const handshakeTimeoutMs = opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    if (!(handshakeTimeoutMs >= 0)) throw new Error("handshakeTimeoutMs must be 0 or more");
    this.settings = {
      exports,
      logger,
      maxPayload,
      maxInFlight: opts.maxInFlight ?? 128,
      maxInFlightBytes: opts.maxInFlightBytes ?? 64 * 1024 * 1024,
      maxQueuedReplyBytes: 16 * 1024 * 1024,
      lingerMs: 5000,
      buffers: new BufferPool(),
      zeroCopy: opts.zeroCopy ?? zeroCopySupported(),
      handshakeTimeoutMs,
    };
  }

  /** The connection limits in force (maxConnections after the descriptor cap). */
  get connectionLimits(): { total: number; perClient: number } {
    return { total: this.limits.maxTotal, perClient: this.limits.maxPerClient };
  }

  /**
   * Listen on a unix socket, created with mode 0600. A stale socket file there is replaced.
   * `tls` overrides the server's TLS mode for this socket; `exports`, the server's exports (a
   * socket for one kind of client can see the devices differently, e.g. without counting opens).
   */
  async listenUnix(path: string, opts: { tls?: NbdTlsMode; exports?: ExportProvider } = {}): Promise<void> {
    this.assertOpen();
    const tls = this.listenerTls(opts.tls);
    await removeStaleSocket(path);
    const server = await listenOn(this.createServer(tls, opts.exports), (s, cb) =>
      withPrivateUmask(() => s.listen(path, cb)),
    );
    this.socketFiles.push(path);
    this.listeners.push(server);
    fs.chmodSync(path, 0o600); // also covers a worker thread, where the umask cannot be changed
    this.settings.logger.info("nbd server listening", { socket: path, tls: tls.mode });
  }

  /**
   * Serve on a socket that is already listening, made by someone else (systemd's socket
   * activation): a unix or a TCP one, descriptor `fd`, which the server takes over (close()
   * closes it). Its socket file, if any, stays where it is: it is not the server's to remove.
   * `tls` and `exports` as for listenUnix.
   */
  async listenFd(fd: number, opts: { tls?: NbdTlsMode; exports?: ExportProvider } = {}): Promise<void> {
    this.assertOpen();
    const tls = this.listenerTls(opts.tls);
    const server = await listenOn(this.createServer(tls, opts.exports), (s, cb) => s.listen({ fd }, cb));
    this.listeners.push(server);
    this.settings.logger.info("nbd server listening", { fd, tls: tls.mode });
  }

  /**
   * Also listen on TCP; port 0 picks a free port. Resolves with the bound address. `tls`
   * overrides the server's TLS mode for this listener.
   */
  async listenTcp(addr: { host?: string; port: number; tls?: NbdTlsMode }): Promise<{ host: string; port: number }> {
    this.assertOpen();
    const tls = this.listenerTls(addr.tls);
    const server = await listenOn(this.createServer(tls), (s, cb) => s.listen(addr.port, addr.host ?? "127.0.0.1", cb));
    this.listeners.push(server);
    const bound = server.address() as net.AddressInfo;
    this.settings.logger.info("nbd server listening", { host: bound.address, port: bound.port, tls: tls.mode });
    return { host: bound.address, port: bound.port };
  }

  private listenerTls(mode: NbdTlsMode = this.tlsMode): ConnectionTls {
    if (mode !== "off" && !this.credentials) {
      throw new Error(`TLS mode "${mode}" needs the server's tls credentials (NbdServerOptions.tls)`);
    }
    return { mode, credentials: mode === "off" ? null : this.credentials };
  }

  /** Open connections, or those in transmission on export `name`. */
  connectionCount(name?: string): number {
    if (name === undefined) return this.connections.size;
    return [...this.connections].filter((c) => c.exportName === name).length;
  }

  /**
   * A device was renamed: its open connections now count as the export's new name (for
   * connectionCount, exportIdle, closeExport), as the kernel keeps a renamed device's openers.
   */
  renameExport(oldName: string, newName: string): void {
    for (const c of this.connections) if (c.exportName === oldName) c.exportName = newName;
  }

  /**
   * Resolves true once every connection now open on export `name` has closed, or false after
   * `timeoutMs` (a client that does not let go must not block its caller forever).
   */
  async exportIdle(name: string, timeoutMs = 2000): Promise<boolean> {
    const open = [...this.connections].filter((c) => c.exportName === name);
    if (open.length === 0) return true;
    let timer: NodeJS.Timeout | undefined;
    const gaveUp = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), timeoutMs)));
    const closed = Promise.all(open.map((c) => c.closed)).then(() => true);
    const result = await Promise.race([closed, gaveUp]);
    clearTimeout(timer);
    return result;
  }

  /**
   * End every connection on export `name`: in-flight requests are answered (for at most
   * closeGraceMs: a suspended device may hold them), new ones get ESHUTDOWN, then the socket
   * closes and the device's open count drops. Safe to call before or after removing the device.
   */
  async closeExport(name: string): Promise<void> {
    const victims = [...this.connections].filter((c) => c.exportName === name);
    if (victims.length) this.settings.logger.info("nbd closing export", { export: name, connections: victims.length });
    await Promise.all(victims.map((c) => c.shutdown(this.closeGraceMs)));
  }

  /** Stop listening and close every connection (gracefully, as closeExport). */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const stopped = this.listeners.map((l) => new Promise<void>((r) => l.close(() => r())));
    await Promise.all([...this.connections].map((c) => c.shutdown(this.closeGraceMs)));
    await Promise.all(stopped);
    for (const file of this.socketFiles) fs.rmSync(file, { force: true });
    this.settings.logger.info("nbd server closed");
  }

  private createServer(tls: ConnectionTls, exports?: ExportProvider): net.Server {
    const settings = exports ? { ...this.settings, exports } : this.settings;
    // allowHalfOpen: a client that shuts down its sending side still gets its replies.
    // pauseOnConnect: nothing is read before accept() has decided how the socket reads.
    return net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) =>
      this.accept(socket, tls, settings),
    );
  }

  private accept(accepted: net.Socket, tls: ConnectionTls, settings: ConnectionSettings): void {
    if (this.closing) return void accepted.destroy();
    // Per-client limits on TCP only: a unix socket's clients are the daemon's user and root.
    const client = accepted.remoteFamily ? (accepted.remoteAddress ?? "?") : undefined;
    if (!this.limits.admit(client)) return void accepted.destroy();
    const { socket, receive, fallback } = withReceiveBuffer(accepted);
    if (fallback)
      this.settings.logger.warn("nbd: connection reads into Node's own buffers (slower)", { reason: fallback });
    if (socket.remoteFamily) socket.setNoDelay(true); // TCP only: replies must not wait for Nagle
    const conn = new NbdConnection(socket, this.nextId++, settings, receive, tls);
    this.connections.add(conn);
    void conn.closed.then(() => {
      this.connections.delete(conn);
      this.limits.release(client);
    });
    this.settings.logger.debug("nbd client connected", { conn: conn.id, remote: socket.remoteAddress ?? "unix" });
    conn.start();
  }

  private assertOpen(): void {
    if (this.closing) throw new Error("NbdServer is closed");
  }
}

/** The limits of `opts`, the total capped by the descriptor limit (a higher request is logged). */
function connectionLimits(opts: NbdServerOptions, logger: Logger): ConnectionLimits {
  const perClient = opts.maxConnectionsPerClient ?? DEFAULT_MAX_CONNECTIONS_PER_CLIENT;
  const asked = opts.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
  for (const [name, value] of [
    ["maxConnections", asked],
    ["maxConnectionsPerClient", perClient],
  ] as const) {
    if (!Number.isInteger(value) || value < 1) throw new Error(`${name} must be a positive integer`);
  }
  const nofile = descriptorLimit();
  const cap = connectionsForDescriptorLimit(nofile);
  if (opts.maxConnections !== undefined && asked > cap) {
    const fields = { asked, limit: cap, nofile };
    logger.warn("nbd: connection limit lowered to keep descriptors for the rest of the process", fields);
  }
  return new ConnectionLimits(Math.min(asked, cap), perClient, logger);
}

/**
 * Re-open an accepted connection as a socket that reads into a ReceiveBuffer. net.Server cannot
 * be asked for `onread` sockets, so the connection's descriptor is duplicated into a new
 * net.Socket that has it, and the accepted one (which has not read anything: pauseOnConnect) is
 * closed; the connection lives on in the duplicate. Where that is not possible the accepted
 * socket is used as it is, with Node's own read buffers.
 */
function withReceiveBuffer(accepted: net.Socket): {
  socket: net.Socket;
  receive: ReceiveBuffer | null;
  fallback?: string;
} {
  const fd = socketFd(accepted);
  let dup = -1;
  try {
    if (fd === undefined) throw new Error("the accepted socket exposes no descriptor");
    dup = dupFd(fd);
    // Unix sockets only: on TCP a fixed SO_SNDBUF would turn off the kernel's autotuning.
    if (!accepted.remoteFamily) widenSendBuffer(dup);
    const receive = new ReceiveBuffer();
    const socket = new net.Socket({
      fd: dup,
      readable: true,
      writable: true,
      allowHalfOpen: true,
      onread: { buffer: receive.nextBuffer, callback: receive.onRead },
    });
    accepted.destroy();
    return { socket, receive };
  } catch (err) {
    if (dup >= 0) fs.closeSync(dup);
    accepted.resume();
    return { socket: accepted, receive: null, fallback: (err as Error).message };
  }
}

/**
 * A READ reply of 1 MiB does not fit a unix socket's default send buffer (208 KiB), so it used to
 * leave in several writes, each after a wait for the client to drain the socket; with room for a
 * whole reply it is one write (bench/results.md has the effect). The kernel caps the size at
 * net.core.wmem_max; failing to widen it only costs speed.
 */
const SEND_BUFFER_BYTES = 2 * 1024 * 1024;

function widenSendBuffer(fd: number): void {
  try {
    setSendBuffer(fd, SEND_BUFFER_BYTES);
  } catch {
    // Not a socket option this descriptor supports: keep the default.
  }
}

function listenOn(server: net.Server, start: (s: net.Server, cb: () => void) => void): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    start(server, () => {
      server.off("error", reject);
      resolve(server);
    });
  });
}

/**
 * Create the socket with mode 0600 from the start (bind happens synchronously inside listen), so
 * there is no window in which another user could connect before the chmod. The umask is
 * process-wide: a file the thread pool creates in that instant would also come out private,
 * which errs on the safe side.
 */
function withPrivateUmask(fn: () => void): void {
  let old: number | null = null;
  try {
    old = process.umask(0o177);
  } catch {
    // Worker threads cannot change the umask; the chmod after listen still applies.
  }
  try {
    fn();
  } finally {
    if (old !== null) process.umask(old);
  }
}

/** A socket file nobody listens on is left over from a crash: remove it. Anything else stays. */
async function removeStaleSocket(path: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw Object.assign(new Error(`${path}: exists and is not a socket`), { code: "EEXIST" });
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect(path);
    probe.once("connect", () => {
      probe.destroy();
      resolve(true);
    });
    probe.once("error", () => resolve(false));
  });
  if (alive) throw Object.assign(new Error(`${path}: another server is listening there`), { code: "EADDRINUSE" });
  fs.rmSync(path, { force: true });
}
