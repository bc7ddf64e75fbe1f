/**
 * Helpers around a running udmd for the fuzz, soak and crash tests: the CLI steps users take
 * (docs/snapshot.md's snapshot sequence), a control connection, the daemon's state as the control
 * protocol reports it, its RSS, and its TCP NBD port.
 */
import fs from "node:fs";
import path from "node:path";
import { expect } from "vitest";
import { ControlClient } from "../../dmsetup/control/client.js";
import { type RunningDaemon, udmsetup } from "./daemon.js";

/** udmsetup, expecting success with nothing on stderr; returns stdout. */
export async function cli(dir: string, ...args: string[]): Promise<string> {
  const r = await udmsetup(dir, args);
  expect(r.stderr, `udmsetup ${args.join(" ")}`).toBe("");
  expect(r.code, `udmsetup ${args.join(" ")}`).toBe(0);
  return r.stdout;
}

/** The documented way to take a snapshot of a live origin: suspend, create, resume. */
export async function createSnapshot(dir: string, origin: string, name: string, table: string): Promise<void> {
  await cli(dir, "suspend", origin);
  try {
    await cli(dir, "create", name, "--table", table);
  } finally {
    await cli(dir, "resume", origin);
  }
}

export function control(dir: string): Promise<ControlClient> {
  return ControlClient.connect(path.join(dir, "control"));
}

/** A file of `size` bytes: zeros (sparse), or the given content. */
export function makeFile(file: string, content: number | Buffer): string {
  if (typeof content === "number") {
    fs.writeFileSync(file, "");
    fs.truncateSync(file, content);
  } else {
    fs.writeFileSync(file, content);
  }
  return file;
}

export interface DeviceState {
  info: unknown;
  table: unknown;
  inactiveTable: unknown;
  status: unknown;
}

/** Everything the control protocol says about every device, for before/after comparisons. */
export async function daemonState(client: ControlClient): Promise<Record<string, DeviceState>> {
  const list = (await client.request("list", {})) as { name: string }[];
  const state: Record<string, DeviceState> = {};
  for (const { name } of list) {
    const info = (await client.request("info", { name })) as { livePresent: boolean; inactivePresent: boolean };
    state[name] = {
      info,
      table: info.livePresent ? await client.request("table", { name }) : null,
      inactiveTable: info.inactivePresent ? await client.request("table", { name, inactive: true }) : null,
      status: info.livePresent ? await client.request("status", { name }) : null,
    };
  }
  return state;
}

/** Resident set size of a process in KiB (VmRSS in /proc/PID/status). */
export function rssKiB(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"));
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]);
}

/** The port of `--nbd-listen 127.0.0.1:0`, from the daemon's "nbd server listening" log line. */
export function nbdTcpPort(daemon: RunningDaemon): number {
  for (const line of daemon.stderr().split("\n")) {
    if (!line.includes('"nbd server listening"')) continue;
    const rec = JSON.parse(line) as { port?: number };
    if (rec.port) return rec.port;
  }
  throw new Error("udmd logged no TCP listener");
}

/** The daemon process is still there (not exited, not a zombie we have reaped). */
export function alive(daemon: RunningDaemon): boolean {
  return daemon.proc.exitCode === null && daemon.proc.signalCode === null;
}
