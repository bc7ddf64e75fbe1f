/**
 * The NBD server on the wire, driven by a small pipelining client written here (WireClient):
 * many requests in flight on several connections, verified data, suspend/resume under load,
 * simple and structured replies, and bad input that must only ever hurt its own connection.
 */
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { FileDevice } from "../../core/devices/file-device.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { MemoryLogger } from "../../core/logger.js";
import { NbdServer, deviceMapperExports } from "../../dmsetup/nbd/server.js";
import { Cmd, CmdFlags, NbdErrno, Opt, Rep, TransmissionFlags } from "../../dmsetup/nbd/protocol.js";
import { ControlledDevice } from "../support/controlled-device.js";
import { type NamedBacking, pattern, testMapper } from "../support/memory-backing.js";

const KiB = 1024;
const MiB = 1024 * KiB;

let dir: string;
let sock: string;
let dm: DeviceMapper;
let backing: NamedBacking;
let server: NbdServer;
let logger: MemoryLogger;
const clients: WireClient[] = [];

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-nbd-wire-"));
  sock = path.join(dir, "nbd.sock");
  ({ dm, backing } = testMapper());
  logger = new MemoryLogger();
  server = new NbdServer(deviceMapperExports(dm), { logger, closeGraceMs: 500 });
  await server.listenUnix(sock);
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  await server.close();
  await dm.close();
  for (const dev of backing.devices.values()) await dev.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function connect(name: string, opts: ConnectOptions = {}): Promise<WireClient> {
  const c = await WireClient.connect(sock, name, opts);
  clients.push(c);
  return c;
}

describe("handshake", () => {
  it("creates the socket with mode 0600 and removes it on close", async () => {
    expect(fs.statSync(sock).mode & 0o777).toBe(0o600);
    await server.close();
    expect(fs.existsSync(sock)).toBe(false);
  });

  it("refuses a socket path another server listens on, or that is not a socket", async () => {
    const second = new NbdServer(deviceMapperExports(dm));
    await expect(second.listenUnix(sock)).rejects.toThrow(/another server is listening/);
    const file = path.join(dir, "plain");
    fs.writeFileSync(file, "keep me");
    await expect(second.listenUnix(file)).rejects.toThrow(/not a socket/);
    await second.close();
    expect(fs.readFileSync(file, "utf8")).toBe("keep me");
    expect(fs.existsSync(sock)).toBe(true); // the first server's socket is untouched
  });

  it("NBD_OPT_GO reports size, flags and block sizes; the connection counts as an opener", async () => {
    backing.memory("mem0", 4096);
    await dm.create("disk", { table: "0 2048 linear mem0 0" });
    const c = await connect("disk");
    expect(c.size).toBe(1 * MiB);
    const T = TransmissionFlags;
    const expected = T.HAS_FLAGS | T.SEND_FLUSH | T.SEND_FUA | T.CAN_MULTI_CONN | T.SEND_TRIM | T.SEND_WRITE_ZEROES;
    expect(c.flags & expected).toBe(expected);
    expect(c.flags & T.READ_ONLY).toBe(0);
    expect(c.blockSizes).toEqual([512, 4096, 32 * MiB]);
    expect(dm.info("disk").openCount).toBe(1);
    expect(server.connectionCount("disk")).toBe(1);
    await c.disconnect();
    await vi.waitFor(() => expect(dm.info("disk").openCount).toBe(0));
  });

  it("the default export is the only device, and ERR_UNKNOWN when there are several", async () => {
    backing.memory("mem0", 4096);
    await dm.create("only", { table: "0 1024 linear mem0 0" });
    const c = await connect("");
    expect(c.size).toBe(512 * KiB);
    await dm.create("second", { table: "0 1024 linear mem0 1024" });
    await expect(connect("")).rejects.toThrow(/NBD_REP_ERR_UNKNOWN|0x80000006/);
    await expect(connect("missing")).rejects.toThrow(/0x80000006/);
  });

  it("answers unknown, malformed and oversize options with errors and the connection goes on to GO", async () => {
    backing.memory("mem0", 4096);
    await dm.create("disk", { table: "0 1024 linear mem0 0" });
    const c = await connect("disk", {
      before: [
        { option: 0x1234, data: Buffer.from("junk") },
        { option: Opt.GO, data: Buffer.from("00000009646973", "hex") }, // name overruns the payload
        { option: Opt.GO, data: Buffer.alloc(9000) }, // over the 8 KiB option limit
        { option: Opt.STARTTLS, data: Buffer.alloc(0) },
      ],
    });
    expect(c.optionReplies).toEqual([
      { option: 0x1234, type: Rep.ERR_UNSUP },
      { option: Opt.GO, type: Rep.ERR_INVALID },
      { option: Opt.GO, type: Rep.ERR_TOO_BIG },
      { option: Opt.STARTTLS, type: Rep.ERR_UNSUP },
      { option: Opt.STRUCTURED_REPLY, type: Rep.ACK },
    ]);
    expect((await c.write(0, pattern(1, 4096))).error).toBe(0);
  });

  it("NBD_OPT_LIST lists every export", async () => {
    backing.memory("mem0", 4096);
    await dm.create("a", { table: "0 8 linear mem0 0" });
    await dm.create("b", { table: "0 8 linear mem0 8" });
    const raw = await RawConnection.open(sock);
    raw.socket.write(u32(3));
    raw.socket.write(optionRequest(Opt.LIST, Buffer.alloc(0)));
    const names: string[] = [];
    for (let r = await raw.optionReply(); r.type !== Rep.ACK; r = await raw.optionReply()) {
      expect(r.type).toBe(Rep.SERVER);
      names.push(r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString());
    }
    expect(names).toEqual(["a", "b"]);
    raw.socket.destroy();
  });

  it("NBD_OPT_EXPORT_NAME with simple replies (old clients), with and without the zero padding", async () => {
    backing.memory("mem0", 4096);
    await dm.create("disk", { table: "0 2048 linear mem0 0" });
    for (const noZeroes of [true, false]) {
      const c = await connect("disk", { exportName: true, structured: false, noZeroes });
      expect(c.size).toBe(1 * MiB);
      const data = pattern(noZeroes ? 2 : 3, 64 * KiB);
      expect((await c.write(4096, data)).error).toBe(0);
      const back = await c.read(4096, data.length);
      expect(back.error).toBe(0);
      expect(back.data!.equals(data)).toBe(true);
      expect((await c.read(2 * MiB, 512)).error).toBe(NbdErrno.EINVAL); // simple error reply, no payload
      expect((await c.read(0, 512)).error).toBe(0); // ...so the stream is still in sync
    }
  });
});

