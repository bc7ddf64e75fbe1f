/**
 * Running one fio job and reading its JSON report (bench/matrix.ts). The job options are the same
 * for every target; only the engine part differs: fio's nbd ioengine with the server's URI, or
 * psync / libaio on the data file itself for the raw baselines.
 */
import { execFile } from "node:child_process";
import fs from "node:fs";
import { MiB } from "./format.js";

/** Where fio sends the I/O. */
export type FioTarget = { engine: "nbd"; uri: string } | { engine: "psync" | "libaio"; file: string; direct: boolean };

export interface FioJob {
  name: string;
  rw: "read" | "write" | "randread" | "randwrite";
  blockSize: number;
  iodepth: number;
  /** Run for this long (time_based), or, when absent, one pass over the whole device. */
  runtimeMs?: number;
  /** Sequential I/O with holes: bytes skipped after each I/O (fio's rw=write:N). */
  skip?: number;
  /** Stop after this many I/Os (fio's number_ios). */
  numberIos?: number;
}

export interface FioResult {
  ios: number;
  bytes: number;
  seconds: number;
  mibps: number;
  iops: number;
  /** fio's own CPU (user + system), percent of one core. */
  clientCpu: number;
}

/** The command-line options of `job` on `target` (without the output options). */
export function fioArgs(target: FioTarget, job: FioJob): string[] {
  const args = [
    `--name=${job.name}`,
    `--rw=${job.rw}${job.skip ? `:${job.skip}` : ""}`,
    `--bs=${job.blockSize}`,
    `--iodepth=${job.iodepth}`,
    "--numjobs=1",
  ];
  if (job.runtimeMs !== undefined) {
    // Time-based runs wrap around; the random map only costs the client CPU there.
    args.push("--time_based", `--runtime=${Math.max(1, Math.round(job.runtimeMs))}ms`);
    if (job.rw.startsWith("rand")) args.push("--norandommap");
  }
  if (job.numberIos !== undefined) args.push(`--number_ios=${job.numberIos}`);
  // A pass (no runtime) keeps fio's random map: every block exactly once, in a seeded random order.
  if (target.engine === "nbd") args.push("--ioengine=nbd", `--uri=${target.uri}`);
  else
    args.push(
      `--ioengine=${target.engine}`,
      `--filename=${target.file}`,
      `--direct=${target.direct ? 1 : 0}`,
      "--allow_file_create=0",
    );
  return args;
}

/** Run `job` on `target`; `scratch` is a path for fio's JSON report. */
export function runFio(target: FioTarget, job: FioJob, scratch: string): Promise<FioResult> {
  const args = [...fioArgs(target, job), "--output-format=json", `--output=${scratch}`];
  return new Promise((resolve, reject) => {
    execFile("fio", args, { encoding: "utf8", maxBuffer: 16 * MiB, timeout: 3_600_000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`fio ${args.join(" ")} failed: ${err.message}\n${stderr}${stdout}`));
      try {
        resolve(parseFioJson(fs.readFileSync(scratch, "utf8"), job.rw.endsWith("read") ? "read" : "write"));
      } catch (e) {
        reject(new Error(`fio ${args.join(" ")}: ${(e as Error).message}\n${stderr}`));
      }
    });
  });
}

interface FioJson {
  jobs: {
    error: number;
    usr_cpu: number;
    sys_cpu: number;
    read: { io_bytes: number; total_ios: number; runtime: number };
    write: { io_bytes: number; total_ios: number; runtime: number };
  }[];
}

export function parseFioJson(text: string, dir: "read" | "write"): FioResult {
  // Some engines print a line (e.g. "fio: connected to NBD server") before the JSON.
  const json = JSON.parse(text.slice(text.indexOf("{"))) as FioJson;
  const job = json.jobs[0];
  if (!job) throw new Error("no job in fio's report");
  if (job.error) throw new Error(`fio job error ${job.error}`);
  const side = job[dir];
  const seconds = side.runtime / 1000;
  if (!(side.io_bytes > 0 && seconds > 0))
    throw new Error(`fio moved no data (${side.io_bytes} bytes in ${side.runtime} ms)`);
  return {
    ios: side.total_ios,
    bytes: side.io_bytes,
    seconds,
    mibps: side.io_bytes / MiB / seconds,
    iops: side.total_ios / seconds,
    clientCpu: job.usr_cpu + job.sys_cpu,
  };
}
