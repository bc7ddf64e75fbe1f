/**
 * The NBD client's parts on their own: URIs (uri.md and libnbd's keys), the wire constants (the
 * same values as the server's), the reply reader fed byte streams cut at every boundary and
 * garbage, the map of unflushed writes, and PSK files.
 */
import path from "node:path";
import { describe, expect, it } from "vitest";
import {
  type ReplyHandler,
  NbdReplyError,
  ReplyReader,
  type ReplyTarget,
} from "../../core/devices/nbd/reply-reader.js";
import { findPskKey } from "../../core/devices/nbd/tls.js";
import { UnflushedWrites } from "../../core/devices/nbd/unflushed-writes.js";
import { isNbdUri, nbdUriKey, parseNbdUri } from "../../core/devices/nbd/uri.js";
import * as wire from "../../core/devices/nbd/wire.js";
import * as protocol from "../../nbd/protocol.js";
import { simpleReply, structuredError, structuredNone, writeOffsetDataHeader } from "../../nbd/serializer.js";
import { chunkHeader } from "../support/scripted-nbd-server.js";

describe("NBD URIs", () => {
  it("parses the four schemes, export names, ports, users and query keys", () => {
    expect(parseNbdUri("nbd+unix:///vol?socket=/run/udm/nbd.sock")).toMatchObject({
      tls: false,
      transport: { kind: "unix", path: "/run/udm/nbd.sock" },
      exportName: "vol",
    });
    expect(parseNbdUri("nbd://example.com")).toMatchObject({
      transport: { kind: "tcp", host: "example.com", port: 10809 },
      exportName: "",
    });
    // uri.md, "NBD URI export name": everything after the first "/", percent-decoded.
    expect(parseNbdUri("nbd://example.com/").exportName).toBe("");
    expect(parseNbdUri("nbd://example.com//disk").exportName).toBe("/disk");
    expect(parseNbdUri("nbd://example.com/hello%20world").exportName).toBe("hello world");
    expect(parseNbdUri("nbd://[::1]:10810/x").transport).toEqual({ kind: "tcp", host: "::1", port: 10810 });
    expect(parseNbdUri("nbd://h/x?x-udm-replay-mib=0").replayBytes).toBe(0);
    expect(parseNbdUri("nbd://h/x?x-udm-replay-mib=8").replayBytes).toBe(8 * 1024 * 1024);
    expect(parseNbdUri("nbds://alice@h:1/x?tls-psk-file=/k&x-udm-timeout=2.5&x-udm-connections=2")).toMatchObject({
      tls: true,
      user: "alice",
      tlsPskFile: "/k",
      timeoutMs: 2500,
      connections: 2,
    });
    expect(parseNbdUri("nbds+unix://bob@/?socket=s&tls-certificates=/c&tls-verify-peer=0")).toMatchObject({
      tls: true,
      user: "bob",
      transport: { kind: "unix", path: "s" },
      tlsCertificates: "/c",
      tlsVerifyPeer: false,
    });
    expect(parseNbdUri("nbd+unix:///?socket=%00abstract").transport).toEqual({ kind: "unix", path: "\0abstract" });
    expect(isNbdUri("nbd://h/x")).toBe(true);
    expect(isNbdUri("/dev/loop0")).toBe(false);
    expect(isNbdUri("nbd-data.img")).toBe(false);
  });

  const refused: [string, RegExp][] = [
    ["nbd+vsock:///", /unsupported scheme nbd\+vsock/],
    ["nbd+unix:///x", /need socket=PATH/],
    ["nbd+unix://host/x?socket=/s", /take no host or port/],
    ["nbd://h/x?socket=/s", /socket= is for the nbd\+unix: scheme/],
    ["nbd:///x", /no host/],
    ["nbd://h:0/x", /bad port/],
    ["nbd://h:99999/x", /bad port/],
    ["nbd://h/x?sokcet=/s", /unknown query parameter "sokcet"/],
    ["nbd://h/x?tls-psk-file=/k", /needs TLS: use the nbds: scheme/],
    ["nbds://h/x?tls-psk-file=/k&tls-certificates=/c", /not both/],
    ["nbds://h/x?tls-verify-peer=yes", /takes 0 or 1/],
    ["nbds://h/x?tls-type=anon", /not supported/],
    ["nbd://h/x?x-udm-timeout=-1", /positive number/],
    ["nbd://h/x?x-udm-connections=100", /up to 16/],
    ["nbd://h/x?x-udm-replay-mib=-1", /takes 0 to 4096/],
    ["nbd://h/%zz", /bad percent-encoding/],
    ["nbd://h/a%00b", /contains NUL/],
    ["nbd://h/x?socket=a&socket=b", /given twice/],
  ];
  for (const [uri, why] of refused) {
    it(`refuses ${uri}`, () => {
      expect(() => parseNbdUri(uri)).toThrow(why);
      expect(() => parseNbdUri(uri)).toThrow(expect.objectContaining({ code: "EINVAL" }));
    });
  }

  it("one key for every spelling of one export, another for another export", () => {
    const key = (u: string) => nbdUriKey(parseNbdUri(u));
    // A relative socket path resolves against the working directory, wherever the checkout is.
    const relative = path.relative(process.cwd(), "/tmp/s");
    expect(key("nbd+unix:///v?socket=/tmp/s")).toBe(key(`NBD+UNIX:///v?socket=${relative}`));
    expect(key("nbd+unix:///v?socket=/tmp/s")).toBe(key("nbd+unix:///v?socket=/tmp/../tmp/./s"));
    expect(key("nbd://Host/v")).toBe(key("nbd://host:10809/v"));
    expect(key("nbd://h/v")).not.toBe(key("nbd://h/w"));
    expect(key("nbd://h/v")).not.toBe(key("nbds://h/v"));
    expect(key("nbd://h/v")).not.toBe(key("nbd://h/v?x-udm-timeout=5"));
  });
});

