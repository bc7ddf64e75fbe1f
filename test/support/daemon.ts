/**
 * Run the built udmd and udmsetup (dist/) the way users do, in a private run directory.
 * `npm test` builds dist/ before the tests run.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterAll, afterEach, beforeAll, beforeEach } from "vitest";

const root = path.resolve(__dirname, "../..");
export const UDMD = path.join(root, "dist/dmsetup/bin/udmd.js");
export const UDMSETUP = path.join(root, "dist/dmsetup/bin/udmsetup.js");

export interface RunningDaemon {
  dir: string;
  proc: ChildProcess;
  stderr: () => string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export function tempDir(prefix = "udm-test-"): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/**
 * Resolves once the control socket accepts connections (or rejects if the daemon exits).
 * `from.udmd`: another installed copy's udmd; `from.cwd`: where plugin package names resolve.
 */
export async function startDaemon(
  dir: string,
  args: string[] = [],
  from: { udmd?: string; cwd?: string } = {},
): Promise<RunningDaemon> {
  const proc = spawn(process.execPath, [from.udmd ?? UDMD, "--run-dir", dir, ...args], {
    cwd: from.cwd,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let err = "";
  let out = "";
  proc.stderr!.on("data", (d) => (err += d));
  proc.stdout!.on("data", (d) => (out += d));
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  // The daemon logs "udmd started" once both sockets listen: wait for that line, not a delay.
  await new Promise<void>((resolve, reject) => {
    const onData = () => {
      if (err.includes('"udmd started"')) {
        proc.stderr!.off("data", onData);
        resolve();
      }
    };
    proc.stderr!.on("data", onData);
    void exited.then((code) => reject(new Error(`udmd exited with ${code}: ${err}${out}`)));
  });
  return {
    dir,
    proc,
    stderr: () => err,
    stop: async (signal = "SIGTERM") => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
}

/**
 * Resolves once the daemon's stderr matches `pattern` (at once if it already does): for log lines
 * written after the event a test waits on, e.g. a refused TLS handshake the client saw first.
 */
export function stderrMatches(daemon: RunningDaemon, pattern: RegExp, timeoutMs = 10_000): Promise<void> {
  if (pattern.test(daemon.stderr())) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const onData = () => {
      if (!pattern.test(daemon.stderr())) return;
      clearTimeout(timer);
      daemon.proc.stderr!.off("data", onData);
      resolve();
    };
    const timer = setTimeout(() => {
      daemon.proc.stderr!.off("data", onData);
      reject(new Error(`udmd's stderr did not match ${pattern} within ${timeoutMs} ms`));
    }, timeoutMs);
    daemon.proc.stderr!.on("data", onData);
  });
}

/** A udmd of the test file's own, with its run directory and a directory for backing files. */
export interface DaemonEnv {
  /** The daemon's run directory. */
  readonly dir: string;
  /** A directory for the test's backing files. */
  readonly files: string;
  /** The daemon started last (it may have been stopped since). */
  readonly daemon: RunningDaemon;
  /** Stop the daemon if it still runs, and start a new one on the same run directory. */
  restart(args?: string[]): Promise<RunningDaemon>;
}

/**
 * Register hooks that give every test (`per: "test"`, the default) or the whole file (`per:
 * "file"`) a fresh run directory, a files directory named `filesPrefix...` and a udmd started with
 * `args`; afterwards the daemon is stopped and both directories removed. Register it before the
 * file's own hooks: they then run after the daemon started and, when ending, before it stops.
 */
export function useDaemon(filesPrefix: string, opts: { args?: string[]; per?: "test" | "file" } = {}): DaemonEnv {
  let dir: string | undefined;
  let files: string | undefined;
  let daemon: RunningDaemon | undefined;
  const started = <T>(value: T | undefined): T => {
    if (value === undefined) throw new Error("useDaemon: the daemon is not set up (used outside a test?)");
    return value;
  };
  const env: DaemonEnv = {
    get dir() {
      return started(dir);
    },
    get files() {
      return started(files);
    },
    get daemon() {
      return started(daemon);
    },
    async restart(args = opts.args ?? []) {
      await daemon?.stop();
      daemon = await startDaemon(started(dir), args);
      return daemon;
    },
  };
  const [before, after] = opts.per === "file" ? [beforeAll, afterAll] : [beforeEach, afterEach];
  before(async () => {
    dir = tempDir();
    files = tempDir(filesPrefix);
    daemon = await startDaemon(dir, opts.args ?? []);
  });
  after(async () => {
    await daemon?.stop();
    daemon = undefined;
    for (const d of [dir, files]) if (d) fs.rmSync(d, { recursive: true, force: true });
    dir = files = undefined;
  });
  return env;
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function udmsetup(dir: string, args: string[], stdin?: string, env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = execFile(
      process.execPath,
      [UDMSETUP, "--run-dir", dir, "--no-autostart", ...args],
      { env: { ...process.env, LANG: "C.UTF-8", ...env } },
      (error, stdout, stderr) =>
        resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
    if (stdin !== undefined) child.stdin!.end(stdin);
    else child.stdin!.end();
  });
}

export function connectUnix(p: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(p, () => resolve(s));
    s.once("error", reject);
  });
}