describe("transmission", () => {
  it("serves many pipelined requests on several connections, replies out of order, data verified", async () => {
    // Half RAM disk (completes inside submit), half file (completes later): replies interleave.
    const file = path.join(dir, "stripe.img");
    fs.writeFileSync(file, "");
    fs.truncateSync(file, 8 * MiB);
    backing.memory("mem0", 16384);
    backing.add("file0", await FileDevice.open(file, { mode: "rw" }));
    await dm.create("disk", { table: "0 16384 striped 2 16 mem0 0 file0 0" });

    const conns = await Promise.all([0, 1, 2, 3].map(() => connect("disk")));
    const block = 64 * KiB;
    const blocks = 128; // 8 MiB, each connection writes every 4th block
    const expected = (i: number) => pattern(1000 + i, block);
    await Promise.all(
      conns.map(async (c, n) => {
        const writes = [];
        for (let i = n; i < blocks; i += conns.length) {
          writes.push(c.write(i * block, expected(i), i % 3 === 0 ? CmdFlags.FUA : 0));
        }
        expect((await Promise.all(writes)).map((r) => r.error)).toEqual(writes.map(() => 0));
        expect((await c.flush()).error).toBe(0);
      }),
    );
    expect(Math.max(...conns.map((c) => c.maxInFlight))).toBeGreaterThan(8);
    expect(conns.some((c) => c.outOfOrder > 0)).toBe(true);

    // Every connection reads everything back: writes from the others are visible (multi-conn).
    await Promise.all(
      conns.map(async (c) => {
        const reads = Array.from({ length: blocks }, (_, i) => c.read(i * block, block));
        for (const [i, r] of (await Promise.all(reads)).entries()) {
          expect(r.error).toBe(0);
          if (!r.data!.equals(expected(i))) expect.fail(`block ${i} differs`);
        }
      }),
    );
    const h = dm.open("disk");
    expect((await h.read(0, 16384)).equals(Buffer.concat(Array.from({ length: blocks }, (_, i) => expected(i))))).toBe(true);
    await h.close();
  });

  it("trim, write-zeroes (NO_HOLE), cache and zero-length requests", async () => {
    const mem = backing.memory("mem0", 4096);
    await dm.create("disk", { table: "0 4096 linear mem0 0" });
    const c = await connect("disk");
    expect((await c.write(0, pattern(5, 64 * KiB))).error).toBe(0);
    expect((await c.request(Cmd.TRIM, 0, 16 * KiB)).error).toBe(0);
    expect((await c.request(Cmd.WRITE_ZEROES, 16 * KiB, 16 * KiB, { flags: CmdFlags.NO_HOLE })).error).toBe(0);
    expect((await c.request(Cmd.WRITE_ZEROES, 32 * KiB, 8 * KiB, { flags: CmdFlags.FAST_ZERO })).error).toBe(NbdErrno.ENOTSUP);
    expect((await c.request(Cmd.CACHE, 0, 64 * KiB)).error).toBe(0);
    expect((await c.read(0, 0)).error).toBe(0);
    expect((await c.write(0, Buffer.alloc(0))).error).toBe(0);
    const back = (await c.read(0, 64 * KiB)).data!;
    expect(back.subarray(16 * KiB, 32 * KiB).equals(Buffer.alloc(16 * KiB))).toBe(true);
    expect(back.subarray(32 * KiB).equals(pattern(5, 64 * KiB).subarray(32 * KiB))).toBe(true); // FAST_ZERO left it alone
    expect(mem.allocatedPages).toBeGreaterThan(0);
  });

  it("a read-only table gives a read-only export: writes fail with EPERM, reads work", async () => {
    backing.memory("mem0", 4096);
    await dm.create("ro", { table: "0 2048 linear mem0 0", readOnly: true });
    const c = await connect("ro");
    expect(c.flags & TransmissionFlags.READ_ONLY).toBeTruthy();
    expect((await c.write(0, pattern(1, 4096))).error).toBe(NbdErrno.EPERM);
    expect((await c.request(Cmd.WRITE_ZEROES, 0, 4096)).error).toBe(NbdErrno.EPERM);
    expect((await c.read(0, 4096)).error).toBe(0);
    expect((await c.flush()).error).toBe(0);
  });

  it("suspending with requests outstanding holds them; after resume all succeed", async () => {
    const ctl = backing.add("ctl", new ControlledDevice(4096, { name: "ctl" }));
    await dm.create("disk", { table: "0 4096 linear ctl 0" });
    const md = dm.device("disk");
    const c = await connect("disk");

    const hold = ctl.hold();
    const early = [0, 1, 2, 3].map((i) => c.write(i * 8 * KiB, pattern(10 + i, 8 * KiB)));
    await ctl.waitForHeld(4); // in flight inside the device
    let suspended = false;
    const suspending = dm.suspend("disk").then(() => (suspended = true));

    // Arrive while suspending: the device queues them; the client must see no error.
    const late = [0, 1, 2, 3].map((i) => c.read(i * 8 * KiB, 8 * KiB));
    const extra = c.write(64 * KiB, pattern(20, 4 * KiB), CmdFlags.FUA);
    await vi.waitFor(() => expect(md.queued).toBe(5));
    expect(suspended).toBe(false);

    ctl.stopHolding(hold);
    ctl.releaseAll();
    await suspending;
    expect((await Promise.all(early)).map((r) => r.error)).toEqual([0, 0, 0, 0]);
    expect(c.settled).toBe(4); // the queued ones wait for resume

    await dm.resume("disk");
    const reads = await Promise.all(late);
    reads.forEach((r, i) => expect(r.data!.equals(pattern(10 + i, 8 * KiB))).toBe(true));
    expect((await extra).error).toBe(0);
  });
});