describe("wire constants", () => {
  it("request headers carry 53-bit cookies and offsets exactly", () => {
    const h = wire.requestHeader(wire.Cmd.WRITE, wire.CmdFlags.FUA, 2 ** 40 + 5, 2 ** 45 + 512, 4096);
    expect(h.readUInt32BE(0)).toBe(protocol.REQUEST_MAGIC);
    expect(h.readUInt16BE(4)).toBe(1);
    expect(h.readUInt16BE(6)).toBe(1);
    expect(h.readBigUInt64BE(8)).toBe(2n ** 40n + 5n);
    expect(h.readBigUInt64BE(16)).toBe(2n ** 45n + 512n);
    expect(h.readUInt32BE(24)).toBe(4096);
    expect(wire.readCookie(h, 8)).toBe(2 ** 40 + 5);
  });
});

/** A reply reader over a set of requests, recording what it reports. */
function reader(targets: Record<number, ReplyTarget>, structured = true) {
  const replies: { cookie: number; errno: number; message: string | null }[] = [];
  const handler: ReplyHandler = {
    target: (cookie) => targets[cookie],
    replied: (cookie, errno, message) => {
      replies.push({ cookie, errno, message });
      delete targets[cookie];
    },
  };
  return { r: new ReplyReader(handler, structured), replies };
}

function dataChunk(handle: bigint, offset: number, data: Buffer, done: boolean): Buffer {
  const b = Buffer.alloc(28 + data.length);
  writeOffsetDataHeader(b, handle, offset, data.length);
  if (!done) b.writeUInt16BE(0, 4);
  data.copy(b, 28);
  return b;
}

function holeChunk(handle: bigint, offset: number, length: number, done: boolean): Buffer {
  const payload = Buffer.alloc(12);
  payload.writeBigUInt64BE(BigInt(offset));
  payload.writeUInt32BE(length, 8);
  return Buffer.concat([chunkHeader(done ? 1 : 0, 2, handle, 12), payload]);
}

