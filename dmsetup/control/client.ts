/**
 * The client side of the control protocol (udmsetup, tests, scripts): pipelined requests over one
 * unix socket connection, matched to responses by id.
 */
import net from "node:net";
import { DmError } from "../../core/errors.js";
import { LineSplitter, MAX_REQUEST_BYTES, type Op, type RequestMap, type Response } from "./protocol.js";

export class ControlClient {
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private closedError: Error | null = null;

  private constructor(private readonly socket: net.Socket) {
    const splitter = new LineSplitter();
    socket.on("data", (chunk: Buffer) => {
      for (const line of splitter.push(chunk)) this.onResponse(JSON.parse(line) as Response);
    });
    socket.on("error", (err) => this.fail(err));
    socket.on("close", () => this.fail(new Error("udmd closed the control connection")));
  }

  static connect(path: string): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection(path);
      socket.once("connect", () => {
        socket.off("error", reject);
        resolve(new ControlClient(socket));
      });
      socket.once("error", reject);
    });
  }

  request<O extends Op>(op: O, args: RequestMap[O]): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    const line = JSON.stringify({ id, op, ...args }) + "\n";
    const bytes = Buffer.byteLength(line);
    if (bytes > MAX_REQUEST_BYTES) {
      const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
      return Promise.reject(
        new DmError(
          "E2BIG",
          `${op}: the request is ${mib(bytes)}; the control protocol takes at most ${mib(MAX_REQUEST_BYTES)}`,
        ),
      );
    }
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.socket.write(line);
    });
  }

  private onResponse(res: Response): void {
    const w = this.waiting.get(res.id);
    if (!w) {
      // id 0: the daemon refused the connection or the framing; fail everything outstanding.
      if (!res.ok) this.fail(new DmError(res.errno, res.message));
      return;
    }
    this.waiting.delete(res.id);
    if (res.ok) w.resolve(res.result);
    else w.reject(Object.assign(new DmError(res.errno, res.message), res.step ? { step: res.step } : {}));
  }

  private fail(err: Error): void {
    this.closedError ??= err;
    for (const w of this.waiting.values()) w.reject(this.closedError);
    this.waiting.clear();
  }

  close(): void {
    this.socket.end();
  }
}