describe("flow control", () => {
  it("stops reading requests at maxInFlight and takes the rest as earlier ones complete", async () => {
    const limited = new NbdServer(deviceMapperExports(dm), { maxInFlight: 4 });
    const limitedSock = path.join(dir, "limited.sock");
    await limited.listenUnix(limitedSock);
    try {
      backing.memory("mem0", 4096);
      await dm.create("disk", { table: "0 4096 linear mem0 0" });
      const c = await WireClient.connect(limitedSock, "disk");
      clients.push(c);
      await dm.suspend("disk");
      const replies = Array.from({ length: 20 }, (_, i) => c.write(i * 4096, pattern(i, 4096)));
      await vi.waitFor(() => expect(dm.device("disk").queued).toBe(4));
      await new Promise((r) => setTimeout(r, 50));
      expect(dm.device("disk").queued).toBe(4); // the other 16 wait in the socket, not in memory
      await dm.resume("disk");
      expect((await Promise.all(replies)).every((r) => r.error === 0)).toBe(true);
      const back = await c.read(0, 20 * 4096);
      expect(back.data!.equals(Buffer.concat(Array.from({ length: 20 }, (_, i) => pattern(i, 4096))))).toBe(true);
    } finally {
      await limited.close();
    }
  });
});

describe("bad input only hurts its own connection", () => {
  it("handshake and transmission garbage, oversize and out-of-range requests, truncation", async () => {
    backing.memory("mem0", 8192);
    await dm.create("disk", { table: "0 4096 linear mem0 0" });
    await dm.create("other", { table: "0 4096 linear mem0 4096" });

    // A well-behaved client keeps doing verified I/O on another export the whole time.
    const good = await connect("other");
    let stop = false;
    let rounds = 0;
    const goodLoop = (async () => {
      while (!stop) {
        const data = pattern(rounds, 32 * KiB);
        const off = (rounds % 32) * 32 * KiB;
        expect((await good.write(off, data)).error).toBe(0);
        expect((await good.read(off, data.length)).data!.equals(data)).toBe(true);
        rounds++;
      }
    })();

    // Handshake: wrong option magic / unknown client flags → closed.
    for (const bytes of [
      Buffer.concat([u32(1), Buffer.from("IHAVEOPX"), u32(7), u32(0)]),
      u32(0x80),
    ]) {
      const raw = await RawConnection.open(sock);
      raw.socket.write(bytes);
      await raw.closedByServer();
    }

    const bad = await connect("disk");
    // Out of range, misaligned, oversize, unknown: error replies, connection stays usable.
    expect((await bad.read(2 * MiB, 4096)).error).toBe(NbdErrno.EINVAL);
    expect((await bad.write(2 * MiB - 512, pattern(1, 1024))).error).toBe(NbdErrno.ENOSPC);
    expect((await bad.request(Cmd.TRIM, 2 * MiB, 512)).error).toBe(NbdErrno.EINVAL);
    expect((await bad.request(Cmd.WRITE_ZEROES, 2 * MiB, 512)).error).toBe(NbdErrno.ENOSPC);
    expect((await bad.read(1, 512)).error).toBe(NbdErrno.EINVAL);
    expect((await bad.read(0, 100)).error).toBe(NbdErrno.EINVAL);
    expect((await bad.read(0, 33 * MiB)).error).toBe(NbdErrno.EINVAL);
    expect((await bad.write(0, Buffer.alloc(33 * MiB, 1))).error).toBe(NbdErrno.EINVAL); // payload skipped
    expect((await bad.request(Cmd.BLOCK_STATUS, 0, 512)).error).toBe(NbdErrno.EINVAL);
    expect((await bad.request(99, 0, 512)).error).toBe(NbdErrno.EINVAL);
    expect((await bad.read(0, 512, 0x8000)).error).toBe(NbdErrno.EINVAL); // unknown flag
    const errorMessage = (await bad.read(2 * MiB, 4096)).message;
    expect(errorMessage).toMatch(/past the end/);
    expect((await bad.write(0, pattern(7, 4096))).error).toBe(0);
    const h = dm.open("disk");
    expect((await h.read(0, 8)).equals(pattern(7, 4096))).toBe(true); // the rejected writes wrote nothing
    await h.close();

    // Transmission: wrong request magic → closed.
    const badMagic = await connect("disk");
    badMagic.socket.write(Buffer.alloc(28, 0x42));
    await badMagic.closedByServer();

    // Truncated request, then the client goes away → closed (and its export released).
    const truncated = await connect("disk");
    truncated.socket.end(requestHeader(Cmd.WRITE, 0, 1n, 0, 4096).subarray(0, 20));
    await truncated.closedByServer();
    expect(logger.records.some((r) => /truncated/.test(r.msg))).toBe(true);
    expect(logger.records.some((r) => /bad request magic/.test(JSON.stringify(r.fields)))).toBe(true);

    stop = true;
    await goodLoop;
    expect(rounds).toBeGreaterThan(0);
    expect((await good.read(0, 4096)).error).toBe(0);
    await vi.waitFor(() => expect(dm.info("disk").openCount).toBe(1)); // only `bad` is left
  });
});

