/**
 * Linear and striped tables over real loop devices (issue 7, scenario 1). The test binds 2–4 loop
 * devices to sparse files, builds the table in udmd, attaches it (`udmsetup attach`: nbdfuse +
 * loop device here) and runs fio with `verify=crc32c` through the attached kernel device. Then it
 * reads the whole device back through NBD (nbdcopy), verifies that copy with fio's `verify_only`
 * (the blocks fio wrote, bit for bit), and compares it with the loop devices' contents at the
 * offsets the table maps every sector to; the parts of the loop devices outside the table stay
 * zero.
 *
 * Needs root, /dev/loop-control, /dev/fuse, nbdfuse, nbdcopy and fio; otherwise skipped with the
 * reason printed, unless UDM_REQUIRE_ROOT_TESTS=1 makes that a failure.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import type { LoopDevice } from "../support/loop-device.js";
import { readAt } from "../support/device-data.js";
import { rootUnavailableReason, skipOrFail } from "../support/requirements.js";
import { useRootEnv } from "../support/root-env.js";
import { sh, tool } from "../support/tools.js";
import { MiB, SECTOR } from "../support/units.js";

const SUITE = "root linear/striped tests";
const skipReason = rootUnavailableReason(["nbdcopy", "fio"]);
skipOrFail(SUITE, skipReason);

interface Leg {
  loop: LoopDevice;
  /** Start on the loop device, in sectors. */
  offset: number;
}
type Segment =
  { type: "linear"; length: number; leg: Leg } | { type: "striped"; length: number; chunk: number; legs: Leg[] };

function tableText(segments: Segment[]): string {
  let start = 0;
  const lines: string[] = [];
  for (const s of segments) {
    const params =
      s.type === "linear"
        ? `${s.leg.loop.path} ${s.leg.offset}`
        : `${s.legs.length} ${s.chunk} ${s.legs.map((l) => `${l.loop.path} ${l.offset}`).join(" ")}`;
    lines.push(`${start} ${s.length} ${s.type} ${params}`);
    start += s.length;
  }
  return lines.join("\n");
}

const totalSectors = (segments: Segment[]) => segments.reduce((n, s) => n + s.length, 0);

/**
 * Where the table puts each run of sectors: [device sector, length, loop device, loop sector].
 * Striped: chunk c of the segment goes to leg c % n, at chunk ⌊c / n⌋ of that leg's area.
 */
function* mapping(segments: Segment[]): Generator<{ sector: number; sectors: number; loop: LoopDevice; at: number }> {
  let start = 0;
  for (const s of segments) {
    if (s.type === "linear") {
      yield { sector: start, sectors: s.length, loop: s.leg.loop, at: s.leg.offset };
    } else {
      const n = s.legs.length;
      for (let c = 0; c * s.chunk < s.length; c++) {
        const leg = s.legs[c % n]!;
        yield {
          sector: start + c * s.chunk,
          sectors: Math.min(s.chunk, s.length - c * s.chunk),
          loop: leg.loop,
          at: leg.offset + Math.floor(c / n) * s.chunk,
        };
      }
    }
    start += s.length;
  }
}

/** The first run whose bytes in `image` differ from the loop device at its mapped offset. */
function firstMismatch(image: Buffer, segments: Segment[]): string | null {
  const cache = new Map<LoopDevice, Buffer>(); // whole loop devices: a few tens of MiB
  const contents = (loop: LoopDevice) => {
    let b = cache.get(loop);
    if (!b) cache.set(loop, (b = fs.readFileSync(loop.path)));
    return b;
  };
  for (const run of mapping(segments)) {
    const want = contents(run.loop).subarray(run.at * SECTOR, (run.at + run.sectors) * SECTOR);
    const got = image.subarray(run.sector * SECTOR, (run.sector + run.sectors) * SECTOR);
    if (!got.equals(want)) {
      let i = 0;
      while (got[i] === want[i]) i++;
      return `device byte ${run.sector * SECTOR + i} (sector ${run.sector}+${Math.floor(i / SECTOR)}) differs from ${run.loop.path} byte ${run.at * SECTOR + i}`;
    }
  }
  return null;
}

/** Bytes of each loop device that the table does not map, which nothing may have written. */
function unmappedNonZero(segments: Segment[], loops: LoopDevice[]): string[] {
  const problems: string[] = [];
  for (const loop of loops) {
    const used = [...mapping(segments)].filter((r) => r.loop === loop).sort((a, b) => a.at - b.at);
    const size =
      fs.statSync(loop.path).size > 0
        ? fs.statSync(loop.path).size
        : Number(fs.readFileSync(`/sys/block/${path.basename(loop.path)}/size`, "utf8")) * SECTOR;
    let pos = 0;
    const gaps: [number, number][] = [];
    for (const r of used) {
      if (r.at * SECTOR > pos) gaps.push([pos, r.at * SECTOR]);
      pos = Math.max(pos, (r.at + r.sectors) * SECTOR);
    }
    if (pos < size) gaps.push([pos, size]);
    for (const [from, to] of gaps) {
      const data = readAt(loop.path, from, to - from);
      const nz = data.findIndex((b) => b !== 0);
      if (nz >= 0) problems.push(`${loop.path} byte ${from + nz} (outside the table) is not zero`);
    }
  }
  return problems;
}

