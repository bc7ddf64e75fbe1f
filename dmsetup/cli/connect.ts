/**
 * Reaching the daemon: connect to the run directory's control socket, starting udmd in the
 * background when nobody answers (unless --no-autostart), logging to $UDM_RUN_DIR/udmd.log.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import { fileURLToPath } from "node:url";
import { ControlClient } from "../control/client.js";
import { ensureRunDir, type RunPaths } from "../daemon/run-dir.js";

const NO_DAEMON = new Set(["ENOENT", "ECONNREFUSED"]);

export class NoDaemonError extends Error {}

export async function connectDaemon(paths: RunPaths, opts: { autostart: boolean }): Promise<ControlClient> {
  try {
    return await ControlClient.connect(paths.control);
  } catch (err) {
    if (!NO_DAEMON.has((err as NodeJS.ErrnoException).code ?? "")) throw err;
    if (!opts.autostart) throw new NoDaemonError(`no udmd answers on ${paths.control} (start one with \`udmsetup daemon\`, or drop --no-autostart)`);
  }
  startDaemon(paths);
  return waitForDaemon(paths);
}

/** Start udmd detached, its output in the run directory's log. */
export function startDaemon(paths: RunPaths): void {
  ensureRunDir(paths.dir);
  const log = fs.openSync(paths.log, "a", 0o600);
  const udmd = fileURLToPath(new URL("../bin/udmd.js", import.meta.url));
  const child = spawn(process.execPath, [udmd, "--run-dir", paths.dir], {
    detached: true,
    stdio: ["ignore", log, log],
  });
  child.unref();
  fs.closeSync(log);
}

/**
 * Poll the control socket until the new daemon accepts. The daemon gives no other signal we can
 * wait on; give up after 10 s and point at the log.
 */
async function waitForDaemon(paths: RunPaths): Promise<ControlClient> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      return await ControlClient.connect(paths.control);
    } catch (err) {
      if (Date.now() > deadline) {
        throw new NoDaemonError(`udmd did not start within 10 s (see ${paths.log}): ${(err as Error).message}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
