/**
 * NbdServer: exports devices over NBD on a unix socket (mode 0600) and optionally TCP.
 *
 * The server only accepts connections and keeps track of them; each NbdConnection runs its own
 * handshake and transmission (connection.ts). Exports come from an ExportProvider consulted at
 * handshake time, so devices created or removed later are seen by the next client;
 * `closeExport(name)` ends the connections of an export that is going away (forced remove).
 */
import fs from "node:fs";
import net from "node:net";
import { type Logger, MemoryLogger } from "../core/logger.js";
import { dupFd } from "../core/sys/file.js";
import { setSendBuffer, socketFd } from "../core/sys/socket.js";
import { BufferPool } from "./buffer-pool.js";
import { type ConnectionSettings, NbdConnection } from "./connection.js";
import type { ExportProvider } from "./exports.js";
import { MAX_PAYLOAD } from "./protocol.js";
import { ReceiveBuffer } from "./receive-buffer.js";
import { zeroCopySupported } from "./reply-writer.js";

export { deviceMapperExports, type ExportDevice, type ExportProvider } from "./exports.js";

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
}

export class NbdServer {
  private readonly settings: ConnectionSettings;
  private readonly closeGraceMs: number;
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
    this.settings = {
      exports,
      logger: opts.logger ?? new MemoryLogger(false),
      maxPayload,
      maxInFlight: opts.maxInFlight ?? 128,
      maxInFlightBytes: opts.maxInFlightBytes ?? 64 * 1024 * 1024,
      maxQueuedReplyBytes: 16 * 1024 * 1024,
      lingerMs: 5000,
      buffers: new BufferPool(),
      zeroCopy: opts.zeroCopy ?? zeroCopySupported(),
    };
  }

  /** Listen on a unix socket, created with mode 0600. A stale socket file there is replaced. */
  async listenUnix(path: string): Promise<void> {
    this.assertOpen();
    await removeStaleSocket(path);
    const server = await listenOn(this.createServer(), (s, cb) => withPrivateUmask(() => s.listen(path, cb)));
    this.socketFiles.push(path);
    this.listeners.push(server);
    fs.chmodSync(path, 0o600); // also covers a worker thread, where the umask cannot be changed
    this.settings.logger.info("nbd server listening", { socket: path });
  }

  /** Also listen on TCP; port 0 picks a free port. Resolves with the bound address. */
  async listenTcp(addr: { host?: string; port: number }): Promise<{ host: string; port: number }> {
    this.assertOpen();
    const server = await listenOn(this.createServer(), (s, cb) => s.listen(addr.port, addr.host ?? "127.0.0.1", cb));
    this.listeners.push(server);
    const bound = server.address() as net.AddressInfo;
    this.settings.logger.info("nbd server listening", { host: bound.address, port: bound.port });
    return { host: bound.address, port: bound.port };
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

  private createServer(): net.Server {
    // allowHalfOpen: a client that shuts down its sending side still gets its replies.
    // pauseOnConnect: nothing is read before accept() has decided how the socket reads.
    return net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) => this.accept(socket));
  }

  private accept(accepted: net.Socket): void {
    if (this.closing) return void accepted.destroy();
    const { socket, receive, fallback } = withReceiveBuffer(accepted);
    if (fallback) this.settings.logger.warn("nbd: connection reads into Node's own buffers (slower)", { reason: fallback });
    if (socket.remoteFamily) socket.setNoDelay(true); // TCP only: replies must not wait for Nagle
    const conn = new NbdConnection(socket, this.nextId++, this.settings, receive);
    this.connections.add(conn);
    void conn.closed.then(() => this.connections.delete(conn));
    this.settings.logger.debug("nbd client connected", { conn: conn.id, remote: socket.remoteAddress ?? "unix" });
    conn.start();
  }

  private assertOpen(): void {
    if (this.closing) throw new Error("NbdServer is closed");
  }
}

/**
 * Re-open an accepted connection as a socket that reads into a ReceiveBuffer. net.Server cannot
 * be asked for `onread` sockets, so the connection's descriptor is duplicated into a new
 * net.Socket that has it, and the accepted one (which has not read anything: pauseOnConnect) is
 * closed; the connection lives on in the duplicate. Where that is not possible the accepted
 * socket is used as it is, with Node's own read buffers.
 */
function withReceiveBuffer(accepted: net.Socket): { socket: net.Socket; receive: ReceiveBuffer | null; fallback?: string } {
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
