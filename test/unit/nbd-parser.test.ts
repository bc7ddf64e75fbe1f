/**
 * The NBD parsers against byte-exact fixtures. Every fixture is also fed split at every byte
 * boundary (and one byte at a time) to prove nothing assumes one read = one message.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { HandshakeParser, RequestParser } from "../../nbd/parser.js";
import { Cmd, type HandshakeMessage, NbdProtocolError, type NbdRequest, Opt } from "../../nbd/protocol.js";

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ""), "hex");
const IHAVEOPT = "49484156454f5054";

type Parser<M> = { push(b: Buffer): void; next(): M | null };

function drain<M>(p: Parser<M>): M[] {
  const out: M[] = [];
  for (let m = p.next(); m !== null; m = p.next()) out.push(m);
  return out;
}

/** Parse `bytes` in one go, then split at every boundary, then byte by byte: same messages. */
function parseEverySplit<M>(make: () => Parser<M>, bytes: Buffer): M[] {
  const whole = make();
  whole.push(bytes);
  const expected = drain(whole);
  for (let cut = 1; cut < bytes.length; cut++) {
    const p = make();
    p.push(bytes.subarray(0, cut));
    const got = drain(p);
    p.push(bytes.subarray(cut));
    got.push(...drain(p));
    expect(got, `split at byte ${cut}`).toEqual(expected);
  }
  const p = make();
  const got: M[] = [];
  for (let i = 0; i < bytes.length; i++) {
    p.push(bytes.subarray(i, i + 1));
    got.push(...drain(p));
  }
  expect(got, "byte by byte").toEqual(expected);
  return expected;
}

describe("HandshakeParser", () => {
  const handshake = () => new HandshakeParser();

  it("parses client flags, NBD_OPT_STRUCTURED_REPLY and NBD_OPT_GO with info requests", () => {
    const bytes = hex(`
      00000003
      ${IHAVEOPT} 00000008 00000000
      ${IHAVEOPT} 00000007 0000000e  00000004 6469736b 0002 0003 0001
    `);
    expect(parseEverySplit(handshake, bytes)).toEqual<HandshakeMessage[]>([
      { kind: "clientFlags", flags: 3 },
      { kind: "option", option: Opt.STRUCTURED_REPLY, data: Buffer.alloc(0) },
      { kind: "info", option: Opt.GO, name: "disk", requests: [3, 1] },
    ]);
  });

  it("parses NBD_OPT_INFO with an empty name (the default export) and no requests", () => {
    const bytes = hex(`00000001 ${IHAVEOPT} 00000006 00000006 00000000 0000`);
    expect(parseEverySplit(handshake, bytes)[1]).toEqual({ kind: "info", option: Opt.INFO, name: "", requests: [] });
  });

  it("parses NBD_OPT_EXPORT_NAME, whose payload is the name", () => {
    const bytes = hex(`00000001 ${IHAVEOPT} 00000001 00000003 616263`);
    expect(parseEverySplit(handshake, bytes)[1]).toEqual({ kind: "exportName", name: "abc" });
  });

  it("passes other options through raw, payload included", () => {
    const bytes = hex(`00000001 ${IHAVEOPT} 00000003 00000002 abcd`);
    expect(parseEverySplit(handshake, bytes)[1]).toEqual({ kind: "option", option: Opt.LIST, data: hex("abcd") });
  });

  it.each([
    ["a name length that overruns the payload", "0000000a 00000010 6469736b 0000"],
    ["trailing bytes after the info requests", "0000000b 00000002 6162 0001 0003 ff"],
    ["too few bytes for the fixed fields", "00000003 000000"],
    ["a NUL inside the name", "00000008 00000002 6100 0000"],
    ["a name that is not UTF-8", "00000007 00000001 ff 0000"],
  ])("reports %s as an invalid option and stays in sync", (_what, optionBody) => {
    const bytes = hex(`00000001 ${IHAVEOPT} 00000007 ${optionBody} ${IHAVEOPT} 00000002 00000000`);
    const [, bad, next] = parseEverySplit(handshake, bytes);
    expect(bad).toMatchObject({ kind: "invalidOption", option: Opt.GO });
    expect(next).toEqual({ kind: "option", option: Opt.ABORT, data: Buffer.alloc(0) });
  });

  it("skips an option longer than 8 KiB without buffering it, then carries on", () => {
    const length = 9000;
    const bytes = Buffer.concat([
      hex(`00000001 ${IHAVEOPT} 00000007`),
      hex(length.toString(16).padStart(8, "0")),
      Buffer.alloc(length, 0x55),
      hex(`${IHAVEOPT} 00000008 00000000`),
    ]);
    const p = new HandshakeParser();
    p.push(bytes.subarray(0, 20 + 100));
    expect(drain(p)).toEqual([{ kind: "clientFlags", flags: 1 }]);
    expect(p.midMessage).toBe(true);
    p.push(bytes.subarray(120));
    expect(drain(p)).toEqual([
      { kind: "oversizeOption", option: Opt.GO, length },
      { kind: "option", option: Opt.STRUCTURED_REPLY, data: Buffer.alloc(0) },
    ]);
    expect(p.midMessage).toBe(false);
  });

  it("throws NbdProtocolError on a wrong option magic, and keeps throwing", () => {
    const p = new HandshakeParser();
    p.push(hex("00000001 4948415645000000 00000007 00000000"));
    expect(p.next()).toEqual({ kind: "clientFlags", flags: 1 });
    expect(() => p.next()).toThrow(NbdProtocolError);
    expect(() => p.next()).toThrow(/bad option magic 0x4948415645000000/);
  });

  it("hands bytes after the last option to the next phase", () => {
    const p = new HandshakeParser();
    p.push(hex(`00000001 ${IHAVEOPT} 00000007 00000006 00000000 0000 25609513`));
    expect(drain(p)).toHaveLength(2);
    expect(p.takeRemaining()).toEqual(hex("25609513"));
  });
});

