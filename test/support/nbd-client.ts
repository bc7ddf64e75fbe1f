/**
 * A small NBD client for tests: fixed newstyle, GO (or EXPORT_NAME), structured or simple replies,
 * and any number of requests in flight; replies are matched to requests by handle (WireClient).
 * RawConnection is the handshake-level view (greeting consumed, options sent by hand); the
 * helpers at the end build option and request packets byte by byte.
 *
 * Used by test/integration/nbd-wire.test.ts (where it was born) and by the fuzz, soak and crash
 * tests.
 */
import net from "node:net";
import { expect } from "vitest";
import { Cmd, Opt, Rep } from "../../nbd/protocol.js";
import { ByteQueue } from "./byte-queue.js";

export interface ConnectOptions {
  structured?: boolean;
  exportName?: boolean;
  noZeroes?: boolean;
  /** Extra options sent before GO (their replies are recorded in optionReplies). */
  before?: { option: number; data: Buffer }[];
}

export interface Reply {
  error: number;
  data?: Buffer;
  message?: string;
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  buf: Buffer | null;
  error: number;
  message?: string;
  resolve: (r: Reply) => void;
  reject: (e: Error) => void;
}

/** Reads exact byte counts from a socket; rejects when the peer closes first. */
export class ByteReader {
  private readonly queue = new ByteQueue();
  private waiter: (() => void) | null = null;
  private ended = false;
  readonly closed: Promise<void>;

  constructor(readonly socket: net.Socket) {
    this.closed = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.on("data", (c: Buffer) => {
      this.queue.push(c);
      this.waiter?.();
    });
    socket.on("close", () => {
      this.ended = true;
      this.waiter?.();
    });
    socket.on("error", () => undefined);
  }

  async read(n: number): Promise<Buffer> {
    while (this.queue.length < n) {
      if (this.ended) throw new Error(`connection closed (wanted ${n} bytes, have ${this.queue.length})`);
      await new Promise<void>((r) => (this.waiter = r));
      this.waiter = null;
    }
    return this.queue.take(n);
  }
}

export class RawConnection {
  private constructor(
    readonly socket: net.Socket,
    readonly reader: ByteReader,
  ) {}

  /** Connect and consume the greeting (checking its magics). */
  static async open(socketPath: string): Promise<RawConnection> {
    const socket = net.connect(socketPath);
    const reader = new ByteReader(socket);
    await new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject));
    const g = await reader.read(18);
    expect(g.subarray(0, 16).toString()).toBe("NBDMAGICIHAVEOPT");
    expect(g.readUInt16BE(16)).toBe(3);
    return new RawConnection(socket, reader);
  }

  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.reader.read(20);
    expect(h.readBigUInt64BE(0)).toBe(0x3e889045565a9n);
    const length = h.readUInt32BE(16);
    return {
      option: h.readUInt32BE(8),
      type: h.readUInt32BE(12),
      data: length ? await this.reader.read(length) : Buffer.alloc(0),
    };
  }

  /** Resolves when the server has closed the connection (without sending anything more). */
  async closedByServer(): Promise<void> {
    await expect(this.reader.read(1)).rejects.toThrow(/connection closed/);
  }
}

export class WireClient {
  size = 0;
  flags = 0;
  blockSizes: number[] = [];
  optionReplies: { option: number; type: number }[] = [];
  /** Requests answered so far, the most ever in flight, and answers that overtook older requests. */
  settled = 0;
  maxInFlight = 0;
  outOfOrder = 0;
  private nextHandle = 1n;
  private readonly pending = new Map<bigint, Pending>();

  private constructor(private readonly raw: RawConnection) {}

  get socket(): net.Socket {
    return this.raw.socket;
  }

  /** Requests sent and not answered yet. */
  get inFlight(): number {
    return this.pending.size;
  }

  static async connect(socketPath: string, name: string, opts: ConnectOptions = {}): Promise<WireClient> {
    const raw = await RawConnection.open(socketPath);
    const structured = opts.structured ?? true;
    const client = new WireClient(raw);
    raw.socket.write(u32(1 | (opts.noZeroes === false ? 0 : 2)));
    const options = [...(opts.before ?? [])];
    if (structured) options.push({ option: Opt.STRUCTURED_REPLY, data: Buffer.alloc(0) });
    for (const o of options) {
      raw.socket.write(optionRequest(o.option, o.data));
      const r = await raw.optionReply();
      client.optionReplies.push({ option: r.option, type: r.type });
    }
    if (opts.exportName) {
      raw.socket.write(optionRequest(Opt.EXPORT_NAME, Buffer.from(name)));
      const r = await raw.reader.read(opts.noZeroes === false ? 134 : 10);
      client.size = Number(r.readBigUInt64BE(0));
      client.flags = r.readUInt16BE(8);
    } else {
      const nameBytes = Buffer.from(name);
      const go = Buffer.concat([u32(nameBytes.length), nameBytes, u16(1), u16(3)]); // ask for BLOCK_SIZE
      raw.socket.write(optionRequest(Opt.GO, go));
      for (let r = await raw.optionReply(); r.type !== Rep.ACK; r = await raw.optionReply()) {
        if (r.type !== Rep.INFO) {
          raw.socket.destroy();
          throw new Error(`NBD_OPT_GO failed: reply 0x${r.type.toString(16)} ${r.data.toString()}`);
        }
        const info = r.data.readUInt16BE(0);
        if (info === 0) {
          client.size = Number(r.data.readBigUInt64BE(2));
          client.flags = r.data.readUInt16BE(10);
        } else if (info === 3) {
          client.blockSizes = [r.data.readUInt32BE(2), r.data.readUInt32BE(6), r.data.readUInt32BE(10)];
        }
      }
    }
    void client.replyLoop();
    return client;
  }

