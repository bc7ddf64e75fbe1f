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
import type { NbdTransport } from "./uri.js";

export interface ByteSink {
  /** Bytes just received; throwing ends the connection (`failed`). */
  received(chunk: Buffer): void;
  /** Where the next bytes should go when they can land in place, else null. */
  directSpace?(): Buffer | null;
  /** Read at most this many bytes next (only a reply header), or 0 for no limit. */
  headerBytes?(): number;
}

const SCRATCH_BYTES = 256 * 1024;

export class SocketInput {
  sink: ByteSink | null = null;
  /** Called when the sink throws (garbage from the server). */
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
      this.sink = null;
      this.failed(err as Error);
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
      if (transport.kind === "tcp") socket.setNoDelay(true); // requests are corked per turn already
      resolve(socket);
    });
  });
}
