/**
 * Captive mode (`udmd --run CMD`, after nbdkit's --run): the daemon starts, creates the devices
 * named on the command line, runs CMD through the shell with the connection details in its
 * environment, and when CMD exits removes everything and exits with CMD's status. Scripts and
 * test suites get a daemon whose lifetime is exactly theirs, with nothing left behind.
 *
 * CMD's environment: `uri` (the first device's NBD URI), `socket` (the NBD unix socket),
 * `UDM_RUN_DIR` (so `udmsetup` inside talks to this daemon), and `uri_NAME` for every device
 * whose name is a shell identifier.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import { parseTableText } from "../../core/table-text.js";
import { ControlClient } from "../control/client.js";
import type { Daemon } from "./daemon.js";

export interface CaptiveDevice {
  name: string;
  /** A table file in dmsetup's format (what `udmsetup create NAME FILE` reads). */
  tableFile: string;
}

/** `NAME=TABLE_FILE`, as --device takes it. */
export function parseCaptiveDevice(text: string): CaptiveDevice {
  const eq = text.indexOf("=");
  if (eq <= 0 || eq === text.length - 1) throw new Error(`--device: expected NAME=TABLE_FILE, got '${text}'`);
  return { name: text.slice(0, eq), tableFile: text.slice(eq + 1) };
}

/**
 * Create `devices` (loaded and resumed) through the daemon's control socket, as `udmsetup create`
 * would (so auto-attach and the device state see them); a failure removes the ones made before it.
 */
export async function createCaptiveDevices(daemon: Daemon, devices: CaptiveDevice[]): Promise<void> {
  const client = await ControlClient.connect(daemon.controlSocket);
  const made: string[] = [];
  try {
    for (const d of devices) {
      let text: string;
      try {
        text = fs.readFileSync(d.tableFile, "utf8");
      } catch (err) {
        throw new Error(`--device ${d.name}: ${(err as Error).message}`, { cause: err });
      }
      await client.request("create", { name: d.name, table: parseTableText(text, d.tableFile) });
      made.push(d.name);
    }
  } catch (err) {
    for (const name of made.reverse()) await client.request("remove", { name, force: true }).catch(() => undefined);
    throw err;
  } finally {
    client.close();
  }
}

/** The environment CMD runs with. */
export function captiveEnv(daemon: Daemon, devices: CaptiveDevice[]): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, socket: daemon.nbdSocket, UDM_RUN_DIR: daemon.opts.paths.dir };
  if (devices[0]) env.uri = daemon.nbdUri(devices[0].name);
  for (const d of devices) if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(d.name)) env[`uri_${d.name}`] = daemon.nbdUri(d.name);
  return env;
}

/**
 * Run `command` with `sh -c`, stdio inherited; resolves with its exit status as a shell reports
 * it (128 + the signal number when a signal ended it).
 */
export function runCaptive(command: string, env: NodeJS.ProcessEnv): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn("/bin/sh", ["-c", command], { stdio: "inherit", env });
    child.once("error", () => resolve(127));
    child.once("exit", (code, signal) => {
      if (code !== null) resolve(code);
      else resolve(128 + (signal ? os.constants.signals[signal] : 0));
    });
  });
}
