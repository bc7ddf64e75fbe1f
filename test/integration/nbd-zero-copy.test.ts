/**
 * Zero-copy READ replies (core/file-ranges.ts, nbd/reply-writer.ts): large reads of
 * file-backed devices leave by sendfile(2) from the page cache. Every test checks the bytes the
 * client receives, and the connection's zeroCopyBytes (logged at disconnect) to know which path
 * they took.
 */
import fs from "node:fs";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { submitAndWait, writeBio } from "../../core/bio.js";
import { FileDevice } from "../../core/devices/file-device.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import type { MemoryLogger } from "../../core/logger.js";
import { requestHeader, WireClient } from "../support/nbd-client.js";
import { type NamedBacking, pattern } from "../../testing/memory-backing.js";
import { type WireServer, startWireServer, stopWireServer } from "../support/wire-server.js";
import { Cmd } from "../../nbd/protocol.js";
import { NbdServer, deviceMapperExports } from "../../nbd/server.js";

const KiB = 1024;
const MiB = 1024 * KiB;

let wire: WireServer;
let dir: string;
let dm: DeviceMapper;
let backing: NamedBacking;
let logger: MemoryLogger;

beforeEach(async () => {
  wire = await startWireServer("udm-nbd-zc-");
  ({ dir, dm, backing, logger } = wire);
});

afterEach(() => stopWireServer(wire));

const connect = (name: string, structured = true): Promise<WireClient> => wire.connect(name, { structured });

/** A file of `bytes` pattern bytes, opened as backing device `name`. */
async function fileBacking(name: string, bytes: number, seed: number): Promise<Buffer> {
  const content = pattern(seed, bytes);
  const file = path.join(dir, `${name}.img`);
  fs.writeFileSync(file, content);
  backing.add(name, await FileDevice.open(file, { mode: "rw" }));
  return content;
}

/** zeroCopyBytes of every connection that has disconnected so far. */
function zeroCopyBytes(): number[] {
  return logger.records
    .filter((r) => r.msg === "nbd client disconnected")
    .map((r) => (r.fields as { zeroCopyBytes: number }).zeroCopyBytes);
}

function openFds(): number {
  return fs.readdirSync("/proc/self/fd").length;
}

