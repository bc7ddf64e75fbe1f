/**
 * The NBD client with extended headers (NBD_OPT_EXTENDED_HEADERS, proto.md's extension-ext-header
 * branch): 32-byte requests and replies, 64-bit lengths. Debian 12's nbdkit (1.32) and qemu-nbd
 * (7.2) predate the extension and udm's own server does not speak it, so the server here is the
 * scripted one (test/support/scripted-nbd-server.ts), which parses extended requests and hangs up on
 * any that break the extension's rules; the last group checks that nbdkit, which refuses the option,
 * still gets compact headers with structured replies.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { BioFlags, discardBio, flushBio, submitAndWait, writeBio, writeZeroesBio } from "../../core/bio.js";
import { NbdDevice } from "../../core/devices/nbd/nbd-device.js";
import { MemoryLogger } from "../../core/logger.js";
import { Cmd, CmdFlags, NbdErrno, ReplyFlags, ReplyType, TransmissionFlags } from "../../nbd/protocol.js";
import { startNbdkit, stopNbdServers } from "../support/nbd-servers.js";
import { missingTools } from "../support/requirements.js";
import {
  DEFAULT_FLAGS,
  type ScriptedExport,
  ScriptedNbdServer,
  chunkHeader,
  extendedChunk,
} from "../support/scripted-nbd-server.js";
import { pattern } from "../../testing/memory-backing.js";
import { bioStatus as status, readBytes as read } from "../support/bio-io.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const SINGLE = DEFAULT_FLAGS & ~TransmissionFlags.CAN_MULTI_CONN;

let dir: string;
let logger: MemoryLogger;
const opened: NbdDevice[] = [];
const servers: ScriptedNbdServer[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-nbdx-"));
  logger = new MemoryLogger();
});

afterEach(async () => {
  for (const d of opened.splice(0)) await d.close();
  for (const s of servers.splice(0)) await s.close();
  stopNbdServers();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function open(uri: string): Promise<NbdDevice> {
  const dev = await NbdDevice.open(uri, { mode: "rw" }, { logger, reconnectDelayMs: { first: 5, max: 40 } });
  opened.push(dev);
  return dev;
}

async function scripted(extra: Partial<ScriptedExport> = {}): Promise<ScriptedNbdServer> {
  const s = await ScriptedNbdServer.start(dir, {
    name: "disk",
    size: 4 * MiB,
    flags: SINGLE,
    extended: true,
    ...extra,
  });
  servers.push(s);
  return s;
}

/** The transmission requests a server saw, as [command, flags, offset, length]. */
function seen(s: ScriptedNbdServer, types: number[] = [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.FLUSH]) {
  return s.connections.flatMap((c) =>
    c.requests.filter((r) => types.includes(r.type)).map((r) => [r.type, r.flags, r.offset, r.length]),
  );
}

