/**
 * The NBD client's extended headers (NBD_OPT_EXTENDED_HEADERS) on their own: the 32-byte request
 * header it sends, and the reply reader fed extended reply streams cut at every boundary, with the
 * direct-read path, and garbage that must end the connection.
 */
import { describe, expect, it } from "vitest";
import {
  type ReplyHandler,
  NbdReplyError,
  ReplyReader,
  type ReplyTarget,
} from "../../core/devices/nbd/reply-reader.js";
import * as wire from "../../core/devices/nbd/wire.js";
import * as protocol from "../../nbd/protocol.js";
import { simpleReply } from "../../nbd/serializer.js";
import { chunkHeader, extendedChunk } from "../support/scripted-nbd-server.js";

const { ReplyFlags, ReplyType } = protocol;

describe("the extended request header", () => {
  it("has 64-bit cookie, offset and length; a WRITE carries NBD_CMD_FLAG_PAYLOAD_LEN", () => {
    const w = wire.extendedRequestHeader(wire.Cmd.WRITE, wire.CmdFlags.FUA, 2 ** 40 + 5, 2 ** 45 + 512, 4096);
    expect(w.length).toBe(32);
    expect(w.readUInt32BE(0)).toBe(0x21e41c71);
    expect(w.readUInt16BE(4)).toBe(protocol.CmdFlags.FUA | protocol.CmdFlags.PAYLOAD_LEN);
    expect(w.readUInt16BE(6)).toBe(protocol.Cmd.WRITE);
    expect(w.readBigUInt64BE(8)).toBe(2n ** 40n + 5n);
    expect(w.readBigUInt64BE(16)).toBe(2n ** 45n + 512n);
    expect(w.readBigUInt64BE(24)).toBe(4096n);
    // Other commands: the length is the effect length, past 32 bits, and no PAYLOAD_LEN.
    const t = wire.extendedRequestHeader(wire.Cmd.TRIM, 0, 7, 0, 6 * 2 ** 30);
    expect(t.readUInt16BE(4)).toBe(0);
    expect(t.readBigUInt64BE(24)).toBe(6n * 2n ** 30n);
  });
});

function reader(targets: Record<number, ReplyTarget>) {
  const replies: { cookie: number; errno: number; message: string | null }[] = [];
  const handler: ReplyHandler = {
    target: (cookie) => targets[cookie],
    replied: (cookie, errno, message) => {
      replies.push({ cookie, errno, message });
      delete targets[cookie];
    },
  };
  return { r: new ReplyReader(handler, true, true), replies };
}

const read = (offset: number, length: number): ReplyTarget => ({
  cmd: wire.Cmd.READ,
  offset,
  length,
  buffer: Buffer.alloc(length, 0xee),
});
const write = (offset: number): ReplyTarget => ({ cmd: wire.Cmd.WRITE, offset, length: 512, buffer: null });

function data(handle: bigint, requestOffset: number, offset: number, bytes: Buffer, done: boolean): Buffer {
  const at = Buffer.alloc(8);
  at.writeBigUInt64BE(BigInt(offset));
  const flags = done ? ReplyFlags.DONE : 0;
  return Buffer.concat([
    extendedChunk(flags, ReplyType.OFFSET_DATA, handle, requestOffset, 8 + bytes.length),
    at,
    bytes,
  ]);
}

function hole(handle: bigint, requestOffset: number, offset: number, length: number, done: boolean): Buffer {
  const p = Buffer.alloc(12);
  p.writeBigUInt64BE(BigInt(offset));
  p.writeUInt32BE(length, 8);
  return Buffer.concat([
    extendedChunk(done ? ReplyFlags.DONE : 0, ReplyType.OFFSET_HOLE, handle, requestOffset, 12),
    p,
  ]);
}

function error(handle: bigint, requestOffset: number, errno: number, message: string): Buffer {
  const text = Buffer.from(message);
  const p = Buffer.alloc(6 + text.length);
  p.writeUInt32BE(errno, 0);
  p.writeUInt16BE(text.length, 4);
  text.copy(p, 6);
  return Buffer.concat([extendedChunk(ReplyFlags.DONE, ReplyType.ERROR, handle, requestOffset, p.length), p]);
}

const none = (handle: bigint, requestOffset: number) =>
  extendedChunk(ReplyFlags.DONE, ReplyType.NONE, handle, requestOffset, 0);

describe("the reply reader with extended headers", () => {
  it("takes a stream of extended replies cut at every byte boundary", () => {
    const a = Buffer.alloc(3000, 0xa1);
    const stream = Buffer.concat([
      none(1n, 4096),
      // READ 2 at 10 000: data out of order, a hole between, then NONE.
      data(2n, 10_000, 12_000, a.subarray(0, 1000), false),
      data(3n, 2 ** 40, 2 ** 40, a.subarray(0, 512), true),
      hole(2n, 10_000, 11_000, 1000, false),
      data(2n, 10_000, 10_000, a.subarray(0, 1000), false),
      none(2n, 10_000),
      error(4n, 0, 28, "no space"),
    ]);
    for (let cut = 1; cut < stream.length; cut += 5) {
      const targets = { 1: write(4096), 2: read(10_000, 3000), 3: read(2 ** 40, 512), 4: write(0) };
      const t2 = targets[2];
      const { r, replies } = reader(targets);
      r.received(stream.subarray(0, cut));
      r.received(stream.subarray(cut));
      expect(replies).toEqual([
        { cookie: 1, errno: 0, message: null },
        { cookie: 3, errno: 0, message: null },
        { cookie: 2, errno: 0, message: null },
        { cookie: 4, errno: 28, message: "no space" },
      ]);
      expect(t2.buffer!.equals(Buffer.concat([a.subarray(0, 1000), Buffer.alloc(1000), a.subarray(0, 1000)]))).toBe(
        true,
      );
    }
  });

  it("lets a READ's data land in place (directSpace), then reads only a header and an offset (40 bytes)", () => {
    const t = read(0, 128 * 1024);
    const { r, replies } = reader({ 7: t });
    r.received(data(7n, 0, 0, Buffer.alloc(t.length), true).subarray(0, 40));
    const space = r.directSpace()!;
    expect(space.buffer).toBe(t.buffer!.buffer);
    expect(space.length).toBe(t.length);
    space.fill(0x42);
    r.received(space);
    expect(replies).toEqual([{ cookie: 7, errno: 0, message: null }]);
    expect(r.headerBytes()).toBe(40);
  });

  const garbage: [string, Buffer][] = [
    ["a simple reply", simpleReply(1n, 0)],
    ["a structured chunk", chunkHeader(ReplyFlags.DONE, ReplyType.NONE, 1n, 0)],
    ["another offset than the request's", none(1n, 512)],
    ["an unknown cookie", none(9n, 0)],
    ["a length past 32 bits", extendedChunk(ReplyFlags.DONE, ReplyType.ERROR, 1n, 0, 2 ** 32)],
    ["BLOCK_STATUS_EXT, never asked for", extendedChunk(ReplyFlags.DONE, 6, 1n, 0, 24)],
  ];
  for (const [what, bytes] of garbage) {
    it(`${what} ends the connection`, () => {
      const { r } = reader({ 1: write(0) });
      expect(() => r.received(bytes)).toThrow(NbdReplyError);
    });
  }
});