describe.skipIf(process.platform !== "linux" || process.arch !== "x64")("zero-copy READ replies", () => {
  it.each([true, false])(
    "pipelined 1 MiB reads of a linear file device arrive intact, interleaved with small reads and writes (structured %s)",
    async (structured) => {
      const content = await fileBacking("file0", 16 * MiB, 7);
      await dm.create("disk", { table: `0 ${(16 * MiB) / 512} linear file0 0` });
      const c = await connect("disk", structured);
      const small = pattern(99, 4 * KiB);
      const jobs: Promise<void>[] = [];
      for (let i = 0; i < 12; i++) {
        jobs.push(
          c
            .read(i * MiB, MiB)
            .then((r) => void expect(r.data!.equals(content.subarray(i * MiB, (i + 1) * MiB))).toBe(true)),
        );
        jobs.push(
          c
            .read(i * MiB + 4 * KiB, 4 * KiB)
            .then(
              (r) => void expect(r.data!.equals(content.subarray(i * MiB + 4 * KiB, i * MiB + 8 * KiB))).toBe(true),
            ),
        );
        // Writes beyond the region read, so the expected bytes stay what they were.
        jobs.push(c.write(15 * MiB + i * 4 * KiB, small).then((r) => void expect(r.error).toBe(0)));
      }
      await Promise.all(jobs);
      expect(c.outOfOrder).toBeGreaterThan(0);
      await c.disconnect();
      await vi.waitFor(() => expect(zeroCopyBytes()).toEqual([12 * MiB]));
      const h = dm.open("disk");
      expect((await h.read((15 * MiB) / 512, 8)).equals(small)).toBe(true);
      await h.close();
    },
  );

  it("a read across file, zero, memory and striped file targets comes back in order, each part by its own path", async () => {
    const a = await fileBacking("fa", 4 * MiB, 1);
    const b = await fileBacking("fb", 4 * MiB, 2);
    const mem = backing.memory("mem0", 2048);
    await submitAndWait(mem, writeBio(0, pattern(3, MiB)));
    // 256 KiB file | 256 KiB zero | 512 KiB memory | 1 MiB striped over fa, fb in 128 KiB chunks | 64 KiB file (too small for sendfile)
    await dm.create("mix", {
      table: [
        "0 512 linear fa 0",
        "512 512 zero",
        "1024 1024 linear mem0 0",
        "2048 2048 striped 2 256 fa 2048 fb 0",
        "4096 128 linear fb 4096",
      ].join("\n"),
    });
    const stripe = (n: number) =>
      (n % 2 === 0 ? a : b).subarray(
        ((n % 2 === 0 ? 2048 : 0) + (n >> 1) * 256) * 512,
        ((n % 2 === 0 ? 2048 : 0) + ((n >> 1) + 1) * 256) * 512,
      );
    const expected = Buffer.concat([
      a.subarray(0, 256 * KiB),
      Buffer.alloc(256 * KiB),
      pattern(3, 512 * KiB),
      ...Array.from({ length: 8 }, (_, n) => stripe(n)),
      b.subarray(4096 * 512, 4224 * 512),
    ]);
    const c = await connect("mix");
    const r = await c.read(0, expected.length);
    expect(r.error).toBe(0);
    expect(r.data!.equals(expected)).toBe(true);
    await c.disconnect();
    // The file parts of 128 KiB and more went by sendfile: 256 KiB + 8 × 128 KiB.
    await vi.waitFor(() => expect(zeroCopyBytes()).toEqual([256 * KiB + MiB]));
  });

  it("targets that do not declare zeroCopyReads (delay) and a server with zeroCopy: false copy as before", async () => {
    const content = await fileBacking("file0", 4 * MiB, 5);
    await dm.create("slow", { table: "0 8192 delay file0 0 0" });
    const c = await connect("slow");
    expect((await c.read(0, 2 * MiB)).data!.equals(content.subarray(0, 2 * MiB))).toBe(true);
    await c.disconnect();
    await vi.waitFor(() => expect(zeroCopyBytes()).toEqual([0]));

    await dm.create("disk", { table: "0 8192 linear file0 0" });
    const copying = new NbdServer(deviceMapperExports(dm), { logger, zeroCopy: false });
    const sock = path.join(dir, "copying.sock");
    await copying.listenUnix(sock);
    try {
      const d = await WireClient.connect(sock, "disk", { structured: true });
      expect((await d.read(MiB, 2 * MiB)).data!.equals(content.subarray(MiB, 3 * MiB))).toBe(true);
      await d.disconnect();
      await vi.waitFor(() => expect(zeroCopyBytes()).toEqual([0, 0]));
    } finally {
      await copying.close();
    }
  });

  it("a client that stops reading and leaves mid-reply costs no descriptor and no other client anything", async () => {
    const content = await fileBacking("file0", 16 * MiB, 9);
    await dm.create("disk", { table: `0 ${(16 * MiB) / 512} linear file0 0` });
    const before = openFds();
    const c = await connect("disk");
    c.socket.pause(); // replies pile up: sendfile meets a full socket and waits for room
    for (let i = 0; i < 16; i++) c.socket.write(requestHeader(Cmd.READ, 0, BigInt(i + 1), i * MiB, MiB));
    // Every read has become file ranges, each holding a descriptor, before the client goes.
    await vi.waitFor(() => expect(openFds()).toBeGreaterThanOrEqual(before + 8), { timeout: 5000 });
    c.destroy();
    await vi.waitFor(() => expect(zeroCopyBytes()).toHaveLength(1), { timeout: 5000 });
    await vi.waitFor(() => expect(openFds()).toBe(before), { timeout: 5000 });
    const d = await connect("disk");
    expect((await d.read(3 * MiB, MiB)).data!.equals(content.subarray(3 * MiB, 4 * MiB))).toBe(true);
  });

  it("a file that shrank under the device reads as zeros past its new end, as with copying, and the connection goes on", async () => {
    const content = await fileBacking("file0", 8 * MiB, 11);
    await dm.create("disk", { table: `0 ${(8 * MiB) / 512} linear file0 0` });
    const c = await connect("disk");
    fs.truncateSync(path.join(dir, "file0.img"), 2 * MiB + 4096); // behind udm's back: the device still says 8 MiB
    const r = await c.read(2 * MiB, MiB);
    expect(r.data!.subarray(0, 4096).equals(content.subarray(2 * MiB, 2 * MiB + 4096))).toBe(true);
    expect(r.data!.subarray(4096).every((b) => b === 0)).toBe(true);
    expect((await c.read(0, MiB)).data!.equals(content.subarray(0, MiB))).toBe(true);
    expect(logger.records.filter((x) => x.level === "error")).toEqual([]);
  });
});