describe("closing", () => {
  it("closeExport ends that export's connections (in-flight answered), others stay", async () => {
    const ctl = backing.add("ctl", new ControlledDevice(4096, { name: "ctl" }));
    backing.memory("mem0", 4096);
    await dm.create("victim", { table: "0 4096 linear ctl 0" });
    await dm.create("bystander", { table: "0 4096 linear mem0 0" });
    const v = await connect("victim");
    const b = await connect("bystander");

    ctl.hold();
    const inFlight = v.write(0, pattern(3, 4096));
    await ctl.waitForHeld(1);
    const closing = server.closeExport("victim");
    setImmediate(() => ctl.releaseAll());
    await closing;
    expect((await inFlight).error).toBe(0);
    await v.closedByServer();
    expect(server.connectionCount("victim")).toBe(0);
    await vi.waitFor(() => expect(dm.info("victim").openCount).toBe(0));
    expect((await b.read(0, 4096)).error).toBe(0);
  });

  it("closeExport gives up on requests a suspended device holds after the grace period", async () => {
    backing.memory("mem0", 4096);
    await dm.create("disk", { table: "0 4096 linear mem0 0" });
    const c = await connect("disk");
    await dm.suspend("disk");
    const held = expect(c.read(0, 4096)).rejects.toThrow(/connection closed/);
    await vi.waitFor(() => expect(dm.device("disk").queued).toBe(1));
    await server.closeExport("disk"); // closeGraceMs is 500 in these tests
    await held;
    await dm.remove("disk", { force: true });
  });

  it("NBD_OPT_ABORT is acknowledged, then the server closes", async () => {
    const raw = await RawConnection.open(sock);
    raw.socket.write(Buffer.concat([u32(1), optionRequest(Opt.ABORT, Buffer.alloc(0))]));
    expect((await raw.optionReply()).type).toBe(Rep.ACK);
    await raw.closedByServer();
  });
});