describe("the reply reader", () => {
  const read = (offset: number, length: number): ReplyTarget => ({
    cmd: wire.Cmd.READ,
    offset,
    length,
    buffer: Buffer.alloc(length, 0xee),
  });
  const write = (): ReplyTarget => ({ cmd: wire.Cmd.WRITE, offset: 0, length: 512, buffer: null });

  it("takes a stream of mixed replies cut at every byte boundary", () => {
    const a = Buffer.alloc(3000, 0xa1);
    const stream = Buffer.concat([
      simpleReply(1n, 0),
      // READ 2: two data chunks out of order and a hole in between, then NONE with DONE.
      dataChunk(2n, 10_000 + 2000, a.subarray(0, 1000), false),
      dataChunk(3n, 50_000, a.subarray(0, 512), true),
      holeChunk(2n, 10_000 + 1000, 1000, false),
      dataChunk(2n, 10_000, a.subarray(0, 1000), false),
      structuredNone(2n),
      structuredError(4n, 28, "no space"),
      // READ 5: data, then an error: the read fails with the first error.
      dataChunk(5n, 0, a.subarray(0, 256), false),
      Buffer.concat([chunkHeader(1, 0x8001, 5n, 6 + 3), Buffer.from([0, 0, 0, 5, 0, 3]), Buffer.from("bad")]),
    ]);
    for (let cut = 1; cut < stream.length; cut += 7) {
      const targets = { 1: write(), 2: read(10_000, 3000), 3: read(50_000, 512), 4: write(), 5: read(0, 512) };
      const t2 = targets[2];
      const { r, replies } = reader(targets);
      r.received(stream.subarray(0, cut));
      r.received(stream.subarray(cut));
      expect(replies).toEqual([
        { cookie: 1, errno: 0, message: null },
        { cookie: 3, errno: 0, message: null },
        { cookie: 2, errno: 0, message: null },
        { cookie: 4, errno: 28, message: "no space" },
        { cookie: 5, errno: 5, message: "bad" },
      ]);
      const expected = Buffer.concat([a.subarray(0, 1000), Buffer.alloc(1000), a.subarray(0, 1000)]);
      expect(t2.buffer!.equals(expected)).toBe(true);
    }
  });

  it("lets the kernel read a READ's data in place (directSpace), then reads only a header after it", () => {
    const t = read(0, 128 * 1024);
    const { r, replies } = reader({ 7: t });
    const header = Buffer.alloc(28);
    writeOffsetDataHeader(header, 7n, 0, t.length);
    r.received(header);
    const space = r.directSpace()!;
    expect(space.buffer).toBe(t.buffer!.buffer);
    space.fill(0x42, 0, 1000);
    r.received(space.subarray(0, 1000)); // what the socket's onread callback hands back
    const rest = r.directSpace()!;
    expect(rest.length).toBe(t.length - 1000);
    rest.fill(0x42);
    r.received(rest);
    expect(replies).toEqual([{ cookie: 7, errno: 0, message: null }]);
    expect(t.buffer!.every((b) => b === 0x42)).toBe(true);
    expect(r.headerBytes()).toBe(28);
  });

  it("a read whose chunks miss part of it, or cover a part twice, is EIO (the stream is fine)", () => {
    const { r, replies } = reader({ 1: read(0, 1024), 2: read(0, 1024) });
    r.received(dataChunk(1n, 0, Buffer.alloc(512), true));
    r.received(dataChunk(2n, 0, Buffer.alloc(512), false));
    r.received(dataChunk(2n, 0, Buffer.alloc(512), true));
    expect(replies.map((x) => x.errno)).toEqual([5, 5]);
  });

  const garbage: [string, Buffer, boolean?][] = [
    ["a bad magic", Buffer.from("HTTP/1.1 200 OK\r\n")],
    ["an unknown cookie", simpleReply(99n, 0)],
    ["a structured reply without negotiation", structuredNone(1n), false],
    ["OFFSET_DATA for a write", dataChunk(2n, 0, Buffer.alloc(512), true)],
    ["OFFSET_DATA past the read", dataChunk(1n, 512, Buffer.alloc(1024), true)],
    ["OFFSET_DATA longer than the read", chunkHeader(1, 1, 1n, 8 + 4096)],
    ["a hole outside the read", holeChunk(1n, 4096, 512, true)],
    ["NONE with a payload", chunkHeader(1, 0, 2n, 4)],
    ["NONE without DONE", chunkHeader(0, 0, 2n, 0)],
    ["a 1 MB error chunk", chunkHeader(1, 0x8001, 2n, 1 << 20)],
    [
      "an error message longer than its chunk",
      Buffer.concat([chunkHeader(1, 0x8001, 2n, 6), Buffer.from([0, 0, 0, 5, 0, 9])]),
    ],
    ["a BLOCK_STATUS chunk", chunkHeader(1, 5, 1n, 12)],
    ["a chunk type from the future", chunkHeader(1, 77, 1n, 0)],
    ["a simple reply with data to a READ after structured replies", simpleReply(1n, 0)],
  ];
  for (const [what, bytes, structured] of garbage) {
    it(`throws on ${what}`, () => {
      const { r } = reader({ 1: read(0, 1024), 2: write() }, structured ?? true);
      expect(() => r.received(bytes)).toThrow(NbdReplyError);
    });
  }

  it("simple replies without structured replies: the READ data follows the header", () => {
    const t = read(4096, 1024);
    const { r, replies } = reader({ 1: t, 2: read(0, 512) }, false);
    r.received(Buffer.concat([simpleReply(1n, 0), Buffer.alloc(1024, 9), simpleReply(2n, 5)]));
    expect(replies).toEqual([
      { cookie: 1, errno: 0, message: null },
      { cookie: 2, errno: 5, message: null },
    ]);
    expect(t.buffer!.every((b) => b === 9)).toBe(true);
  });
});

