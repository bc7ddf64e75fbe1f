/**
 * The NBD client device (core/devices/nbd/) against servers in this process: udm's own NbdServer
 * (tables naming its exports, sharing, block sizes) and a scripted server (test/support/
 * scripted-nbd-server.ts) for what a real server does only by accident: garbage, wrong chunks,
 * ESHUTDOWN, silence, a restart that loses unflushed writes, an export that comes back smaller.
 * Real servers (nbdkit, qemu-nbd, udmd) are in nbd-remote.test.ts.
 */
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { BioFlags, discardBio, flushBio, readBio, submitAndWait, writeBio, writeZeroesBio } from "../../core/bio.js";
import { NbdDevice, type NbdDeviceOptions } from "../../core/devices/nbd/nbd-device.js";
import { MemoryLogger } from "../../core/logger.js";
import { Cmd, CmdFlags, NbdErrno, TransmissionFlags } from "../../nbd/protocol.js";
import { DEFAULT_FLAGS, ScriptedNbdServer, chunkHeader } from "../support/scripted-nbd-server.js";
import { RecordingDevice } from "../support/recording-device.js";
import { startWireServer, stopWireServer, type WireServer } from "../support/wire-server.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";
import { bioStatus as status, readBytes as read } from "../support/bio-io.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const SINGLE = DEFAULT_FLAGS & ~TransmissionFlags.CAN_MULTI_CONN;

let dir: string;
let logger: MemoryLogger;
const opened: NbdDevice[] = [];
const servers: ScriptedNbdServer[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-nbdc-"));
  logger = new MemoryLogger();
});

