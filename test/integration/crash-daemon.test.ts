/**
 * kill -9 of udmd in the middle of heavy verified NBD writes to a snapshot origin with two
 * snapshots (issue 6). After a restart, which restores the devices by itself (issue 16: the
 * same names and tables, from the run directory's record):
 *
 * - every write acknowledged with FUA, or followed by an acknowledged flush, is there (or a later
 *   write of the same sectors is); nothing else changed (test/support/crash-model.ts);
 * - the snapshots hold their point-in-time content: the first the origin as it was when it was
 *   taken, the second the origin at its creation plus its own durable writes;
 * - the COW stores load cleanly: the images parse with no problem, the snapshot tables load,
 *   and their status is a usage line that matches the images, not Invalid.
 *
 * UDM_FUZZ_SEED replays a run (it picks the I/O and the moment of the kill).
 */
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CmdFlags } from "../../nbd/protocol.js";
import { readCowImage } from "../../targets/snapshot/cow-image.js";
import { WriteHistory } from "../support/crash-model.js";
import { type RunningDaemon, startDaemon, tempDir } from "../support/daemon.js";
import { WireClient } from "../support/nbd-client.js";
import { Rng, seedFrom } from "../../testing/rng.js";
import { cli, createSnapshot, makeFile } from "../support/udmd-tools.js";
import { BLOCK, SECTOR, describeMismatch, newWriteId, stamp } from "../support/verified-io.js";

const SEED = seedFrom("UDM_FUZZ_SEED");
const MiB = 1024 * 1024;
const ORIGIN_BYTES = 16 * MiB;
const SECTORS = ORIGIN_BYTES / SECTOR;

let dir: string;
let files: string;
let daemon: RunningDaemon | undefined;

beforeAll(() => {
  dir = tempDir();
  files = tempDir("udm-crash-");
});