describe("RequestParser", () => {
  const requests = () => new RequestParser({ maxPayload: 64 });
  const req = (r: Partial<NbdRequest>): NbdRequest => ({
    kind: "request",
    flags: 0,
    type: Cmd.READ,
    handle: 0n,
    offset: 0,
    length: 0,
    data: null,
    payloadDropped: false,
    ...r,
  });

  it("parses READ, WRITE (with payload), FLUSH and DISC", () => {
    const bytes = hex(`
      25609513 0000 0000 0102030405060708 0000000000001000 00001000
      25609513 0001 0001 1111111111111111 0000000100000200 00000008 deadbeefcafef00d
      25609513 0000 0003 2222222222222222 0000000000000000 00000000
      25609513 0000 0002 3333333333333333 0000000000000000 00000000
    `);
    expect(parseEverySplit(requests, bytes)).toEqual([
      req({ type: Cmd.READ, handle: 0x0102030405060708n, offset: 4096, length: 4096 }),
      req({
        type: Cmd.WRITE,
        flags: 1,
        handle: 0x1111111111111111n,
        offset: 2 ** 32 + 512,
        length: 8,
        data: hex("deadbeefcafef00d"),
      }),
      req({ type: Cmd.FLUSH, handle: 0x2222222222222222n }),
      req({ type: Cmd.DISC, handle: 0x3333333333333333n }),
    ]);
  });

  it("gives a zero-length WRITE an empty payload", () => {
    const bytes = hex("25609513 0000 0001 0000000000000001 0000000000000000 00000000");
    expect(parseEverySplit(requests, bytes)).toEqual([req({ type: Cmd.WRITE, handle: 1n, data: Buffer.alloc(0) })]);
  });

  it("keeps offsets beyond 2^53 past the end of anything (they are only ever rejected)", () => {
    const [r] = parseEverySplit(requests, hex("25609513 0000 0000 0000000000000001 ffffffffffffffff 00000200"));
    expect(r!.offset).toBeGreaterThan(Number.MAX_SAFE_INTEGER);
  });

  it("drops a WRITE payload over the limit as it streams past, then carries on", () => {
    const big = Buffer.alloc(100, 0x77);
    const bytes = Buffer.concat([
      hex("25609513 0000 0001 0000000000000009 0000000000000000 00000064"),
      big,
      hex("25609513 0000 0000 000000000000000a 0000000000000000 00000200"),
    ]);
    expect(parseEverySplit(requests, bytes)).toEqual([
      req({ type: Cmd.WRITE, handle: 9n, length: 100, payloadDropped: true }),
      req({ type: Cmd.READ, handle: 10n, length: 512 }),
    ]);
  });

  it("hands out a view of the input when the whole payload arrived at once", () => {
    const chunk = hex("25609513 0000 0001 0000000000000001 0000000000000000 00000004 01020304");
    const p = new RequestParser();
    p.push(chunk);
    const r = p.next()!;
    expect(r.data!.buffer).toBe(chunk.buffer);
  });

  it("throws NbdProtocolError on a wrong request magic", () => {
    const p = new RequestParser();
    p.push(hex("25609514 0000 0000 0000000000000001 0000000000000000 00000200"));
    expect(() => p.next()).toThrow(/bad request magic 0x25609514/);
    expect(() => p.next()).toThrow(NbdProtocolError);
  });

  it("knows when input stopped mid-message", () => {
    const p = new RequestParser();
    p.push(hex("25609513 0000 0001 0000000000000001 0000000000000000 00000004 0102"));
    expect(p.next()).toBeNull();
    expect(p.midMessage).toBe(true);
  });

  it("offers the unfilled payload for in-place reads, and takes bytes written there without a copy", () => {
    const allocated: Buffer[] = [];
    const p = new RequestParser({ allocPayload: (n) => allocated[allocated.push(Buffer.alloc(n)) - 1]! });
    const payload = Buffer.from(Array.from({ length: 10_000 }, (_, i) => (i * 7) & 0xff));
    const header = hex("25609513 0000 0001 0000000000000007 0000000000000000 00002710");
    expect(p.payloadSpace()).toBeNull(); // nothing pending
    p.push(Buffer.concat([header, payload.subarray(0, 100)]));
    expect(p.next()).toBeNull();
    const space = p.payloadSpace()!;
    expect(space.length).toBe(9_900);
    expect(space.buffer).toBe(allocated[0]!.buffer);
    expect(space.byteOffset).toBe(allocated[0]!.byteOffset + 100);
    // "The socket" reads 5,000 bytes into it.
    payload.copy(space, 0, 100, 5_100);
    p.push(space.subarray(0, 5_000));
    expect(p.next()).toBeNull();
    const rest = p.payloadSpace()!;
    expect(rest.length).toBe(4_900);
    expect(rest.byteOffset).toBe(space.byteOffset + 5_000);
    // The rest arrives in ordinary memory together with the next request's first bytes: copied,
    // and while those bytes are buffered there is no in-place space to offer.
    p.push(Buffer.concat([payload.subarray(5_100), hex("2560")]));
    const write = p.next()!;
    expect(write).toMatchObject({ type: Cmd.WRITE, handle: 7n, length: 10_000 });
    expect(write.data).toBe(allocated[0]);
    expect(write.data!.equals(payload)).toBe(true);
    expect(p.payloadSpace()).toBeNull();
    expect(allocated).toHaveLength(1);
  });

  it("after a large WRITE with nothing buffered, asks for just the next header; otherwise for no limit", () => {
    const p = new RequestParser({ maxPayload: 1 << 20 });
    const write = (handle: number, length: number) =>
      Buffer.concat([
        hex(
          `25609513 0000 0001 ${handle.toString(16).padStart(16, "0")} 0000000000000000 ${length.toString(16).padStart(8, "0")}`,
        ),
        Buffer.alloc(length, handle),
      ]);
    const read = hex("25609513 0000 0000 0000000000000009 0000000000000000 00001000");
    expect(p.headerSpace()).toBe(0); // nothing seen yet
    p.push(write(1, 64 * 1024));
    expect(p.next()).toMatchObject({ type: Cmd.WRITE, length: 64 * 1024 });
    expect(p.headerSpace()).toBe(28); // a client streaming large writes sends another
    p.push(Buffer.concat([write(2, 128 * 1024), read]));
    expect(p.next()).toMatchObject({ handle: 2n });
    expect(p.headerSpace()).toBe(0); // the READ is still buffered
    expect(p.next()).toMatchObject({ type: Cmd.READ });
    expect(p.headerSpace()).toBe(0); // the last message was no large WRITE
    p.push(write(3, 4096));
    expect(p.next()).toMatchObject({ handle: 3n });
    expect(p.headerSpace()).toBe(0); // a small one
    p.push(write(4, 256 * 1024).subarray(0, 1000));
    expect(p.next()).toBeNull();
    expect(p.headerSpace()).toBe(0); // mid-payload: payloadSpace is what to offer
  });

  it("parses any stream of requests however it is chunked (property)", () => {
    const request = fc.record({
      flags: fc.integer({ min: 0, max: 0xffff }),
      type: fc.constantFrom(Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, 42),
      handle: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      offset: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
      length: fc.integer({ min: 0, max: 80 }),
    });
    fc.assert(
      fc.property(
        fc.array(request, { maxLength: 12 }),
        fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1 }),
        (list, cuts) => {
          const wire = Buffer.concat(list.map(encodeRequest));
          const p = new RequestParser({ maxPayload: 64 });
          const got: NbdRequest[] = [];
          for (let at = 0, i = 0; at < wire.length; i++) {
            const n = cuts[i % cuts.length]!;
            p.push(wire.subarray(at, at + n));
            got.push(...drain(p));
            at += n;
          }
          expect(got).toEqual(
            list.map((r) => {
              const write = r.type === Cmd.WRITE;
              const dropped = write && r.length > 64;
              return req({ ...r, data: write && !dropped ? payloadFor(r) : null, payloadDropped: dropped });
            }),
          );
        },
      ),
    );
  });
});

/** Test-side encoder for the property above (the server never sends requests). */
function encodeRequest(r: { flags: number; type: number; handle: bigint; offset: number; length: number }): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(0x25609513, 0);
  h.writeUInt16BE(r.flags, 4);
  h.writeUInt16BE(r.type, 6);
  h.writeBigUInt64BE(r.handle, 8);
  h.writeBigUInt64BE(BigInt(r.offset), 16);
  h.writeUInt32BE(r.length, 24);
  return r.type === Cmd.WRITE ? Buffer.concat([h, payloadFor(r)]) : h;
}

function payloadFor(r: { handle: bigint; length: number }): Buffer {
  return Buffer.alloc(r.length, Number(r.handle & 0xffn));
}