describe("unflushed writes", () => {
  const at = (u: UnflushedWrites) =>
    u.pending().map((e) => [e.start, e.end, e.data ? e.data[0] : null] as [number, number, number | null]);

  it("a later write replaces what it overlaps; a FUA write or a trim removes its range", () => {
    const u = new UnflushedWrites(1 << 20);
    u.written(0, Buffer.alloc(4096, 1));
    u.written(1024, Buffer.alloc(1024, 2));
    u.zeroed(3072, 2048);
    expect(at(u)).toEqual([
      [0, 1024, 1],
      [1024, 2048, 2],
      [2048, 3072, 1],
      [3072, 5120, null],
    ]);
    u.forget(512, 1024);
    expect(at(u)).toEqual([
      [0, 512, 1],
      [1536, 2048, 2],
      [2048, 3072, 1],
      [3072, 5120, null],
    ]);
    expect(u.bytes).toBe(512 + 512 + 1024);
  });

  it("keeps a copy: the submitter may reuse its buffer", () => {
    const u = new UnflushedWrites(1 << 20);
    const buf = Buffer.alloc(512, 7);
    u.written(0, buf);
    buf.fill(0);
    expect(u.pending()[0]!.data!.every((b) => b === 7)).toBe(true);
  });

  it("a flush drops what was acknowledged before it was sent, not what came after", () => {
    const u = new UnflushedWrites(1 << 20);
    u.written(0, Buffer.alloc(512, 1));
    const mark = u.mark;
    u.written(4096, Buffer.alloc(512, 2));
    u.flushed(mark);
    expect(at(u)).toEqual([[4096, 4608, 2]]);
  });

  it("past the limit it records nothing until a flush covers what it missed", () => {
    const u = new UnflushedWrites(1024);
    u.written(0, Buffer.alloc(512, 1));
    u.written(512, Buffer.alloc(1024, 2)); // over the limit: everything is dropped
    expect(u.incomplete).toBe(true);
    expect(u.count).toBe(0);
    const early = u.mark;
    u.written(8192, Buffer.alloc(512, 3)); // still missed
    u.flushed(early);
    expect(u.incomplete).toBe(true); // the last missed write came after that flush was sent
    u.flushed(u.mark);
    expect(u.incomplete).toBe(false);
    u.written(0, Buffer.alloc(512, 4));
    expect(at(u)).toEqual([[0, 512, 4]]);
  });
});

describe("PSK files", () => {
  it("finds the identity's key; errors name the file and line, never a key", () => {
    const text = "bob:00ff\nalice:0a0b0c\n";
    expect(findPskKey(text, "alice", "k.psk")).toEqual(Buffer.from([10, 11, 12]));
    expect(() => findPskKey(text, "carol", "k.psk")).toThrow(/k.psk: no key for the PSK identity "carol"/);
    expect(() => findPskKey("alice:abc\n", "alice", "k.psk")).toThrow(/k.psk:1: the key is not an even number/);
    expect(() => findPskKey("nonsense\n", "alice", "k.psk")).toThrow(/k.psk:1: expected identity:hexkey/);
  });
});
