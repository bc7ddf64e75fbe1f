/**
 * The NBD export against real clients: libnbd's nbdinfo and nbdcopy, and qemu-io. Tests whose
 * tool is missing are skipped with a printed reason, unless UDM_REQUIRE_ROOT_TESTS=1 makes that a
 * failure. The tools run asynchronously: the server lives in this same process.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { readBio, submitAndWait, writeBio } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { FileDevice } from "../../core/devices/file-device.js";
import { NbdServer, deviceMapperExports } from "../../nbd/server.js";
import { type NamedBacking, pattern, testMapper } from "../../testing/memory-backing.js";
import { missingTools } from "../support/requirements.js";
import { sh, tool } from "../support/tools.js";

const MiB = 1024 * 1024;
const TOOLS = ["nbdinfo", "nbdcopy", "qemu-io"] as const;
type Tool = (typeof TOOLS)[number];

const missing = missingTools("NBD client tests", TOOLS);
const needs = (...tools: Tool[]) => tools.some((t) => missing.includes(t));

let dir: string;
let sock: string;
let dm: DeviceMapper;
let backing: NamedBacking;
let server: NbdServer;
const uri = (name: string) => `nbd+unix:///${name}?socket=${sock}`;

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-nbd-"));
  sock = path.join(dir, "nbd.sock");
  ({ dm, backing } = testMapper());
  server = new NbdServer(deviceMapperExports(dm));
  await server.listenUnix(sock);
});

afterEach(async () => {
  await server.close();
  await dm.close();
  for (const dev of backing.devices.values()) await dev.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function readMem(name: string, sector: number, bytes: number): Promise<Buffer> {
  return (await submitAndWait(backing.devices.get(name)!, readBio(sector, Buffer.alloc(bytes)))).data;
}

async function writeMem(name: string, sector: number, data: Buffer): Promise<void> {
  await submitAndWait(backing.devices.get(name)!, writeBio(sector, data));
}

describe("real NBD clients", () => {
  it.skipIf(needs("nbdinfo"))("nbdinfo --list shows every export with its size", async () => {
    backing.memory("mem0", 65536);
    await dm.create("small", { table: "0 2048 linear mem0 0" });
    await dm.create("big", { table: "0 40960 linear mem0 2048" });
    await dm.create("ro", { table: "0 8 zero", readOnly: true });
    const out = JSON.parse(await sh("nbdinfo", "--json", "--list", uri("")));
    type ExportInfo = { "export-name": string; "export-size": number; is_read_only: boolean };
    const exports: Record<string, ExportInfo> = Object.fromEntries(
      (out.exports as ExportInfo[]).map((e) => [e["export-name"], e]),
    );
    expect(Object.keys(exports).sort()).toEqual(["big", "ro", "small"]);
    expect(exports.small!["export-size"]).toBe(1 * MiB);
    expect(exports.big!["export-size"]).toBe(20 * MiB);
    expect(exports.ro!["export-size"]).toBe(4096);
    expect(exports.ro!.is_read_only).toBe(true);
    expect(exports.big!.is_read_only).toBe(false);
    expect(out.structured).toBe(true);
  });

  it.skipIf(needs("nbdinfo", "qemu-io"))("serves over TCP too, and the default export is the only device", async () => {
    backing.memory("mem0", 4096);
    await dm.create("solo", { table: "0 4096 linear mem0 0" });
    const { host, port } = await server.listenTcp({ host: "127.0.0.1", port: 0 });
    expect(await sh("nbdinfo", "--size", `nbd://${host}:${port}/solo`)).toBe(`${2 * MiB}\n`);
    expect(await sh("nbdinfo", "--size", uri(""))).toBe(`${2 * MiB}\n`);
    // Data over TCP: the connection is re-opened on a duplicated descriptor like a unix one.
    const out = await sh(
      "qemu-io",
      "-f",
      "raw",
      `nbd://${host}:${port}/solo`,
      "-c",
      "write -P 0x3c 4096 1M",
      "-c",
      "read -P 0x3c 4096 1M",
    );
    expect(out).toMatch(/read 1048576\/1048576 bytes/);
    expect((await readMem("mem0", 8, MiB)).equals(Buffer.alloc(MiB, 0x3c))).toBe(true);
  });

  it.skipIf(needs("qemu-io"))("qemu-io writes a pattern and the backing RAM disk holds it", async () => {
    backing.memory("mem0", 8192);
    await dm.create("disk", { table: "0 4096 linear mem0 1024" });
    const out = await sh("qemu-io", "-f", "raw", uri("disk"), "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M");
    expect(out).toMatch(/wrote 1048576\/1048576 bytes/);
    expect((await readMem("mem0", 1024, MiB)).equals(Buffer.alloc(MiB, 0xab))).toBe(true);
    expect((await readMem("mem0", 1023, 512)).equals(Buffer.alloc(512))).toBe(true); // before the mapping
    expect((await readMem("mem0", 1024 + 2048, 512)).equals(Buffer.alloc(512))).toBe(true); // after the 1M
    // Unaligned I/O: qemu honours the advertised 512-byte minimum with its own read-modify-write.
    await sh("qemu-io", "-f", "raw", uri("disk"), "-c", "write -P 0x5a 1000 100", "-c", "read -P 0x5a 1000 100");
    const sectors = await readMem("mem0", 1024 + 1, 1024); // export bytes 512..1535
    expect(sectors.subarray(1000 - 512, 1100 - 512).equals(Buffer.alloc(100, 0x5a))).toBe(true);
    expect(sectors[1100 - 512]).toBe(0xab);
  });

  it.skipIf(needs("nbdcopy"))("nbdcopy reads the whole export, equal to the backing region", async () => {
    backing.memory("mem0", 16384);
    const data = pattern(42, 4 * MiB);
    await writeMem("mem0", 0, Buffer.concat([pattern(1, 1 * MiB), data, pattern(2, 3 * MiB)]));
    await dm.create("disk", { table: "0 8192 linear mem0 2048" });
    const out = path.join(dir, "out.img");
    await sh("nbdcopy", uri("disk"), out);
    expect(fs.readFileSync(out).equals(data)).toBe(true);
  });

  it.skipIf(needs("nbdcopy"))(
    "nbdcopy reads a file-backed export (sent with sendfile) intact over unix and TCP, several connections",
    async () => {
      // Large reads of file-backed linear/striped tables leave by sendfile; on TCP the smaller
      // socket buffer makes the writer fall back to copying the rest of many replies.
      const files = ["fa", "fb"].map((n, i) => {
        const file = path.join(dir, `${n}.img`);
        fs.writeFileSync(file, pattern(60 + i, 16 * MiB));
        return file;
      });
      backing.add("fa", await FileDevice.open(files[0]!, { mode: "rw" }));
      backing.add("fb", await FileDevice.open(files[1]!, { mode: "rw" }));
      await dm.create("disk", { table: "0 16384 linear fa 8192\n16384 32768 striped 2 512 fa 0 fb 0" });
      const expected = (await submitAndWait(dm.device("disk"), readBio(0, Buffer.alloc(24 * MiB)))).data;
      const { host, port } = await server.listenTcp({ host: "127.0.0.1", port: 0 });
      for (const source of [uri("disk"), `nbd://${host}:${port}/disk`]) {
        const out = path.join(dir, "out.img");
        await sh("nbdcopy", "--connections=4", "--request-size=1048576", source, out);
        expect(fs.readFileSync(out).equals(expected)).toBe(true);
        fs.rmSync(out);
      }
    },
  );

  it.skipIf(needs("nbdcopy"))("nbdcopy writes into the export over several connections", async () => {
    backing.memory("mem0", 32768);
    await dm.create("disk", { table: "0 32768 linear mem0 0" });
    const src = path.join(dir, "src.img");
    const data = pattern(7, 16 * MiB);
    fs.writeFileSync(src, data);
    await sh("nbdcopy", "--connections=4", "--request-size=262144", src, uri("disk"));
    expect((await readMem("mem0", 0, 16 * MiB)).equals(data)).toBe(true);
  });

  it.skipIf(needs("qemu-io"))("a read-only table gives a read-only export: qemu-io cannot write", async () => {
    backing.memory("mem0", 4096);
    await writeMem("mem0", 0, Buffer.alloc(4096, 0x11));
    await dm.create("ro", { table: "0 4096 linear mem0 0", readOnly: true });
    const w = await tool("qemu-io", ["-f", "raw", uri("ro"), "-c", "write -P 0xab 0 4k"]);
    expect(w.code).not.toBe(0);
    expect(w.stderr).toMatch(/read-only|Permission denied|Operation not permitted/i);
    await sh("qemu-io", "-r", "-f", "raw", uri("ro"), "-c", "read -P 0x11 0 4k");
    expect((await readMem("mem0", 0, 4096)).equals(Buffer.alloc(4096, 0x11))).toBe(true);
  });

  it.skipIf(needs("qemu-io"))("a suspended device holds qemu-io's requests; after resume it succeeds", async () => {
    backing.memory("mem0", 4096);
    await dm.create("disk", { table: "0 4096 linear mem0 0" });
    await dm.suspend("disk");
    const io = sh("qemu-io", "-f", "raw", uri("disk"), "-c", "write -P 0x77 0 64k", "-c", "read -P 0x77 0 64k");
    await vi.waitFor(() => expect(dm.device("disk").queued).toBeGreaterThan(0), { timeout: 20_000 });
    await dm.resume("disk");
    expect(await io).toMatch(/read 65536\/65536 bytes/);
    expect((await readMem("mem0", 0, 65536)).equals(Buffer.alloc(65536, 0x77))).toBe(true);
  });
});
