/**
 * The client side of the control protocol (udmsetup, tests, scripts): pipelined requests over one
 * unix socket connection, matched to responses by id.
 */
import net from "node:net";
import { DmError } from "../../core/errors.js";
import { LineSplitter, type Op, type RequestMap, type Response } from "./protocol.js";

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
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.socket.write(JSON.stringify({ id, op, ...args }) + "\n");
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
    else w.reject(new DmError(res.errno, res.message));
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