  read(offset: number, length: number, flags = 0): Promise<Reply> {
    return this.request(Cmd.READ, offset, length, { flags });
  }
  write(offset: number, data: Buffer, flags = 0): Promise<Reply> {
    return this.request(Cmd.WRITE, offset, data.length, { flags, data });
  }
  flush(): Promise<Reply> {
    return this.request(Cmd.FLUSH, 0, 0);
  }

  /** Any request; `offset` may be a bigint for offsets a number cannot hold exactly. */
  request(
    type: number,
    offset: number | bigint,
    length: number,
    opts: { flags?: number; data?: Buffer } = {},
  ): Promise<Reply> {
    const handle = this.nextHandle++;
    return new Promise((resolve, reject) => {
      const buf = type === Cmd.READ ? Buffer.alloc(length) : null;
      this.pending.set(handle, { type, offset: Number(offset), length, buf, error: 0, resolve, reject });
      this.maxInFlight = Math.max(this.maxInFlight, this.pending.size);
      this.socket.write(requestHeader(type, opts.flags ?? 0, handle, offset, length));
      if (opts.data?.length) this.socket.write(opts.data);
    });
  }

  /** NBD_CMD_DISC, then wait for the server to close. */
  async disconnect(): Promise<void> {
    this.socket.write(requestHeader(Cmd.DISC, 0, 0n, 0, 0));
    await this.raw.reader.closed;
  }

  closedByServer(): Promise<void> {
    return this.raw.reader.closed;
  }

  destroy(): void {
    this.socket.destroy();
  }

  private async replyLoop(): Promise<void> {
    const reader = this.raw.reader;
    try {
      for (;;) {
        const magic = (await reader.read(4)).readUInt32BE(0);
        if (magic === 0x67446698) await this.simpleReply(await reader.read(12));
        else if (magic === 0x668e33ef) await this.structuredChunk(await reader.read(16));
        else throw new Error(`bad reply magic 0x${magic.toString(16)}`);
      }
    } catch (err) {
      for (const p of this.pending.values()) p.reject(err as Error);
      this.pending.clear();
    }
  }

  private async simpleReply(h: Buffer): Promise<void> {
    const error = h.readUInt32BE(0);
    const p = this.take(h.readBigUInt64BE(4));
    if (p.type === Cmd.READ && error === 0 && p.length > 0) (await this.raw.reader.read(p.length)).copy(p.buf!);
    p.error = error;
    this.finish(p);
  }

  private async structuredChunk(h: Buffer): Promise<void> {
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const handle = h.readBigUInt64BE(4);
    const length = h.readUInt32BE(12);
    const payload = length ? await this.raw.reader.read(length) : Buffer.alloc(0);
    const p = this.pending.get(handle);
    if (!p) throw new Error(`chunk for unknown handle ${handle}`);
    if (type === 1) {
      const at = Number(payload.readBigUInt64BE(0)) - p.offset;
      payload.copy(p.buf!, at, 8);
    } else if (type === 0x8001) {
      p.error = payload.readUInt32BE(0);
      p.message = payload.subarray(6, 6 + payload.readUInt16BE(4)).toString();
    } else if (type !== 0) {
      throw new Error(`unexpected chunk type ${type}`);
    }
    if (flags & 1) this.finish(this.take(handle));
  }

  private take(handle: bigint): Pending {
    const p = this.pending.get(handle);
    if (!p) throw new Error(`reply for unknown handle ${handle}`);
    // Map iteration is in insertion (= handle) order: an older request still pending comes first.
    if (this.pending.keys().next().value! < handle) this.outOfOrder++;
    this.pending.delete(handle);
    return p;
  }

  private finish(p: Pending): void {
    this.settled++;
    p.resolve({ error: p.error, message: p.message, data: p.error === 0 && p.buf ? p.buf : undefined });
  }
}

export function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}

export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

export function optionRequest(option: number, data: Buffer): Buffer {
  return Buffer.concat([Buffer.from("IHAVEOPT"), u32(option), u32(data.length), data]);
}

export function requestHeader(
  type: number,
  flags: number,
  handle: bigint,
  offset: number | bigint,
  length: number,
): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(0x25609513, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(handle, 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length, 24);
  return h;
}