/** fio job options shared by the write+verify run and the verify_only run over the NBD copy. */
function fioJob(file: string, bytes: number, workload: { rw: string; bs: string }): string[] {
  return [
    "--name=udm-verify",
    `--filename=${file}`,
    `--size=${bytes}`,
    `--rw=${workload.rw}`,
    workload.bs.includes("-") ? `--bsrange=${workload.bs}` : `--bs=${workload.bs}`,
    "--verify=crc32c",
    "--verify_fatal=1",
    "--randrepeat=1",
    "--randseed=20261121",
    "--output-format=json",
  ];
}

describe.skipIf(skipReason !== null)(
  "linear and striped tables over loop devices: fio through attach, read back through NBD",
  () => {
    const env = useRootEnv("striped");

    /**
     * Bind `count` loop devices of `bytes` each, build the table `build(loops)` returns, attach
     * it, run fio with verify=crc32c over the whole device, and check it through NBD and against
     * the loop devices.
     */
    async function runCase(
      count: number,
      bytes: number,
      build: (loops: LoopDevice[]) => Segment[],
      workload: { rw: string; bs: string },
    ) {
      const loops: LoopDevice[] = [];
      for (let i = 0; i < count; i++) loops.push(await env.loop(env.sparseFile(`leg${i}.img`, bytes)));
      const segments = build(loops);
      const sectors = totalSectors(segments);
      const name = env.name("vol");
      await env.startDaemon();
      await env.ok("create", name, "--table", tableText(segments));
      expect((await env.ok("table", name)).trim()).toBe(
        tableText(segments).replace(/\/dev\/loop(\d+)/g, (_, n: string) => `7:${n}`), // block devices print as major:minor
      );
      const { dev } = await env.attach(name);
      expect(fs.readFileSync(`/sys/block/${path.basename(dev)}/size`, "utf8").trim()).toBe(String(sectors));

      // fio writes the whole device, reads it back through the kernel device and checks every block.
      const direct = ["--ioengine=libaio", "--iodepth=16", "--direct=1", "--end_fsync=1"];
      const fio = await tool("fio", [...fioJob(dev, sectors * SECTOR, workload), ...direct], { timeoutMs: 120_000 });
      expect(fio.code, `fio through ${dev}:\n${fio.stderr}${fio.stdout}`).toBe(0);
      const job = (
        JSON.parse(fio.stdout.slice(fio.stdout.indexOf("{"))) as {
          jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[];
        }
      ).jobs[0]!;
      expect(job.error).toBe(0);
      expect(job.write.io_bytes).toBe(sectors * SECTOR); // every byte written once...
      expect(job.read.io_bytes).toBe(sectors * SECTOR); // ...and read back by the verify phase

      // The same data through NBD: a copy of the whole device.
      const image = path.join(env.scratch, "nbd.img");
      await sh("nbdcopy", env.nbdUri(name), image);
      expect(fs.statSync(image).size).toBe(sectors * SECTOR);
      // It holds exactly fio's blocks (fio recomputes the same offsets and checks each checksum)...
      const verify = await tool(
        "fio",
        [...fioJob(image, sectors * SECTOR, workload), "--verify_only", "--ioengine=psync"],
        { timeoutMs: 120_000 },
      );
      expect(verify.code, `fio --verify_only over the NBD copy:\n${verify.stderr}${verify.stdout}`).toBe(0);
      // ...and the loop devices hold them where the table says.
      const data = fs.readFileSync(image);
      expect(firstMismatch(data, segments)).toBeNull();
      expect(unmappedNonZero(segments, loops)).toEqual([]);

      await env.ok("detach", name);
      await env.ok("remove", name);
      expect(await env.stopDaemon()).toBe(0);
      // After the daemon has closed everything, the loop devices still hold the data.
      expect(firstMismatch(data, segments)).toBeNull();
    }

    it("linear: three segments over three loop devices at odd offsets", async () => {
      await runCase(
        3,
        24 * MiB,
        ([a, b, c]) => [
          { type: "linear", length: 32768, leg: { loop: b!, offset: 8192 } }, // 16 MiB from 4 MiB into b
          { type: "linear", length: 16384, leg: { loop: a!, offset: 0 } }, // 8 MiB from the start of a
          { type: "linear", length: 32768, leg: { loop: c!, offset: 1001 } }, // 16 MiB at an odd sector of c
        ],
        { rw: "randwrite", bs: "4k-256k" },
      );
    }, 120_000);

    it("striped: four legs, 64 KiB chunks, legs at different offsets", async () => {
      await runCase(
        4,
        20 * MiB,
        (loops) => [
          {
            type: "striped",
            length: 131072,
            chunk: 128,
            legs: loops.map((loop, i) => ({ loop, offset: [0, 2048, 4096, 8][i]! })),
          },
        ],
        { rw: "randwrite", bs: "4k-256k" },
      );
    }, 120_000);

    it("striped then linear in one table over two loop devices, sequential 12 KiB writes across 8 KiB chunks", async () => {
      await runCase(
        2,
        40 * MiB,
        ([a, b]) => [
          {
            type: "striped",
            length: 65536,
            chunk: 16,
            legs: [
              { loop: a!, offset: 16 },
              { loop: b!, offset: 0 },
            ],
          }, // 32 MiB, 8 KiB chunks
          { type: "linear", length: 32768, leg: { loop: a!, offset: 16 + 32768 } }, // 16 MiB right after a's stripe area
        ],
        { rw: "write", bs: "12k" }, // 48 MiB is a whole number of 12 KiB blocks
      );
    }, 120_000);
  },
);
