/**
 * `npm run bench -- --attach` (root): throughput through the attached kernel device (udmd
 * --auto-attach: nbdfuse + a loop device here), sequential and random, with fio on the block
 * device (libaio, O_DIRECT), against two references measured in the same run:
 *
 * - raw: fio on the backing file itself (O_DIRECT), what the hardware gives;
 * - buffered loop: the same attachment with the loop device switched to buffered I/O on nbdfuse's
 *   file (`losetup --direct-io=off`), which is how attach worked before issue 14. Its reads come
 *   from the FUSE page cache, not through udm's table, which is why attach no longer does it:
 *   its read figures are the cost of being wrong, not a target.
 *
 * The linear device maps the whole backing file; every job writes and reads that file, so the
 * reads of the first two configurations go through the host's page cache of the backing file
 * (udm's FileDevice does buffered I/O) as they would in use.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { type FioJob, type FioResult, runFio } from "./fio.js";
import { fmt, markdownTable, MiB } from "./format.js";
import { startUdmd } from "./servers.js";

export interface AttachBenchOptions {
  /** Backing file size (default 1 GiB). */
  fileBytes?: number;
  /** Seconds per job (default 5). */
  seconds?: number;
  /** Directory for the backing file (default /var/tmp: not tmpfs). */
  dir?: string;
}

const JOBS: Omit<FioJob, "runtimeMs">[] = [
  { name: "sequential write 1 MiB", rw: "write", blockSize: MiB, iodepth: 16 },
  { name: "sequential read 1 MiB", rw: "read", blockSize: MiB, iodepth: 16 },
  { name: "random write 4 KiB", rw: "randwrite", blockSize: 4096, iodepth: 16 },
  { name: "random read 4 KiB", rw: "randread", blockSize: 4096, iodepth: 16 },
];

type Config = "raw" | "attach (direct I/O)" | "attach (buffered loop, before)";

/** Why the attach benchmark cannot run here, or null. */
export function attachBenchUnavailableReason(): string | null {
  if (process.getuid?.() !== 0) return "needs root (loop devices, FUSE)";
  for (const t of ["fio", "nbdfuse", "losetup"])
    try {
      execFileSync("which", [t], { stdio: "ignore" });
    } catch {
      return `${t} is not installed`;
    }
  return null;
}

export async function runAttachBench(opts: AttachBenchOptions = {}, log: (line: string) => void): Promise<string> {
  const fileBytes = opts.fileBytes ?? 1024 * MiB;
  const runtimeMs = (opts.seconds ?? 5) * 1000;
  const work = fs.mkdtempSync(path.join(opts.dir ?? "/var/tmp", "udm-bench-attach-"));
  const img = path.join(work, "disk.img");
  const scratch = path.join(work, "fio.json");
  const devDir = path.join(work, "dev");
  fs.writeFileSync(img, "");
  fs.truncateSync(img, fileBytes);
  const results = new Map<Config, FioResult[]>();
  const udmd = await startUdmd(path.join(work, "run"), {
    args: ["--auto-attach", "--dev-dir", devDir, "--no-restore"],
  });
  try {
    const run = async (config: Config, file: string) => {
      const rows: FioResult[] = [];
      for (const job of JOBS) {
        const r = await runFio({ engine: "libaio", file, direct: true }, { ...job, runtimeMs }, scratch);
        log(`${config}: ${job.name}: ${fmt(r.mibps)} MiB/s, ${fmt(r.iops, 0)} IOPS`);
        rows.push(r);
      }
      results.set(config, rows);
    };
    await run("raw", img);
    await udmd.control.request("create", {
      name: "bench",
      table: [{ start: 0, length: fileBytes / 512, type: "linear", params: `${img} 0` }],
    });
    const dev = fs.readlinkSync(path.join(devDir, "bench"));
    await run("attach (direct I/O)", dev);
    execFileSync("losetup", ["--direct-io=off", dev]);
    await run("attach (buffered loop, before)", dev);
    await udmd.control.request("remove", { name: "bench" });
  } finally {
    await udmd.stop();
    fs.rmSync(work, { recursive: true, force: true });
  }
  return report(results, fileBytes, runtimeMs);
}

function report(results: Map<Config, FioResult[]>, fileBytes: number, runtimeMs: number): string {
  const raw = results.get("raw")!;
  const header = ["workload", ...[...results.keys()].map((c) => `${c} MiB/s`), "direct / raw", "direct / buffered"];
  const rows = JOBS.map((job, i) => {
    const direct = results.get("attach (direct I/O)")![i]!.mibps;
    const buffered = results.get("attach (buffered loop, before)")![i]!.mibps;
    return [
      job.name,
      ...[...results.values()].map((r) => fmt(r[i]!.mibps)),
      fmt(direct / raw[i]!.mibps, 2),
      fmt(direct / buffered, 2),
    ];
  });
  const title =
    `Attach throughput (fio libaio O_DIRECT, queue depth 16, ${runtimeMs / 1000} s per job, ` +
    `${fileBytes / MiB} MiB backing file, ${os.cpus().length} cores)`;
  return `${title}\n\n${markdownTable(header, rows, new Set([1, 2, 3, 4, 5]))}\n`;
}
