/**
 * Reaching the daemon: connect to the run directory's control socket, starting udmd in the
 * background when nobody answers (unless --no-autostart), logging to $UDM_RUN_DIR/udmd.log.
 */
import { type ChildProcess, spawn } from "node:child_process";
import fs from "node:fs";
import { fileURLToPath } from "node:url";
import { ControlClient } from "../control/client.js";
import { checkRunDir, ensureRunDir, type RunPaths } from "../daemon/run-dir.js";

const NO_DAEMON = new Set(["ENOENT", "ECONNREFUSED"]);

/** No udmd answers (errno: ECONNREFUSED), or the one started exited or hung (ESRCH, ETIMEDOUT). */
export class NoDaemonError extends Error {
  constructor(
    message: string,
    readonly errno = "ECONNREFUSED",
  ) {
    super(message);
  }
}

export async function connectDaemon(paths: RunPaths, opts: { autostart: boolean }): Promise<ControlClient> {
  checkRunDir(paths.dir); // before talking to whatever answers there
  try {
    return await ControlClient.connect(paths.control);
  } catch (err) {
    if (!NO_DAEMON.has((err as NodeJS.ErrnoException).code ?? "")) throw err;
    if (!opts.autostart)
      throw new NoDaemonError(
        `no udmd answers on ${paths.control} (start one with \`udmsetup daemon\`, or drop --no-autostart)`,
      );
  }
  return waitForDaemon(paths, startDaemon(paths));
}

/** A udmd started in the background: its process, and where its part of the log begins. */
export interface StartedDaemon {
  child: ChildProcess;
  logOffset: number;
}

/** Start udmd detached (with `args`, udmd's options), its output appended to the run directory's log. */
export function startDaemon(paths: RunPaths, args: readonly string[] = []): StartedDaemon {
  ensureRunDir(paths.dir);
  const log = fs.openSync(paths.log, "a", 0o600);
  const logOffset = fs.fstatSync(log).size;
  const udmd = fileURLToPath(new URL("../bin/udmd.js", import.meta.url));
  const child = spawn(process.execPath, [udmd, "--run-dir", paths.dir, ...args], {
    detached: true,
    stdio: ["ignore", log, log],
  });
  child.unref();
  fs.closeSync(log);
  return { child, logOffset };
}

/** What the daemon wrote to the log since it started: its reason when it exits at once. */
function logSince(paths: RunPaths, offset: number): string {
  try {
    return fs.readFileSync(paths.log).subarray(offset).toString("utf8").trim();
  } catch {
    return "";
  }
}

/**
 * Poll the control socket until the new daemon accepts. A daemon that exits first (another one
 * holds the run directory, a plugin failed) is reported with what it logged; one that neither
 * exits nor answers is given up after 10 s.
 */
export async function waitForDaemon(paths: RunPaths, started: StartedDaemon): Promise<ControlClient> {
  let exitCode: number | null | undefined;
  started.child.once("exit", (code, signal) => (exitCode = code ?? (signal ? 128 : null)));
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      return await ControlClient.connect(paths.control);
    } catch (err) {
      if (exitCode !== undefined) {
        const said = logSince(paths, started.logOffset);
        throw new NoDaemonError(
          `udmd exited with status ${exitCode} before it answered${said ? `: ${said}` : ` (see ${paths.log})`}`,
          "ESRCH",
        );
      }
      if (Date.now() > deadline) {
        throw new NoDaemonError(
          `udmd did not start within 10 s (see ${paths.log}): ${(err as Error).message}`,
          "ETIMEDOUT",
        );
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