afterEach(async () => {
  for (const d of opened.splice(0)) await d.close();
  for (const s of servers.splice(0)) await s.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function open(uri: string, opts: NbdDeviceOptions = {}, mode: "r" | "rw" = "rw"): Promise<NbdDevice> {
  const dev = await NbdDevice.open(uri, { mode }, { logger, reconnectDelayMs: { first: 5, max: 40 }, ...opts });
  opened.push(dev);
  return dev;
}

async function scripted(size = 4 * MiB, flags = SINGLE, extra: object = {}): Promise<ScriptedNbdServer> {
  const s = await ScriptedNbdServer.start(dir, { name: "disk", size, flags, ...extra });
  servers.push(s);
  return s;
}

async function openError(uri: string, mode: "r" | "rw" = "rw"): Promise<NodeJS.ErrnoException> {
  return NbdDevice.open(uri, { mode }, { logger }).then(
    (d) => {
      opened.push(d);
      throw new Error("open should have failed");
    },
    (e: NodeJS.ErrnoException) => e,
  );
}

describe("against udm's NBD server", () => {
  let w: WireServer;
  beforeEach(async () => {
    w = await startWireServer("udm-nbdc-srv-");
  });
  afterEach(async () => {
    for (const d of opened.splice(0)) await d.close();
    await stopWireServer(w);
  });

  it("a table names the export: linear reads and writes it; table and deps show the URI as given", async () => {
    const m0 = w.backing.memory("m0", 8192);
    await w.dm.create("vol", { table: "0 8192 linear m0 0" });
    const uri = `nbd+unix:///vol?socket=${w.sock}`;
    const { dm } = testMapper();
    try {
      await dm.create("r", { table: `0 4096 linear ${uri} 2048` });
      const dev = dm.open("r");
      const data = pattern(1, 64 * KiB);
      await dev.write(8, data, { fua: true });
      expect((await dev.read(8, 128)).equals(data)).toBe(true);
      // The bytes are on the server's RAM disk, 2048 sectors in.
      const there = Buffer.alloc(64 * KiB);
      await submitAndWait(m0, readBio(2048 + 8, there));
      expect(there.equals(data)).toBe(true);
      expect(dm.tableText("r")).toBe(`0 4096 linear ${uri} 2048\n`);
      expect(dm.deps("r").map((d) => d.tableName)).toEqual([uri]);
      expect(dm.deps("r")[0]!.devno).toBeUndefined();
      await dev.close();
    } finally {
      await dm.close();
    }
  });

  it("two spellings of one export (absolute and relative socket path) share one device", async () => {
    w.backing.memory("m0", 2048);
    await w.dm.create("vol", { table: "0 2048 linear m0 0" });
    const abs = `nbd+unix:///vol?socket=${w.sock}`;
    const rel = `nbd+unix:///vol?socket=${path.relative(process.cwd(), w.sock)}`;
    const { dm } = testMapper();
    try {
      await dm.create("a", { table: `0 1024 linear ${abs} 0` });
      await dm.create("b", { table: `0 1024 linear ${rel} 1024` });
      expect(dm.deps("a")[0]).toBe(dm.deps("b")[0]);
      // One device, one name: as the kernel prints one major:minor whatever path named a device,
      // both tables show the spelling that opened it first.
      expect(dm.tableText("b")).toBe(`0 1024 linear ${abs} 1024\n`);
    } finally {
      await dm.close();
    }
  });

  it("snapshot-origin and snapshot over one remote export (spelt two ways) share it: origin writes are copied first", async () => {
    const m0 = w.backing.memory("m0", 8192);
    await submitAndWait(m0, writeBio(0, pattern(20, 4 * MiB)));
    await w.dm.create("base", { table: "0 8192 linear m0 0" });
    const abs = `nbd+unix:///base?socket=${w.sock}`;
    const rel = `nbd+unix:///base?socket=${path.relative(process.cwd(), w.sock)}`;
    const { dm, backing } = testMapper();
    backing.memory("cow", 4096);
    try {
      await dm.create("origin", { table: `0 8192 snapshot-origin ${abs}` });
      await dm.suspend("origin");
      await dm.create("snap", { table: `0 8192 snapshot ${rel} cow P 8` });
      await dm.resume("origin");
      const origin = dm.open("origin");
      const snap = dm.open("snap");
      await origin.write(0, pattern(21, 64 * KiB));
      expect((await snap.read(0, 128)).equals(pattern(20, 64 * KiB))).toBe(true);
      expect((await origin.read(0, 128)).equals(pattern(21, 64 * KiB))).toBe(true);
      await origin.close();
      await snap.close();
    } finally {
      await dm.close();
    }
  });

  it("size and block sizes come from the server; requests are cut at its maximum", async () => {
    await stopWireServer(w);
    w = await startWireServer("udm-nbdc-srv-");
    // A server with a 64 KiB maximum block size.
    const { NbdServer, deviceMapperExports } = await import("../../nbd/server.js");
    const small = new NbdServer(deviceMapperExports(w.dm), { logger: new MemoryLogger(), maxPayload: 64 * KiB });
    const sock = path.join(w.dir, "small.sock");
    await small.listenUnix(sock);
    try {
      const rec = w.backing.add("rec", new RecordingDevice(w.backing.memory("m0", 6000)));
      await w.dm.create("vol", { table: "0 6000 linear rec 0" });
      const dev = await open(`nbd+unix:///vol?socket=${sock}`);
      expect(dev.sizeSectors).toBe(6000);
      expect(dev.logicalBlockSize).toBe(512);
      const data = pattern(2, MiB);
      await submitAndWait(dev, writeBio(0, data));
      const writes = rec.received.filter((r) => r.op === "write");
      expect(writes).toHaveLength(16);
      expect(writes.every((r) => r.sectors === 128)).toBe(true);
      expect((await read(dev, 0, MiB)).equals(data)).toBe(true);
      expect(rec.received.filter((r) => r.op === "read")).toHaveLength(16);
    } finally {
      for (const d of opened.splice(0)) await d.close();
      await small.close();
    }
  });

  it("a read-only export: refused for a writable table (EROFS), served to a read-only one", async () => {
    w.backing.memory("m0", 2048);
    await w.dm.create("ro", { table: "0 2048 linear m0 0", readOnly: true });
    const uri = `nbd+unix:///ro?socket=${w.sock}`;
    const err = await openError(uri);
    expect(err.code).toBe("EROFS");
    expect(err.message).toContain("read-only");
    const { dm } = testMapper();
    try {
      await expect(dm.create("r", { table: `0 2048 linear ${uri} 0` })).rejects.toMatchObject({ errno: "EROFS" });
      await dm.create("r", { table: `0 2048 linear ${uri} 0`, readOnly: true });
      const dev = dm.open("r");
      expect((await dev.read(0, 8)).length).toBe(4096);
      await expect(dev.write(0, Buffer.alloc(4096))).rejects.toMatchObject({ status: "EPERM" });
      await dev.close();
    } finally {
      await dm.close();
    }
  });

  it("multi-conn: four connections by default, x-udm-connections=N otherwise", async () => {
    w.backing.memory("m0", 2048);
    await w.dm.create("vol", { table: "0 2048 linear m0 0" });
    const four = await open(`nbd+unix:///vol?socket=${w.sock}`);
    expect(four.connectionState()).toMatchObject({ state: "connected", connections: 4, connected: 4 });
    const two = await open(`nbd+unix:///vol?socket=${w.sock}&x-udm-connections=2`);
    expect(two.connectionState()).toMatchObject({ connections: 2, connected: 2 });
  });
});

describe("what reaches the server", () => {
  it("requests in flight are spread over the multi-conn connections", async () => {
    const s = await scripted(4 * MiB, DEFAULT_FLAGS);
    const dev = await open(s.uri);
    await Promise.all(Array.from({ length: 64 }, (_, i) => read(dev, i * 8, 4 * KiB)));
    expect(s.connections).toHaveLength(4);
    for (const c of s.connections) expect(c.requests.length).toBeGreaterThan(0);
  });

  it("FUA, PREFLUSH, flush, discard and write-zeroes pass through as NBD commands and flags", async () => {
    const s = await scripted();
    const dev = await open(s.uri);
    await submitAndWait(dev, writeBio(0, Buffer.alloc(4096, 1), BioFlags.FUA));
    await submitAndWait(dev, writeBio(8, Buffer.alloc(4096, 2), BioFlags.PREFLUSH));
    await submitAndWait(dev, flushBio());
    await submitAndWait(dev, discardBio(16, 8));
    await submitAndWait(dev, writeZeroesBio(24, 8, BioFlags.NOUNMAP));
    const seen = s.connections[0]!.requests.map((r) => [r.type, r.flags, r.offset, r.length]);
    expect(seen).toEqual([
      [Cmd.WRITE, CmdFlags.FUA, 0, 4096],
      [Cmd.FLUSH, 0, 0, 0],
      [Cmd.WRITE, 0, 4096, 4096],
      [Cmd.FLUSH, 0, 0, 0],
      [Cmd.TRIM, 0, 8192, 4096],
      [Cmd.WRITE_ZEROES, CmdFlags.NO_HOLE, 12288, 4096],
    ]);
  });

  it("without SEND_FUA a FUA write is a write and a flush; without SEND_FLUSH a flush is done at once", async () => {
    const s = await scripted(MiB, TransmissionFlags.SEND_FLUSH);
    const dev = await open(s.uri);
    await submitAndWait(dev, writeBio(0, Buffer.alloc(4096, 1), BioFlags.FUA));
    expect(s.connections[0]!.requests.map((r) => [r.type, r.flags])).toEqual([
      [Cmd.WRITE, 0],
      [Cmd.FLUSH, 0],
    ]);
    // No trim, no write-zeroes: EOPNOTSUPP without asking the server.
    expect(dev.supportsDiscard).toBe(false);
    expect(await status(dev, discardBio(0, 8))).toBe("EOPNOTSUPP");
    expect(await status(dev, writeZeroesBio(0, 8))).toBe("EOPNOTSUPP");

    const t = await ScriptedNbdServer.start(dir, { name: "", size: MiB, flags: 0 });
    servers.push(t);
    const plain = await open(`nbd+unix:///?socket=${t.sock}`);
    await submitAndWait(plain, writeBio(0, Buffer.alloc(4096, 1), BioFlags.FUA | BioFlags.PREFLUSH));
    await submitAndWait(plain, flushBio());
    expect(t.connections[0]!.requests.map((r) => [r.type, r.flags])).toEqual([[Cmd.WRITE, 0]]);
  });

  it("block sizes: the server's minimum is the logical block size, its maximum cuts requests", async () => {
    const s = await scripted(MiB, SINGLE, { blockSizes: [4096, 4096, 64 * KiB] });
    const dev = await open(s.uri);
    expect(dev.logicalBlockSize).toBe(4096);
    expect(await status(dev, readBio(1, Buffer.alloc(4096)))).toBe("EINVAL");
    await submitAndWait(dev, writeBio(0, pattern(3, 256 * KiB)));
    expect(s.connections[0]!.requests.map((r) => r.length)).toEqual([65536, 65536, 65536, 65536]);
    expect((await read(dev, 0, 256 * KiB)).equals(pattern(3, 256 * KiB))).toBe(true);
  });

  it("a server without structured replies: simple replies carry the data", async () => {
    const s = await scripted(MiB, SINGLE, { structured: false });
    const dev = await open(s.uri);
    await submitAndWait(dev, writeBio(0, pattern(4, 128 * KiB)));
    expect((await read(dev, 0, 128 * KiB)).equals(pattern(4, 128 * KiB))).toBe(true);
    expect(s.connections[0]!.structured).toBe(false);
  });
});

describe("opening fails with a reason", () => {
  it("no such export, no such socket, not an NBD server, a bad URI", async () => {
    const s = await scripted();
    expect((await openError(`nbd+unix:///nope?socket=${s.sock}`)).code).toBe("ENOENT");
    expect((await openError(`nbd+unix:///nope?socket=${s.sock}`)).message).toContain('no export "nope"');
    expect((await openError(`nbd+unix:///disk?socket=${dir}/missing.sock`)).code).toBe("ENOENT");
    const junk = net.createServer((c) => c.end("HTTP/1.0 400 Bad Request\r\n\r\n"));
    const junkSock = path.join(dir, "junk.sock");
    await new Promise<void>((r) => junk.listen(junkSock, r));
    try {
      const e = await openError(`nbd+unix:///disk?socket=${junkSock}`);
      expect(e.code).toBe("EPROTO");
      expect(e.message).toContain("not an NBD server");
    } finally {
      junk.close();
    }
    expect((await openError(`nbd+unix:///disk?sokcet=${s.sock}`)).code).toBe("EINVAL");
  });
});

describe("faults", () => {
  const garbage: [string, (h: bigint) => Buffer][] = [
    ["a bad reply magic", () => Buffer.from("garbage garbage garbage garbage")],
    ["a reply to a cookie not in flight", (h) => chunkHeader(1, 0, h + 100n, 0)],
    ["OFFSET_DATA outside the request", (h) => offsetData(h, 1 * MiB, 512)],
    ["an error chunk longer than any message", (h) => chunkHeader(1, 0x8001, h, 100_000)],
    ["a BLOCK_STATUS chunk nobody asked for", (h) => chunkHeader(1, 5, h, 12)],
    ["a simple reply with data to a READ after structured replies", (h) => simpleOk(h)],
  ];
  for (const [what, bytes] of garbage) {
    it(`${what}: the connection is dropped and the read is sent again on a new one`, async () => {
      const s = await scripted();
      s.disk.fill(7, 0, 4096);
      let sent = false;
      s.onRequest = (r, c) => {
        if (r.type !== Cmd.READ || sent) return "default";
        sent = true;
        c.write(bytes(r.handle));
        return "handled";
      };
      const dev = await open(s.uri);
      expect((await read(dev, 0, 4096)).equals(Buffer.alloc(4096, 7))).toBe(true);
      expect(s.connections).toHaveLength(2);
      expect(logger.records.some((r) => r.msg === "nbd: connection lost")).toBe(true);
    });
  }

  it("a read reply that does not cover the read fails it with EIO; the connection stays", async () => {
    const s = await scripted();
    let first = true;
    s.onRequest = (r, c) => {
      if (r.type !== Cmd.READ || !first) return "default";
      first = false;
      c.data(r.handle, r.offset, Buffer.alloc(r.length / 2));
      return "handled";
    };
    const dev = await open(s.uri);
    expect(await status(dev, readBio(0, Buffer.alloc(8192)))).toBe("EIO");
    expect((await read(dev, 0, 8192)).length).toBe(8192);
    expect(s.connections).toHaveLength(1);
  });

  it("error replies fail only their request, with the matching status", async () => {
    const s = await scripted();
    const errors = [NbdErrno.EIO, NbdErrno.ENOSPC, NbdErrno.EPERM, NbdErrno.EINVAL];
    let next = 0;
    s.onRequest = (r, c) => {
      if (r.type !== Cmd.WRITE || next >= errors.length) return "default";
      c.error(r.handle, errors[next++]!, "no");
      return "handled";
    };
    const dev = await open(s.uri);
    const got = [];
    for (let i = 0; i < errors.length; i++) got.push(await status(dev, writeBio(0, Buffer.alloc(512))));
    expect(got).toEqual(["EIO", "ENOSPC", "EPERM", "EIO"]);
    expect(await status(dev, writeBio(0, Buffer.alloc(512)))).toBe("ok");
    expect(s.connections).toHaveLength(1);
  });

  it("ESHUTDOWN: the client disconnects and sends the request again on a new connection", async () => {
    const s = await scripted();
    let first = true;
    s.onRequest = (r, c) => {
      if (r.type !== Cmd.WRITE || !first) return "default";
      first = false;
      c.error(r.handle, NbdErrno.ESHUTDOWN, "going down");
      return "handled";
    };
    const dev = await open(s.uri);
    await submitAndWait(dev, writeBio(0, Buffer.alloc(4096, 9)));
    expect(s.connections).toHaveLength(2);
    expect(s.read(0, 4096).equals(Buffer.alloc(4096, 9))).toBe(true);
  });

  it("a request that gets no reply fails with EIO after the timeout; a new connection takes over", async () => {
    const s = await scripted();
    let first = true;
    s.onRequest = (r) => {
      if (r.type !== Cmd.READ || !first) return "default";
      first = false;
      return "handled"; // never answered
    };
    const dev = await open(`${s.uri}&x-udm-timeout=0.2`);
    expect(await status(dev, readBio(0, Buffer.alloc(4096)))).toBe("EIO");
    expect(logger.records.some((r) => r.msg === "nbd: no reply within the timeout; dropping the connection")).toBe(
      true,
    );
    expect((await read(dev, 0, 4096)).length).toBe(4096);
    expect(s.connections).toHaveLength(2);
  });

  it("a write in flight when the connection drops is sent again and completes", async () => {
    const s = await scripted();
    let first = true;
    s.onRequest = (r, c) => {
      if (r.type !== Cmd.WRITE || !first) return "default";
      first = false;
      c.destroy(); // the write was received and never carried out
      return "handled";
    };
    const dev = await open(s.uri);
    await submitAndWait(dev, writeBio(16, pattern(5, 8192)));
    expect(s.read(8192, 8192).equals(pattern(5, 8192))).toBe(true);
    expect(s.connections).toHaveLength(2);
  });

  it("no server for longer than the timeout: waiting I/O fails, new I/O fails at once, then it comes back", async () => {
    const s = await scripted();
    const dev = await open(`${s.uri}&x-udm-timeout=0.2`);
    await s.stop();
    expect(await status(dev, readBio(0, Buffer.alloc(4096)))).toBe("EIO");
    expect(dev.connectionState().state).toBe("failed");
    expect(await status(dev, readBio(0, Buffer.alloc(4096)))).toBe("EIO");
    await s.restart();
    await dev.whenConnected();
    expect(dev.connectionState()).toMatchObject({ state: "connected", reconnects: 1 });
    expect((await read(dev, 0, 4096)).length).toBe(4096);
  });

  it("writes acknowledged but not flushed are written again when the server comes back without them", async () => {
    const s = await scripted();
    const dev = await open(s.uri);
    await submitAndWait(dev, writeBio(0, pattern(6, 64 * KiB)));
    await submitAndWait(dev, writeBio(64, pattern(7, 4 * KiB))); // overlaps the first: the newer bytes win
    expect(dev.connectionState().unflushedBytes).toBe(64 * KiB);
    await s.stop(); // the server's cache is gone, and with it both writes
    expect(s.read(0, 64 * KiB).equals(Buffer.alloc(64 * KiB))).toBe(true);
    await s.restart();
    const back = await read(dev, 0, 64 * KiB); // waits for the reconnection and the replay
    const expected = pattern(6, 64 * KiB);
    pattern(7, 4 * KiB).copy(expected, 64 * 512);
    expect(back.equals(expected)).toBe(true);
    const again = s.connections.at(-1)!.requests.map((r) => r.type);
    expect(again.slice(0, -1).every((t) => t === Cmd.WRITE)).toBe(true);
    expect(again.at(-1)).toBe(Cmd.READ);
    await submitAndWait(dev, flushBio());
    expect(dev.connectionState().unflushedBytes).toBe(0);
  });

  it("a flush covers acknowledged writes: nothing is written again after a reconnect", async () => {
    const s = await scripted();
    const dev = await open(s.uri);
    await submitAndWait(dev, writeBio(0, pattern(8, 16 * KiB)));
    await submitAndWait(dev, flushBio());
    await s.stop();
    await s.restart();
    expect((await read(dev, 0, 16 * KiB)).equals(pattern(8, 16 * KiB))).toBe(true);
    expect(s.connections.at(-1)!.requests.map((r) => r.type)).toEqual([Cmd.READ]);
  });

  it("more unflushed writes than the replay buffer holds: the next flush after a reconnect fails with EIO", async () => {
    const s = await scripted();
    const dev = await open(s.uri, { replayLimitBytes: 8 * KiB });
    await submitAndWait(dev, writeBio(0, pattern(9, 16 * KiB)));
    await s.stop();
    await s.restart();
    expect(await status(dev, flushBio())).toBe("EIO");
    expect(logger.records.some((r) => r.level === "error")).toBe(true);
    expect(await status(dev, flushBio())).toBe("ok"); // reported once
  });

  it("x-udm-replay-mib=0 keeps no copies: the first flush after a restart fails with EIO instead", async () => {
    const s = await scripted();
    const dev = await open(`${s.uri}&x-udm-replay-mib=0`);
    await submitAndWait(dev, writeBio(0, pattern(10, 4 * KiB)));
    expect(dev.connectionState().unflushedBytes).toBe(0);
    await s.stop();
    await s.restart();
    expect(await status(dev, flushBio())).toBe("EIO");
    expect(await status(dev, flushBio())).toBe("ok");
  });

  it("an export that comes back smaller: I/O past its new end fails with EIO, below it works", async () => {
    const s = await scripted(4 * MiB);
    const dev = await open(s.uri);
    await s.stop();
    await s.restart({ size: MiB });
    expect((await read(dev, 0, 4096)).length).toBe(4096);
    expect(dev.sizeSectors).toBe(2048);
    expect(await status(dev, readBio(3000, Buffer.alloc(4096)))).toBe("EIO");
    expect(logger.records.some((r) => r.msg === "nbd: the export changed size across a reconnect")).toBe(true);
  });

  it("a server that answers every request with garbage: the request fails after the timeout", async () => {
    const s = await scripted();
    s.onRequest = (_r, c) => {
      c.write(Buffer.from("nonsense, always"));
      return "handled";
    };
    const dev = await open(`${s.uri}&x-udm-timeout=0.3`);
    expect(await status(dev, readBio(0, Buffer.alloc(4096)))).toBe("EIO");
    expect(s.connections.length).toBeGreaterThan(1);
  });
});

function offsetData(handle: bigint, offset: number, length: number): Buffer {
  const b = Buffer.alloc(20 + 8 + length);
  chunkHeader(1, 1, handle, 8 + length).copy(b);
  b.writeBigUInt64BE(BigInt(offset), 20);
  return b;
}

function simpleOk(handle: bigint): Buffer {
  const b = Buffer.alloc(16 + 4096);
  b.writeUInt32BE(0x67446698, 0);
  b.writeBigUInt64BE(handle, 8);
  return b;
}