describe("negotiated where the server offers them", () => {
  it("reads, writes (with NBD_CMD_FLAG_PAYLOAD_LEN), FUA and flush go over extended headers", async () => {
    const s = await scripted();
    const dev = await open(s.uri);
    expect(s.connections[0]!.extended).toBe(true);
    expect(dev.connectionState()).toMatchObject({ state: "connected", replies: "extended" });
    const data = pattern(1, 64 * KiB);
    await submitAndWait(dev, writeBio(8, data, BioFlags.FUA));
    await submitAndWait(dev, flushBio());
    expect((await read(dev, 8, 64 * KiB)).equals(data)).toBe(true);
    expect(s.read(4096, 64 * KiB).equals(data)).toBe(true);
    expect(seen(s)).toEqual([
      [Cmd.WRITE, CmdFlags.FUA | CmdFlags.PAYLOAD_LEN, 4096, 64 * KiB],
      [Cmd.FLUSH, 0, 0, 0],
      [Cmd.READ, 0, 4096, 64 * KiB],
    ]);
    // One connection the whole time: the server hangs up on anything but extended requests.
    expect(s.connections).toHaveLength(1);
  });

  it("READ and WRITE are still cut at the server's maximum block size", async () => {
    const s = await scripted({ blockSizes: [512, 4096, 64 * KiB] });
    const dev = await open(s.uri);
    const data = pattern(2, 256 * KiB);
    await submitAndWait(dev, writeBio(0, data));
    expect((await read(dev, 0, 256 * KiB)).equals(data)).toBe(true);
    const pieces = [0, 1, 2, 3].map((i) => i * 64 * KiB);
    expect(seen(s)).toEqual([
      ...pieces.map((at) => [Cmd.WRITE, CmdFlags.PAYLOAD_LEN, at, 64 * KiB]),
      ...pieces.map((at) => [Cmd.READ, 0, at, 64 * KiB]),
    ]);
  });

  it("TRIM and WRITE_ZEROES past 4 GiB go as one request each (64-bit effect lengths)", async () => {
    const s = await scripted({ statedSize: 8 * GiB, size: MiB });
    s.onRequest = (r, c) => {
      if (r.type !== Cmd.TRIM && r.type !== Cmd.WRITE_ZEROES) return "default";
      c.ok(r.handle); // past the RAM store: answered here
      return "handled";
    };
    const dev = await open(s.uri);
    expect(dev.sizeSectors).toBe((8 * GiB) / 512);
    await submitAndWait(dev, discardBio(2048, (6 * GiB) / 512));
    await submitAndWait(dev, writeZeroesBio(0, (5 * GiB) / 512, BioFlags.NOUNMAP | BioFlags.FUA));
    expect(seen(s)).toEqual([
      [Cmd.TRIM, 0, MiB, 6 * GiB],
      [Cmd.WRITE_ZEROES, CmdFlags.NO_HOLE | CmdFlags.FUA, 0, 5 * GiB],
    ]);
  });

  it("a server that refuses a long TRIM with EOVERFLOW gets it again cut at 1 GiB, and later ones cut at once", async () => {
    const s = await scripted({ statedSize: 8 * GiB, size: MiB });
    s.onRequest = (r, c) => {
      if (r.type !== Cmd.TRIM) return "default";
      if (r.length > GiB) c.error(r.handle, NbdErrno.EOVERFLOW, "too long");
      else c.ok(r.handle);
      return "handled";
    };
    const dev = await open(s.uri);
    expect(await status(dev, discardBio(0, (3 * GiB) / 512))).toBe("ok");
    expect(await status(dev, discardBio(0, (2 * GiB) / 512))).toBe("ok");
    expect(seen(s)).toEqual([
      [Cmd.TRIM, 0, 0, 3 * GiB],
      [Cmd.TRIM, 0, 0, GiB],
      [Cmd.TRIM, 0, GiB, GiB],
      [Cmd.TRIM, 0, 2 * GiB, GiB],
      [Cmd.TRIM, 0, 0, GiB],
      [Cmd.TRIM, 0, GiB, GiB],
    ]);
    expect(logger.records.filter((r) => r.msg.includes("cutting them at 1 GiB"))).toHaveLength(1);
  });

  it("holes, data chunks in pieces and error chunks in extended replies", async () => {
    const s = await scripted();
    s.disk.fill(3, 0, 8192);
    let n = 0;
    s.onRequest = (r, c) => {
      if (r.type === Cmd.WRITE && n++ === 0) {
        c.error(r.handle, NbdErrno.ENOSPC, "full");
        return "handled";
      }
      if (r.type !== Cmd.READ) return "default";
      // 4 KiB of data (not DONE), then a 4 KiB hole (DONE).
      const at = Buffer.alloc(8);
      at.writeBigUInt64BE(BigInt(r.offset));
      const hole = Buffer.alloc(12);
      hole.writeBigUInt64BE(BigInt(r.offset + 4096));
      hole.writeUInt32BE(4096, 8);
      c.write(
        Buffer.concat([
          extendedChunk(0, ReplyType.OFFSET_DATA, r.handle, r.offset, 8 + 4096),
          at,
          s.read(r.offset, 4096),
          extendedChunk(ReplyFlags.DONE, ReplyType.OFFSET_HOLE, r.handle, r.offset, 12),
          hole,
        ]),
      );
      return "handled";
    };
    const dev = await open(s.uri);
    expect(await status(dev, writeBio(0, Buffer.alloc(512)))).toBe("ENOSPC");
    expect((await read(dev, 0, 8192)).equals(Buffer.concat([Buffer.alloc(4096, 3), Buffer.alloc(4096)]))).toBe(true);
    expect(s.connections).toHaveLength(1);
  });

  const garbage: [string, (h: bigint, offset: number) => Buffer][] = [
    ["a simple reply", (h) => simpleOk(h)],
    ["a structured (compact) chunk", (h) => chunkHeader(ReplyFlags.DONE, ReplyType.NONE, h, 0)],
    [
      "a chunk naming another offset",
      (h, offset) => extendedChunk(ReplyFlags.DONE, ReplyType.NONE, h, offset + 512, 0),
    ],
    ["a chunk longer than 4 GiB", (h, offset) => extendedChunk(ReplyFlags.DONE, ReplyType.ERROR, h, offset, 2 ** 33)],
  ];
  for (const [what, bytes] of garbage) {
    it(`${what}: the connection is dropped and the write goes again on a new one`, async () => {
      const s = await scripted();
      let sent = false;
      s.onRequest = (r, c) => {
        if (r.type !== Cmd.WRITE || sent) return "default";
        sent = true;
        c.write(bytes(r.handle, r.offset));
        return "handled";
      };
      const dev = await open(s.uri);
      await submitAndWait(dev, writeBio(8, pattern(4, 4096)));
      expect(s.read(4096, 4096).equals(pattern(4, 4096))).toBe(true);
      expect(s.connections).toHaveLength(2);
      expect(s.connections[1]!.extended).toBe(true);
      expect(logger.records.some((r) => r.msg === "nbd: connection lost")).toBe(true);
    });
  }

  it("after a restart the unflushed writes go again over extended headers", async () => {
    const s = await scripted();
    const dev = await open(s.uri);
    await submitAndWait(dev, writeBio(0, pattern(5, 32 * KiB)));
    await s.stop(); // the server's cache, and the write with it, is gone
    await s.restart();
    await submitAndWait(dev, flushBio());
    expect(s.read(0, 32 * KiB).equals(pattern(5, 32 * KiB))).toBe(true);
    expect(s.connections.at(-1)!.extended).toBe(true);
    expect(dev.connectionState()).toMatchObject({ state: "connected", replies: "extended", reconnects: 1 });
  });
});

