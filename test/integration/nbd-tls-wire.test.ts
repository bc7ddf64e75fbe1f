/**
 * NBD_OPT_STARTTLS on the wire (nbd/tls.ts, nbd/handshake.ts), driven byte by byte with Node's
 * TLS client: proto.md's FORCEDTLS mode ("require") and the offer-only mode ("on"), pre-shared
 * keys and client certificates, and the copying data path a TLS connection must use.
 */
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import tls from "node:tls";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { FileDevice } from "../../core/devices/file-device.js";
import { MemoryLogger } from "../../core/logger.js";
import { Cmd, Opt, Rep } from "../../nbd/protocol.js";
import { NbdServer, deviceMapperExports } from "../../nbd/server.js";
import { parsePskFile } from "../../nbd/tls.js";
import { type NamedBacking, pattern, testMapper } from "../../testing/memory-backing.js";
import { ByteReader, RawConnection, optionRequest, requestHeader, u16, u32 } from "../support/nbd-client.js";
import { missingToolsReason, skipOrFail } from "../support/requirements.js";
import { type PskFiles, type X509Dirs, makeX509Dirs, writePskFiles } from "../support/tls-credentials.js";

const MiB = 1024 * 1024;
const FIXED_NEWSTYLE = 1;
const NO_ZEROES = 2;

let dir: string;
let dm: DeviceMapper;
let backing: NamedBacking;
let logger: MemoryLogger;
let psk: PskFiles;
let content: Buffer;
const servers: NbdServer[] = [];

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-nbd-tls-"));
  ({ dm, backing } = testMapper());
  logger = new MemoryLogger();
  psk = writePskFiles(dir, "udmtest");
  content = pattern(5, 4 * MiB);
  const file = path.join(dir, "disk.img");
  fs.writeFileSync(file, content);
  backing.add("file0", await FileDevice.open(file, { mode: "rw" }));
  await dm.create("vol", { table: `0 ${(4 * MiB) / 512} linear file0 0` });
});

