/**
 * The NBD server on the wire, driven by a small pipelining client (WireClient, test/support/nbd-client.ts):
 * many requests in flight on several connections, verified data, suspend/resume under load,
 * simple and structured replies, and bad input that must only ever hurt its own connection.
 */
import fs from "node:fs";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { FileDevice } from "../../core/devices/file-device.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import type { MemoryLogger } from "../../core/logger.js";
import { NbdServer, deviceMapperExports } from "../../nbd/server.js";
import { Cmd, CmdFlags, NbdErrno, Opt, Rep, TransmissionFlags } from "../../nbd/protocol.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import {
  type ConnectOptions,
  RawConnection,
  WireClient,
  optionRequest,
  requestHeader,
  u32,
} from "../support/nbd-client.js";
import { type NamedBacking, pattern } from "../../testing/memory-backing.js";
import { type WireServer, startWireServer, stopWireServer } from "../support/wire-server.js";

const KiB = 1024;
const MiB = 1024 * KiB;

let wire: WireServer;
let dir: string;
let sock: string;
let dm: DeviceMapper;
let backing: NamedBacking;
let server: NbdServer;
let logger: MemoryLogger;

beforeEach(async () => {
  wire = await startWireServer("udm-nbd-wire-");
  ({ dir, sock, dm, backing, server, logger } = wire);
});

afterEach(() => stopWireServer(wire));

const connect = (name: string, opts: ConnectOptions = {}): Promise<WireClient> => wire.connect(name, opts);

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
    expect((await h.read(0, 16384)).equals(Buffer.concat(Array.from({ length: blocks }, (_, i) => expected(i))))).toBe(
      true,
    );
    await h.close();
  });

  it("large writes that arrive in pieces land intact, with small requests pipelined behind them", async () => {
    // Payloads spanning many socket reads are received in place (ReceiveBuffer + payloadSpace);
    // what decides the pieces here is the client's write sizes and the scheduler, and whatever
    // they are, every byte must end up where it was sent.
    backing.memory("mem0", 8192);
    await dm.create("disk", { table: "0 8192 linear mem0 0" });
    const c = await connect("disk");
    const big = [pattern(1, 3 * MiB), pattern(2, 512 * KiB + 512)];
    const small = Array.from({ length: 8 }, (_, i) => pattern(10 + i, 4 * KiB));
    const replies = [
      c.write(0, big[0]!),
      ...small.map((d, i) => c.write(3 * MiB + i * 4 * KiB, d)),
      c.write(3 * MiB + 32 * KiB, big[1]!),
    ];
    expect((await Promise.all(replies)).map((r) => r.error)).toEqual(replies.map(() => 0));
    const back = await c.read(0, 3 * MiB + 32 * KiB + big[1]!.length);
    expect(back.data!.equals(Buffer.concat([big[0]!, ...small, big[1]!]))).toBe(true);
    // The connection really reads through a ReceiveBuffer (the server says when it cannot).
    expect(logger.records.filter((r) => r.msg.includes("Node's own buffers"))).toEqual([]);
  });

  it("trim, write-zeroes (NO_HOLE), cache and zero-length requests", async () => {
    const mem = backing.memory("mem0", 4096);
    await dm.create("disk", { table: "0 4096 linear mem0 0" });
    const c = await connect("disk");
    expect((await c.write(0, pattern(5, 64 * KiB))).error).toBe(0);
    expect((await c.request(Cmd.TRIM, 0, 16 * KiB)).error).toBe(0);
    expect((await c.request(Cmd.WRITE_ZEROES, 16 * KiB, 16 * KiB, { flags: CmdFlags.NO_HOLE })).error).toBe(0);
    expect((await c.request(Cmd.WRITE_ZEROES, 32 * KiB, 8 * KiB, { flags: CmdFlags.FAST_ZERO })).error).toBe(
      NbdErrno.ENOTSUP,
    );
    expect((await c.request(Cmd.CACHE, 0, 64 * KiB)).error).toBe(0);
    expect((await c.read(0, 0)).error).toBe(0);
    expect((await c.write(0, Buffer.alloc(0))).error).toBe(0);
    const back = (await c.read(0, 64 * KiB)).data!;
    expect(back.subarray(16 * KiB, 32 * KiB).equals(Buffer.alloc(16 * KiB))).toBe(true);
    expect(back.subarray(32 * KiB).equals(pattern(5, 64 * KiB).subarray(32 * KiB))).toBe(true); // FAST_ZERO left it alone
    expect(mem.allocatedPages).toBeGreaterThan(0);
  });

  // Only linear and striped pass write-zeroes down: on anything else the server writes zeros
  // (nbd/zero-fill.ts), over the whole range, in several chunks, as blkdev_issue_zeroout falls
  // back to zero pages. A client left to emulate it may get it wrong (nbdfuse 1.14 wrote its
  // 4 KiB of zeros at the start of the range only, under the attach path's loop device).
  it("write-zeroes on a table that cannot zero: offered, and zeros written over the whole range", async () => {
    backing.memory("mem0", 16384);
    await dm.create("fl", { table: "0 16384 flakey mem0 0 60 0" });
    expect(dm.device("fl").supportsWriteZeroes).toBe(false);
    const c = await connect("fl");
    expect(c.flags & TransmissionFlags.SEND_WRITE_ZEROES).toBeTruthy();
    const before = pattern(6, 8 * MiB);
    expect((await c.write(0, before)).error).toBe(0);
    expect((await c.request(Cmd.WRITE_ZEROES, 8 * KiB, 3 * MiB + 4 * KiB, { flags: CmdFlags.FUA })).error).toBe(0);
    expect((await c.request(Cmd.WRITE_ZEROES, 5 * MiB, 8 * KiB, { flags: CmdFlags.FAST_ZERO })).error).toBe(
      NbdErrno.ENOTSUP,
    );
    const expected = Buffer.from(before);
    expected.fill(0, 8 * KiB, 8 * KiB + 3 * MiB + 4 * KiB);
    expect((await c.read(0, 8 * MiB)).data!.equals(expected)).toBe(true);
  });

  it("write-zeroes offered while the table could zero still zeroes after a reload to one that cannot", async () => {
    backing.memory("mem0", 4096);
    await dm.create("disk", { table: "0 4096 linear mem0 0" });
    const c = await connect("disk");
    expect((await c.write(0, pattern(7, 64 * KiB))).error).toBe(0);
    await dm.load("disk", "0 4096 flakey mem0 0 60 0");
    await dm.resume("disk");
    expect((await c.request(Cmd.WRITE_ZEROES, 0, 32 * KiB)).error).toBe(0);
    const back = (await c.read(0, 64 * KiB)).data!;
    expect(back.subarray(0, 32 * KiB).equals(Buffer.alloc(32 * KiB))).toBe(true);
    expect(back.subarray(32 * KiB).equals(pattern(7, 64 * KiB).subarray(32 * KiB))).toBe(true);
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
      wire.clients.push(c);
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
    for (const bytes of [Buffer.concat([u32(1), Buffer.from("IHAVEOPX"), u32(7), u32(0)]), u32(0x80)]) {
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