describe("servers without them", () => {
  it("a server that refuses the option: structured replies and compact headers; long TRIMs cut at 1 GiB", async () => {
    const s = await scripted({ extended: false, statedSize: 8 * GiB, size: MiB });
    s.onRequest = (r, c) => {
      if (r.type !== Cmd.TRIM) return "default";
      c.ok(r.handle);
      return "handled";
    };
    const dev = await open(s.uri);
    expect(s.connections[0]!.extended).toBe(false);
    expect(s.connections[0]!.structured).toBe(true);
    expect(dev.connectionState().replies).toBe("structured");
    await submitAndWait(dev, discardBio(0, (5 * GiB) / 512 / 2));
    expect(seen(s)).toEqual([
      [Cmd.TRIM, 0, 0, GiB],
      [Cmd.TRIM, 0, GiB, GiB],
      [Cmd.TRIM, 0, 2 * GiB, GiB / 2],
    ]);
    const data = pattern(6, 8192);
    await submitAndWait(dev, writeBio(0, data));
    expect((await read(dev, 0, 8192)).equals(data)).toBe(true);
  });

  const missing = missingTools("extended headers against nbdkit", ["nbdkit"]);
  it.skipIf(missing.length > 0)("nbdkit 1.32 (no extended headers): structured replies, I/O works", async () => {
    const nbdkit = await startNbdkit(dir, "mem", ["memory", "8M"]);
    const dev = await open(nbdkit.uri());
    expect(dev.connectionState().replies).toBe("structured");
    const data = pattern(7, 64 * KiB);
    await submitAndWait(dev, writeBio(0, data));
    expect((await read(dev, 0, 64 * KiB)).equals(data)).toBe(true);
  });
});

/** A simple reply saying success. */
function simpleOk(handle: bigint): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(0x67446698, 0);
  b.writeBigUInt64BE(handle, 8);
  return b;
}