// ---------------------------------------------------------------------------------------------
// A small NBD client: fixed newstyle, GO (or EXPORT_NAME), structured or simple replies, and any
// number of requests in flight; replies are matched to requests by handle.

interface ConnectOptions {
  structured?: boolean;
  exportName?: boolean;
  noZeroes?: boolean;
  /** Extra options sent before GO (their replies are recorded in optionReplies). */
  before?: { option: number; data: Buffer }[];
}

interface Reply {
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
class ByteReader {
  private chunks: Buffer[] = [];
  private length = 0;
  private waiter: (() => void) | null = null;
  private ended = false;
  readonly closed: Promise<void>;

  constructor(readonly socket: net.Socket) {
    this.closed = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.on("data", (c: Buffer) => {
      this.chunks.push(c);
      this.length += c.length;
      this.waiter?.();
    });
    socket.on("close", () => {
      this.ended = true;
      this.waiter?.();
    });
    socket.on("error", () => undefined);
  }

  async read(n: number): Promise<Buffer> {
    while (this.length < n) {
      if (this.ended) throw new Error(`connection closed (wanted ${n} bytes, have ${this.length})`);
      await new Promise<void>((r) => (this.waiter = r));
      this.waiter = null;
    }
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    this.chunks = all.length > n ? [all.subarray(n)] : [];
    this.length -= n;
    return all.subarray(0, n);
  }
}

class RawConnection {
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
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: length ? await this.reader.read(length) : Buffer.alloc(0) };
  }

  /** Resolves when the server has closed the connection (without sending anything more). */
  async closedByServer(): Promise<void> {
    await expect(this.reader.read(1)).rejects.toThrow(/connection closed/);
  }
}

class WireClient {
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

  private constructor(
    private readonly raw: RawConnection,
    private readonly structured: boolean,
  ) {}

  get socket(): net.Socket {
    return this.raw.socket;
  }

  static async connect(socketPath: string, name: string, opts: ConnectOptions = {}): Promise<WireClient> {
    const raw = await RawConnection.open(socketPath);
    const structured = opts.structured ?? true;
    const client = new WireClient(raw, structured);
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

  request(type: number, offset: number, length: number, opts: { flags?: number; data?: Buffer } = {}): Promise<Reply> {
    const handle = this.nextHandle++;
    return new Promise((resolve, reject) => {
      const buf = type === Cmd.READ ? Buffer.alloc(length) : null;
      this.pending.set(handle, { type, offset, length, buf, error: 0, resolve, reject });
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
    if ([...this.pending.keys()].some((k) => k < handle)) this.outOfOrder++;
    this.pending.delete(handle);
    return p;
  }

  private finish(p: Pending): void {
    this.settled++;
    p.resolve({ error: p.error, message: p.message, data: p.error === 0 && p.buf ? p.buf : undefined });
  }
}

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

function optionRequest(option: number, data: Buffer): Buffer {
  return Buffer.concat([Buffer.from("IHAVEOPT"), u32(option), u32(data.length), data]);
}

function requestHeader(type: number, flags: number, handle: bigint, offset: number, length: number): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(0x25609513, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(handle, 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length, 24);
  return h;
}
