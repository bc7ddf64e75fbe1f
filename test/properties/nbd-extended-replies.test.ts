/**
 * Property: with extended headers, the NBD client's reply reader assembles any READ reply a server
 * may send (the read cut into data and hole chunks, sent in any order, the stream cut into any
 * pieces, other requests' replies interleaved) into exactly what a simple model says: the data
 * where data chunks were, zeros where holes were, success, and the other requests answered with
 * their own status.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { type ReplyHandler, ReplyReader, type ReplyTarget } from "../../core/devices/nbd/reply-reader.js";
import { Cmd, ReplyFlags, ReplyType } from "../../nbd/protocol.js";
import { extendedChunk } from "../support/scripted-nbd-server.js";

const READ_COOKIE = 1;
const WRITE_COOKIE = 2;

interface Piece {
  /** Bytes in the read (relative). */
  from: number;
  to: number;
  hole: boolean;
}

/** The read's chunks: consecutive pieces of [0, length), each data or a hole. */
const piecesArb = fc
  .record({
    cuts: fc.uniqueArray(fc.integer({ min: 1, max: 8191 }), { maxLength: 6 }),
    holes: fc.array(fc.boolean(), { minLength: 7, maxLength: 7 }),
  })
  .map(({ cuts, holes }) => {
    const edges = [0, ...cuts.sort((a, b) => a - b), 8192];
    return edges.slice(1).map((to, i): Piece => ({ from: edges[i]!, to, hole: holes[i]! }));
  });

function chunk(offset: number, p: Piece, done: boolean, data: Buffer): Buffer {
  const flags = done ? ReplyFlags.DONE : 0;
  const at = Buffer.alloc(8);
  at.writeBigUInt64BE(BigInt(offset + p.from));
  if (p.hole) {
    const size = Buffer.alloc(4);
    size.writeUInt32BE(p.to - p.from);
    return Buffer.concat([extendedChunk(flags, ReplyType.OFFSET_HOLE, 1n, offset, 12), at, size]);
  }
  const bytes = data.subarray(p.from, p.to);
  return Buffer.concat([extendedChunk(flags, ReplyType.OFFSET_DATA, 1n, offset, 8 + bytes.length), at, bytes]);
}

describe("the extended reply reader against a model", () => {
  it("assembles any split, order and interleaving of a READ's chunks", () => {
    fc.assert(
      fc.property(
        piecesArb,
        fc.integer({ min: 0, max: 2 ** 40 }),
        fc.func(fc.integer()),
        fc.uniqueArray(fc.integer({ min: 1, max: 400 }), { maxLength: 8 }),
        fc.nat(),
        (pieces, offset, orderBy, splits, writeAt) => {
          const data = Buffer.from(Array.from({ length: 8192 }, (_, i) => (i * 7 + 1) & 0xff));
          const order = [...pieces].sort((a, b) => orderBy(a.from) - orderBy(b.from) || a.from - b.from);
          const readChunks = order.map((p, i) => chunk(offset, p, i === order.length - 1, data));
          // The WRITE's reply goes somewhere among the READ's chunks.
          const writeReply = extendedChunk(ReplyFlags.DONE, ReplyType.NONE, BigInt(WRITE_COOKIE), 512, 0);
          readChunks.splice(writeAt % (readChunks.length + 1), 0, writeReply);
          const stream = Buffer.concat(readChunks);

          const targets: Record<number, ReplyTarget> = {
            [READ_COOKIE]: { cmd: Cmd.READ, offset, length: 8192, buffer: Buffer.alloc(8192, 0xee) },
            [WRITE_COOKIE]: { cmd: Cmd.WRITE, offset: 512, length: 512, buffer: null },
          };
          const buffer = targets[READ_COOKIE]!.buffer!;
          const replies: [number, number][] = [];
          const handler: ReplyHandler = {
            target: (c) => targets[c],
            replied: (c, errno) => {
              replies.push([c, errno]);
              delete targets[c];
            },
          };
          const r = new ReplyReader(handler, true, true);
          let at = 0;
          for (const end of [...splits.filter((s) => s < stream.length).sort((a, b) => a - b), stream.length]) {
            r.received(stream.subarray(at, end));
            at = end;
          }

          const expected = Buffer.from(data);
          for (const p of pieces) if (p.hole) expected.fill(0, p.from, p.to);
          expect(buffer.equals(expected)).toBe(true);
          expect(replies.sort()).toEqual([
            [READ_COOKIE, 0],
            [WRITE_COOKIE, 0],
          ]);
        },
      ),
      { numRuns: 300 },
    );
  });
});