afterAll(async () => {
  await daemon?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
  fs.rmSync(files, { recursive: true, force: true });
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const range = (n: number) => Array.from({ length: n }, (_, i) => i);

async function readAll(client: WireClient, bytes: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let at = 0; at < bytes; at += MiB) {
    const r = await client.read(at, Math.min(MiB, bytes - at));
    if (r.error !== 0) throw new Error(`read at ${at} failed: ${r.error} ${r.message ?? ""}`);
    parts.push(r.data!);
  }
  return Buffer.concat(parts);
}

describe("udmd killed with -9 under heavy writes", () => {
  it(
    "keeps every durable write, the snapshots' point-in-time content, and COW stores that load",
    { timeout: 60_000 },
    async () => {
      console.log(`crash-daemon: seed ${SEED} (replay with UDM_FUZZ_SEED=${SEED})`);
      const rng = new Rng(SEED);
      const f = (name: string) => path.join(files, name);
      const socket = path.join(dir, "nbd.sock");
      const p0 = stamp(0, 0, SECTORS);
      makeFile(f("origin.img"), p0);
      makeFile(f("cow1.img"), 24 * MiB);
      makeFile(f("cow2.img"), 24 * MiB);
      const tables = {
        base: `0 ${SECTORS} snapshot-origin ${f("origin.img")}`,
        snap1: `0 ${SECTORS} snapshot ${f("origin.img")} ${f("cow1.img")} P 8`,
        snap2: `0 ${SECTORS} snapshot ${f("origin.img")} ${f("cow2.img")} P 8`,
      };

      daemon = await startDaemon(dir);
      await cli(dir, "create", "base", "--table", tables.base);
      await createSnapshot(dir, "base", "snap1", tables.snap1);

      // Before the second snapshot: rewrite a quarter of the origin and flush.
      const setup = await WireClient.connect(socket, "base");
      const p1 = Buffer.from(p0);
      for (const block of range(ORIGIN_BYTES / BLOCK).filter(() => rng.chance(0.25))) {
        const data = stamp(newWriteId(), (block * BLOCK) / SECTOR, BLOCK / SECTOR);
        expect((await setup.write(block * BLOCK, data)).error).toBe(0);
        data.copy(p1, block * BLOCK);
      }
      expect((await setup.flush()).error).toBe(0);
      await setup.disconnect();
      await createSnapshot(dir, "base", "snap2", tables.snap2);
      const tablesBefore = await cli(dir, "table");

      // Heavy writes: the origin's even blocks through "base", the odd ones through "snap2"
      // (each block has one writer, one request at a time), random FUA, flushes now and then.
      const history = new WriteHistory();
      const blocks = range(ORIGIN_BYTES / BLOCK).filter((b) => b % 8 !== 7);
      const plan = [
        ...range(8).map((k) => ({
          device: "base",
          own: blocks.filter((b) => b % 2 === 0).filter((_, i) => i % 8 === k),
        })),
        ...range(4).map((k) => ({
          device: "snap2",
          own: blocks.filter((b) => b % 2 === 1).filter((_, i) => i % 4 === k),
        })),
      ];
      const clients = await Promise.all(
        plan.map((p) => WireClient.connect(socket, p.device, { structured: rng.chance(0.7) })),
      );
      let killed = false;
      const errors: string[] = [];
      let flushes = 0;
      const lane = async (client: WireClient, device: string, own: number[], r: Rng) => {
        while (!killed) {
          const block = r.pick(own);
          const sectors = r.range(1, BLOCK / SECTOR);
          const first = (block * BLOCK) / SECTOR + r.int(BLOCK / SECTOR - sectors + 1);
          const fua = r.chance(0.3);
          const id = newWriteId();
          const w = history.issue(device, id, first, sectors, fua);
          try {
            const rep = await client.write(first * SECTOR, stamp(id, first, sectors), fua ? CmdFlags.FUA : 0);
            if (rep.error !== 0) {
              history.failed(w);
              if (!killed) errors.push(`${device}: write #${id} failed: ${rep.error}`);
            } else history.acked(w);
            if (r.chance(0.1)) {
              const sent = history.flushSent();
              const f = await client.flush();
              if (f.error === 0) {
                history.flushAcked(device, sent);
                flushes++;
              } else if (!killed) errors.push(`${device}: flush failed: ${f.error}`);
            }
          } catch (err) {
            if (!killed) errors.push(`${device}: ${(err as Error).message}`);
            return; // the daemon is gone
          }
        }
      };
      const runs = clients.flatMap((client, c) => {
        const own = plan[c]!.own;
        return range(4).map((j) =>
          lane(
            client,
            plan[c]!.device,
            own.filter((_, i) => i % 4 === j),
            rng.fork(),
          ),
        );
      });
      await sleep(rng.range(1500, 3500));
      const inFlightAtKill = clients.reduce((n, c) => n + c.inFlight, 0);
      killed = true;
      expect(await daemon.stop("SIGKILL")).toBe(null);
      await Promise.all(runs);
      for (const c of clients) c.destroy();
      expect(errors).toEqual([]);

      // The COW images as the killed daemon left them: they parse without a problem.
      const images = {
        snap1: await readCowImage(fs.readFileSync(f("cow1.img"))),
        snap2: await readCowImage(fs.readFileSync(f("cow2.img"))),
      };
      for (const [name, img] of Object.entries(images)) {
        expect(img.problems, `${name} COW image`).toEqual([]);
        expect(img.state, `${name} COW image`).toBe("valid");
      }

      // Restart: the devices come back by themselves, with the same tables.
      daemon = await startDaemon(dir);
      expect(daemon.stderr()).toContain('"devices restored"');
      expect(await cli(dir, "table")).toBe(tablesBefore);
      for (const [name, img] of Object.entries(images)) {
        const { allocated, total, metadata } = img.usage;
        expect(await cli(dir, "status", name), `${name} status after the restart`).toBe(
          `0 ${SECTORS} snapshot ${allocated}/${total} ${metadata}\n`,
        );
      }

      const reader = await WireClient.connect(socket, "snap1");
      const snap1 = await readAll(reader, ORIGIN_BYTES);
      await reader.disconnect();
      const baseReader = await WireClient.connect(socket, "base");
      const base = await readAll(baseReader, ORIGIN_BYTES);
      const snap2Reader = await WireClient.connect(socket, "snap2");
      const snap2 = await readAll(snap2Reader, ORIGIN_BYTES);

      const snap1Equal = snap1.equals(p0);
      const originReport = history.verify("base", base, p1);
      const snap2Report = history.verify("snap2", snap2, p1);
      const counts = { base: history.counts("base"), snap2: history.counts("snap2") };
      console.log(
        `crash-daemon: killed after ${counts.base.issued + counts.snap2.issued} writes and ${flushes} flushes, ${inFlightAtKill} requests in flight; ` +
          `origin: ${counts.base.acked} acknowledged (${counts.base.durable} durable), snap2: ${counts.snap2.acked} acknowledged (${counts.snap2.durable} durable); ` +
          `crash-recovered writes checked: ${originReport.durableWritesChecked + snap2Report.durableWritesChecked} durable writes present ` +
          `over ${originReport.sectorsChecked + snap2Report.sectorsChecked} sectors; snap1 ${snap1Equal ? "equals" : "DIFFERS FROM"} its point-in-time content; ` +
          `COW images: snap1 ${images.snap1.records.length} exceptions, snap2 ${images.snap2.records.length}`,
      );
      expect(snap1Equal ? [] : [describeMismatch("snap1", 0, p0, snap1)]).toEqual([]);
      expect(originReport.problems).toEqual([]);
      expect(snap2Report.problems).toEqual([]);
      expect(counts.base.durable + counts.snap2.durable).toBeGreaterThan(100);

      // The recovered stack works: new origin writes leave both snapshots alone.
      const block = 0;
      const fresh = stamp(newWriteId(), 0, BLOCK / SECTOR);
      expect((await baseReader.write(block, fresh, CmdFlags.FUA)).error).toBe(0);
      expect((await baseReader.read(block, BLOCK)).data!.equals(fresh)).toBe(true);
      const snap1Again = await WireClient.connect(socket, "snap1");
      expect((await snap1Again.read(block, BLOCK)).data!.equals(p0.subarray(0, BLOCK))).toBe(true);
      expect((await snap2Reader.read(block, BLOCK)).data!.equals(snap2.subarray(0, BLOCK))).toBe(true);
      await Promise.all([snap1Again.disconnect(), baseReader.disconnect(), snap2Reader.disconnect()]);
    },
  );
});
