/**
 * How the NBD client's requests leave: a turn's requests in as few buffers as possible
 * (core/devices/nbd/request-batch.ts), checked against a model (each request's header, then its
 * payload, one after another), and the connection writing a turn's batch in one socket write,
 * in order, with large payloads sent from the caller's memory.
 */
import { EventEmitter } from "node:events";
import type net from "node:net";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { type NbdRequest, NbdConnection, type ConnectionEvents } from "../../core/devices/nbd/connection.js";
import type { ExportInfo } from "../../core/devices/nbd/handshake.js";
import { COPY_LIMIT, RequestBatch } from "../../core/devices/nbd/request-batch.js";
import { SocketInput } from "../../core/devices/nbd/socket-input.js";
import * as wire from "../../core/devices/nbd/wire.js";

interface Spec {
  cmd: number;
  flags: number;
  cookie: number;
  offset: number;
  length: number;
  payload: Buffer | null;
}

/** The model: every request's header, then its payload. */
function model(specs: Spec[], extended: boolean): Buffer {
  const header = extended ? wire.extendedRequestHeader : wire.requestHeader;
  return Buffer.concat(
    specs.flatMap((s) => [header(s.cmd, s.flags, s.cookie, s.offset, s.length), ...(s.payload ? [s.payload] : [])]),
  );
}

const specArb: fc.Arbitrary<Spec> = fc
  .record({
    write: fc.boolean(),
    flags: fc.integer({ min: 0, max: 3 }),
    cookie: fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }),
    offset: fc.integer({ min: 0, max: 2 ** 50 }),
    // Around the copy limit, and well past it.
    size: fc.oneof(
      fc.integer({ min: 1, max: 600 }),
      fc.integer({ min: COPY_LIMIT - 2, max: COPY_LIMIT + 2 }),
      fc.constant(100_000),
    ),
    fill: fc.integer({ min: 0, max: 255 }),
  })
  .map(({ write, flags, cookie, offset, size, fill }) => ({
    cmd: write ? wire.Cmd.WRITE : wire.Cmd.READ,
    flags,
    cookie,
    offset,
    length: size,
    payload: write ? Buffer.alloc(size, fill) : null,
  }));

describe("the request batch against a model", () => {
  it("hands out exactly the requests' headers and payloads, in order, over any turns and arena sizes", () => {
    fc.assert(
      fc.property(
        fc.array(fc.array(specArb, { maxLength: 8 }), { minLength: 1, maxLength: 5 }),
        fc.boolean(),
        fc.integer({ min: 64, max: 4096 }),
        (turns, extended, arenaBytes) => {
          const batch = new RequestBatch(extended, arenaBytes);
          const taken: { segments: Buffer[]; copies: Buffer[] }[] = [];
          for (const turn of turns) {
            for (const s of turn) batch.add(s.cmd, s.flags, s.cookie, s.offset, s.length, s.payload);
            expect(batch.empty).toBe(turn.length === 0);
            const segments = batch.take();
            expect(batch.empty).toBe(true);
            taken.push({ segments, copies: segments.map((b) => Buffer.from(b)) });
            // Buffer.equals: vitest's toEqual walks big buffers byte by byte, slowly.
            expect(Buffer.concat(segments).equals(model(turn, extended))).toBe(true);
            // Payloads past the copy limit are their own segment: the caller's memory, not a copy.
            for (const s of turn) {
              if (s.payload && s.payload.length > COPY_LIMIT) expect(segments.includes(s.payload)).toBe(true);
            }
          }
          // What was handed out is never written again (the socket may still be sending it).
          for (const t of taken) expect(t.segments.every((b, i) => b.equals(t.copies[i]!))).toBe(true);
        },
      ),
      { numRuns: 200 },
    );
  });

  it("puts sixteen reads in one buffer", () => {
    const batch = new RequestBatch(false);
    for (let i = 0; i < 16; i++) batch.add(wire.Cmd.READ, 0, i + 1, i * 4096, 4096, null);
    const segments = batch.take();
    expect(segments).toHaveLength(1);
    expect(segments[0]!.length).toBe(16 * wire.REQUEST_HEADER_LENGTH);
    expect(wire.readCookie(segments[0]!, 15 * wire.REQUEST_HEADER_LENGTH + 8)).toBe(16);
  });
});