afterEach(async () => {
  for (const s of servers.splice(0)) await s.close();
  await dm.close();
  for (const dev of backing.devices.values()) await dev.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A server offering TLS with `credentials` on `on.sock` and requiring it on `require.sock`. */
async function serve(
  credentials: { psk?: string; certificates?: string } = { psk: psk.file },
): Promise<{ on: string; require: string }> {
  const server = new NbdServer(deviceMapperExports(dm), {
    logger,
    closeGraceMs: 200,
    tls: { mode: "on", ...credentials },
  });
  servers.push(server);
  const socks = { on: path.join(dir, "on.sock"), require: path.join(dir, "require.sock") };
  await server.listenUnix(socks.on);
  await server.listenUnix(socks.require, { tls: "require" });
  return socks;
}

/** Greeting read, client flags sent. */
async function handshake(sock: string, flags = FIXED_NEWSTYLE | NO_ZEROES): Promise<RawConnection> {
  const raw = await RawConnection.open(sock);
  raw.socket.write(u32(flags));
  return raw;
}

async function optionReply(reader: ByteReader): Promise<{ option: number; type: number; data: Buffer }> {
  const h = await reader.read(20);
  const length = h.readUInt32BE(16);
  return {
    option: h.readUInt32BE(8),
    type: h.readUInt32BE(12),
    data: length ? await reader.read(length) : Buffer.alloc(0),
  };
}

/** NBD_OPT_STARTTLS, its ACK, then the client side of the TLS handshake. */
async function startTls(raw: RawConnection, opts: tls.ConnectionOptions): Promise<tls.TLSSocket> {
  raw.socket.write(optionRequest(Opt.STARTTLS, Buffer.alloc(0)));
  expect(await raw.optionReply()).toMatchObject({ option: Opt.STARTTLS, type: Rep.ACK });
  return new Promise((resolve, reject) => {
    const secure = tls.connect({ socket: raw.socket, ...opts }, () => resolve(secure));
    secure.once("error", reject);
  });
}

const pskClient = (identity = psk.identity, key = psk.key): tls.ConnectionOptions => ({
  pskCallback: () => ({ identity, psk: key }),
  checkServerIdentity: () => undefined,
});

/** NBD_OPT_GO for `name` over `socket`; the replies' types, ending with ACK (or an error). */
async function go(socket: net.Socket, reader: ByteReader, name: string): Promise<number[]> {
  const data = Buffer.concat([u32(Buffer.byteLength(name)), Buffer.from(name), u16(0)]);
  socket.write(optionRequest(Opt.GO, data));
  const types: number[] = [];
  for (;;) {
    const r = await optionReply(reader);
    types.push(r.type);
    if (r.type !== Rep.INFO) return types;
  }
}

/** A simple-reply READ of `length` bytes at `offset`. */
async function read(socket: net.Socket, reader: ByteReader, offset: number, length: number): Promise<Buffer> {
  socket.write(requestHeader(Cmd.READ, 0, 7n, offset, length));
  const h = await reader.read(16);
  expect(h.readUInt32BE(4)).toBe(0);
  return reader.read(length);
}

async function closedBy(reader: ByteReader): Promise<void> {
  await expect(reader.read(1)).rejects.toThrow(/connection closed/);
}

function disconnects(): { zeroCopyBytes: number }[] {
  return logger.records
    .filter((r) => r.msg === "nbd client disconnected")
    .map((r) => r.fields as { zeroCopyBytes: number });
}

describe("TLS required (proto.md FORCEDTLS)", () => {
  it("answers every option but STARTTLS and ABORT with ERR_TLS_REQD", async () => {
    const { require } = await serve();
    const raw = await handshake(require);
    for (const option of [Opt.LIST, Opt.STRUCTURED_REPLY, Opt.INFO, Opt.GO, Opt.SET_META_CONTEXT, 0x4242]) {
      const data =
        option === Opt.INFO || option === Opt.GO
          ? Buffer.concat([u32(3), Buffer.from("vol"), u16(0)])
          : Buffer.alloc(0);
      raw.socket.write(optionRequest(option, data));
      const r = await raw.optionReply();
      expect({ option: r.option, type: r.type }).toEqual({ option, type: Rep.ERR_TLS_REQD });
      expect(r.data.toString()).toMatch(/TLS is required/);
    }
    raw.socket.write(optionRequest(Opt.ABORT, Buffer.alloc(0)));
    expect(await raw.optionReply()).toMatchObject({ option: Opt.ABORT, type: Rep.ACK });
    await raw.closedByServer();
  });

  it("ends the connection on EXPORT_NAME before TLS, and for a client without fixed newstyle", async () => {
    const { require } = await serve();
    const raw = await handshake(require);
    raw.socket.write(optionRequest(Opt.EXPORT_NAME, Buffer.from("vol")));
    await raw.closedByServer();
    const old = await handshake(require, 0);
    await old.closedByServer();
    const errors = logger.records
      .filter((r) => r.msg === "nbd protocol error, closing connection")
      .map((r) => (r.fields as { error: string }).error);
    expect(errors).toEqual([expect.stringMatching(/EXPORT_NAME before TLS/), expect.stringMatching(/fixed newstyle/)]);
  });

  it("serves the export once TLS is up, with structured replies negotiated again (TLS 1.3 with a PSK)", async () => {
    const { require } = await serve();
    const raw = await handshake(require);
    const secure = await startTls(raw, pskClient());
    expect(secure.getProtocol()).toBe("TLSv1.3");
    const reader = new ByteReader(secure);
    secure.write(optionRequest(Opt.STARTTLS, Buffer.alloc(0)));
    expect(await optionReply(reader)).toMatchObject({ option: Opt.STARTTLS, type: Rep.ERR_INVALID });
    expect(await go(secure, reader, "vol")).toEqual([Rep.INFO, Rep.INFO, Rep.ACK]);
    expect((await read(secure, reader, MiB, 64 * 1024)).equals(content.subarray(MiB, MiB + 64 * 1024))).toBe(true);
    secure.destroy();
    await vi.waitFor(() => expect(logger.records.some((r) => r.msg === "nbd TLS established")).toBe(true));
  });

  it("keeps TLS 1.2 for clients without TLS 1.3, with an (EC)DHE-PSK suite", async () => {
    const { require } = await serve();
    const raw = await handshake(require);
    const secure = await startTls(raw, {
      ...pskClient(),
      maxVersion: "TLSv1.2",
      ciphers: "ECDHE-PSK-CHACHA20-POLY1305",
    });
    expect(secure.getProtocol()).toBe("TLSv1.2");
    const reader = new ByteReader(secure);
    expect(await go(secure, reader, "vol")).toEqual([Rep.INFO, Rep.INFO, Rep.ACK]);
    expect((await read(secure, reader, 0, 4096)).equals(content.subarray(0, 4096))).toBe(true);
    secure.destroy();
  });
});

describe("TLS offered (--tls=on)", () => {
  it("serves plaintext clients, and refuses STARTTLS with data or after bytes sent too early", async () => {
    const { on } = await serve();
    const plain = await handshake(on);
    expect(await go(plain.socket, plain.reader, "vol")).toEqual([Rep.INFO, Rep.INFO, Rep.ACK]);
    expect((await read(plain.socket, plain.reader, 0, 4096)).equals(content.subarray(0, 4096))).toBe(true);
    plain.socket.destroy();

    const withData = await handshake(on);
    withData.socket.write(optionRequest(Opt.STARTTLS, Buffer.from("x")));
    expect(await withData.optionReply()).toMatchObject({ option: Opt.STARTTLS, type: Rep.ERR_INVALID });
    withData.socket.destroy();

    // The client may send nothing between STARTTLS and its reply: those bytes would be lost.
    const early = await handshake(on);
    early.socket.write(
      Buffer.concat([optionRequest(Opt.STARTTLS, Buffer.alloc(0)), optionRequest(Opt.LIST, Buffer.alloc(0))]),
    );
    expect(await early.optionReply()).toMatchObject({ option: Opt.STARTTLS, type: Rep.ACK });
    await early.closedByServer();
    expect(
      logger.records.some((r) => /data after NBD_OPT_STARTTLS/.test((r.fields as { error?: string })?.error ?? "")),
    ).toBe(true);
  });

  it("sends large reads through the TLS socket, never with sendfile", async () => {
    const { on } = await serve();
    const plain = await handshake(on);
    expect(await go(plain.socket, plain.reader, "vol")).toEqual([Rep.INFO, Rep.INFO, Rep.ACK]);
    expect((await read(plain.socket, plain.reader, 0, MiB)).equals(content.subarray(0, MiB))).toBe(true);
    plain.socket.destroy();
    const raw = await handshake(on);
    const secure = await startTls(raw, pskClient());
    const reader = new ByteReader(secure);
    expect(await go(secure, reader, "vol")).toEqual([Rep.INFO, Rep.INFO, Rep.ACK]);
    for (let i = 0; i < 4; i++)
      expect((await read(secure, reader, i * MiB, MiB)).equals(content.subarray(i * MiB, (i + 1) * MiB))).toBe(true);
    secure.destroy();
    await vi.waitFor(() => expect(disconnects()).toHaveLength(2));
    // Where zero copy exists, the plaintext read took it (which shows the TLS one could have).
    if (process.platform === "linux" && process.arch === "x64") expect(disconnects()[0]!.zeroCopyBytes).toBe(MiB);
    expect(disconnects()[1]!.zeroCopyBytes).toBe(0);
  });
});

describe("credentials", () => {
  it("fails the TLS handshake for a wrong key or an unknown identity, and logs it", async () => {
    const { require } = await serve();
    for (const client of [pskClient(psk.identity, Buffer.alloc(32, 1)), pskClient("intruder")]) {
      const raw = await handshake(require);
      await expect(startTls(raw, client)).rejects.toThrow();
      raw.socket.destroy();
    }
    await vi.waitFor(() =>
      expect(logger.records.filter((r) => r.msg === "nbd TLS handshake failed, closing connection")).toHaveLength(2),
    );
  });

  it("reads psktool's format and names the line of a bad entry", () => {
    const keys = parsePskFile("alice:00ff\n\nbob:ABCD\r\n", "keys");
    expect([...keys]).toEqual([
      ["alice", Buffer.from([0, 255])],
      ["bob", Buffer.from([0xab, 0xcd])],
    ]);
    expect(() => parsePskFile("alice:0f\nbob:xyz\n", "keys")).toThrow(
      "keys:2: the key is not an even number of hex digits",
    );
    expect(() => parsePskFile("alice 00ff\n", "keys")).toThrow("keys:1: expected identity:hexkey");
    expect(() => parsePskFile("a:00\na:01\n", "keys")).toThrow('keys:2: identity "a" appears twice');
    expect(() => parsePskFile("\n", "keys")).toThrow("keys: no keys");
  });

  it("refuses TLS modes without credentials, and both kinds at once", () => {
    expect(() => new NbdServer(deviceMapperExports(dm), { tls: { mode: "require" } })).toThrow(/needs credentials/);
    const both = { mode: "on" as const, psk: psk.file, certificates: dir };
    expect(() => new NbdServer(deviceMapperExports(dm), { tls: both })).toThrow(/not both/);
    const plain = new NbdServer(deviceMapperExports(dm));
    servers.push(plain);
    return expect(plain.listenUnix(path.join(dir, "x.sock"), { tls: "on" })).rejects.toThrow(
      /needs the server's tls credentials/,
    );
  });
});

const x509Missing = missingToolsReason(["openssl"]);
const skipX509 = skipOrFail("NBD x509 wire tests", x509Missing);

describe.skipIf(skipX509)("x509 certificates", () => {
  let pki: X509Dirs;
  beforeEach(async () => {
    pki = await makeX509Dirs(dir);
  });

  const certClient = (from: string): tls.ConnectionOptions => ({
    ca: fs.readFileSync(path.join(from, "ca-cert.pem")),
    cert: fs.readFileSync(path.join(from, "client-cert.pem")),
    key: fs.readFileSync(path.join(from, "client-key.pem")),
    servername: "localhost",
  });

  it("admits a client whose certificate the CA signed, refuses one from another CA or without one", async () => {
    const { require } = await serve({ certificates: pki.server });
    const raw = await handshake(require);
    const secure = await startTls(raw, certClient(pki.client));
    const reader = new ByteReader(secure);
    expect(await go(secure, reader, "vol")).toEqual([Rep.INFO, Rep.INFO, Rep.ACK]);
    secure.destroy();

    // Node's client sends its certificate whoever signed it: the server must refuse it after the handshake.
    const stranger = await handshake(require);
    const refused = await startTls(stranger, certClient(pki.stranger)).catch((err: Error) => err);
    if (!(refused instanceof Error)) await closedBy(new ByteReader(refused));
    const anonymous = await handshake(require);
    const { cert: _c, key: _k, ...noCert } = certClient(pki.client);
    const none = await startTls(anonymous, noCert).catch((err: Error) => err);
    if (!(none instanceof Error)) await closedBy(new ByteReader(none));
    await vi.waitFor(() => {
      const failures = logger.records
        .filter((r) => r.msg === "nbd TLS handshake failed, closing connection")
        .map((r) => (r.fields as { error: string }).error);
      expect(failures).toEqual([
        expect.stringMatching(/client certificate refused/),
        expect.stringMatching(/certificate/),
      ]);
    });
  });
});
