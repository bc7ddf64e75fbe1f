/**
 * Where the bytes a server sends land. A plain socket reads with net.Socket's `onread` into memory
 * this class chooses: straight into a READ's destination (the bio's own buffer) while its data is
 * arriving, else into one reused scratch buffer, so a reply costs no allocation and a large read
 * no copy. After the STARTTLS upgrade the TLS socket's `data` events are used instead (the
 * decrypted bytes are Node's, and are copied).
 *
 * The sink must not keep views of what it is given: the scratch buffer is read into again.
 */
import net from "node:net";
import type tls from "node:tls";
import { setSendBuffer, socketFd } from "../../sys/socket.js";
import { NbdReplyError } from "./reply-reader.js";
import type { NbdTransport } from "./uri.js";

export interface ByteSink {
  /** Bytes just received; throwing NbdReplyError ends the connection (`failed`). */
  received(chunk: Buffer): void;
  /** Where the next bytes should go when they can land in place, else null. */
  directSpace?(): Buffer | null;
  /** Read at most this many bytes next (only a reply header), or 0 for no limit. */
  headerBytes?(): number;
}

const SCRATCH_BYTES = 256 * 1024;
/**
 * A unix socket's send buffer (SO_SNDBUF), asked for as udm's server does for its replies: a 1 MiB
 * WRITE then leaves in one writev instead of several with waits for the server in between.
 */
const SEND_BUFFER_BYTES = 2 * 1024 * 1024;

function widenSendBuffer(socket: net.Socket): void {
  const fd = socketFd(socket);
  if (fd === undefined) return;
  try {
    setSendBuffer(fd, SEND_BUFFER_BYTES);
  } catch {
    // Not an option this descriptor takes: keep the default.
  }
}

export class SocketInput {
  sink: ByteSink | null = null;
  /** Called when the sink throws NbdReplyError (garbage from the server). */
  failed: (err: Error) => void = () => undefined;
  private readonly scratch = Buffer.allocUnsafeSlow(SCRATCH_BYTES);

  /** For net.connect's `onread`. */
  readonly onread = {
    buffer: (): Buffer => {
      const direct = this.sink?.directSpace?.() ?? null;
      if (direct && direct.length > 0) return direct;
      const limit = this.sink?.headerBytes?.() ?? 0;
      return limit > 0 ? this.scratch.subarray(0, limit) : this.scratch;
    },
    callback: (n: number, buf: Uint8Array): boolean => {
      this.deliver((buf as Buffer).subarray(0, n));
      return true;
    },
  };

  /** Take input from a TLS socket's `data` events (after STARTTLS). */
  attachTls(socket: tls.TLSSocket): void {
    socket.on("data", (chunk: Buffer) => this.deliver(chunk));
  }

  private deliver(chunk: Buffer): void {
    try {
      this.sink?.received(chunk);
    } catch (err) {
      // Garbage from the server ends the connection; anything else is a bug of ours (or of a
      // bio's submitter, run from a completion) and must surface, not pass for a bad server.
      if (!(err instanceof NbdReplyError)) throw err;
      this.sink = null;
      this.failed(err);
    }
  }
}

/**
 * Connect to `transport`, reading through `input`. Rejects with the socket's error (its code is
 * errno's), or ETIMEDOUT after `timeoutMs`.
 */
export function connectSocket(transport: NbdTransport, input: SocketInput, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const where = transport.kind === "unix" ? { path: transport.path } : { host: transport.host, port: transport.port };
    const socket = net.connect({ ...where, onread: input.onread });
    const fail = (err: Error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    };
    const timer = setTimeout(
      () => fail(Object.assign(new Error(`connect timed out after ${timeoutMs} ms`), { code: "ETIMEDOUT" })),
      timeoutMs,
    );
    socket.once("error", fail);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.off("error", fail);
      // From here on 'close' is what ends a connection; an error without a listener would throw.
      socket.on("error", () => undefined);
      if (transport.kind === "tcp")
        socket.setNoDelay(true); // requests are corked per turn already
      else widenSendBuffer(socket);
      resolve(socket);
    });
  });
}