/** A socket that records what is written to it, and how. */
class RecordingSocket extends EventEmitter {
  destroyed = false;
  writes: Buffer[] = [];
  corked = 0;
  cork(): void {
    this.corked++;
  }
  uncork(): void {
    this.corked--;
  }
  write(b: Buffer): boolean {
    this.writes.push(b);
    return true;
  }
  end(): void {
    this.destroyed = true;
  }
  destroy(): void {
    this.destroyed = true;
    this.emit("close");
  }
}

const INFO: ExportInfo = {
  size: 1 << 30,
  flags: 0,
  minBlock: 512,
  preferredBlock: 4096,
  maxPayload: 32 << 20,
  structured: true,
  extended: false,
};

function request(cmd: number, offset: number, length: number, payload: Buffer | null = null): NbdRequest {
  return {
    cmd,
    flags: 0,
    offset,
    length,
    buffer: cmd === wire.Cmd.READ ? Buffer.alloc(length) : null,
    payload,
    conn: null,
    sentAt: 0,
  };
}

function connection() {
  const socket = new RecordingSocket();
  const events: ConnectionEvents = { replied: () => undefined, closed: () => undefined };
  const conn = new NbdConnection(socket as unknown as net.Socket, new SocketInput(), INFO, events);
  return { socket, conn };
}

/** The requests in `bytes`: [command, cookie, offset, length] of each header, payloads skipped. */
function parse(bytes: Buffer): number[][] {
  const out: number[][] = [];
  for (let at = 0; at < bytes.length;) {
    expect(bytes.readUInt32BE(at)).toBe(wire.REQUEST_MAGIC);
    const cmd = bytes.readUInt16BE(at + 6);
    const length = bytes.readUInt32BE(at + 24);
    out.push([cmd, wire.readCookie(bytes, at + 8), wire.readCookie(bytes, at + 16), length]);
    at += wire.REQUEST_HEADER_LENGTH + (cmd === wire.Cmd.WRITE ? length : 0);
  }
  return out;
}

const tick = () => new Promise<void>((resolve) => process.nextTick(resolve));

describe("a connection's writes", () => {
  it("sends a turn's requests in one socket write, after the turn", async () => {
    const { socket, conn } = connection();
    for (let i = 0; i < 16; i++) conn.send(request(wire.Cmd.READ, i * 4096, 4096), 0);
    conn.send(request(wire.Cmd.WRITE, 1 << 20, 4096, Buffer.alloc(4096, 7)), 0);
    expect(socket.writes).toHaveLength(0);
    await tick();
    expect(socket.writes).toHaveLength(1);
    const sent = parse(socket.writes[0]!);
    expect(sent.map((r) => r[1])).toEqual(Array.from({ length: 17 }, (_, i) => i + 1));
    expect(sent[16]).toEqual([wire.Cmd.WRITE, 17, 1 << 20, 4096]);
    expect(conn.inFlightCount).toBe(17);
    // The next turn's requests are a write of their own.
    conn.send(request(wire.Cmd.READ, 0, 512), 0);
    await tick();
    expect(socket.writes).toHaveLength(2);
    expect(parse(socket.writes[1]!)).toEqual([[wire.Cmd.READ, 18, 0, 512]]);
  });

  it("sends a large WRITE's payload from the caller's buffer, corked with the headers around it", async () => {
    const { socket, conn } = connection();
    const payload = Buffer.alloc(1 << 20, 3);
    conn.send(request(wire.Cmd.READ, 0, 4096), 0);
    conn.send(request(wire.Cmd.WRITE, 8192, payload.length, payload), 0);
    conn.send(request(wire.Cmd.FLUSH, 0, 0), 0);
    await tick();
    expect(socket.corked).toBe(0);
    expect(socket.writes).toHaveLength(3);
    expect(socket.writes[1]).toBe(payload);
    expect(parse(Buffer.concat(socket.writes)).map((r) => r[0])).toEqual([
      wire.Cmd.READ,
      wire.Cmd.WRITE,
      wire.Cmd.FLUSH,
    ]);
  });

  it("sends NBD_CMD_DISC after the requests of the same turn", () => {
    const { socket, conn } = connection();
    conn.send(request(wire.Cmd.READ, 0, 4096), 0);
    conn.disconnect();
    conn.destroy(new Error("test over"));
    expect(parse(Buffer.concat(socket.writes)).map((r) => r[0])).toEqual([wire.Cmd.READ, wire.Cmd.DISC]);
  });
});
