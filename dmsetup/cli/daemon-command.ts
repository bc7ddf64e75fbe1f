/**
 * `udmsetup daemon [--foreground] [UDMD_OPTION...]` and `udmsetup daemon stop`.
 *
 * udmd's options pass through as they are (no `--` needed); they are checked with udmd's own
 * option table first, so a typo fails here, before anything starts. In the background udmsetup
 * returns once the new udmd answers on its control socket (or says why it exited); in the
 * foreground it runs udmd attached to the terminal and returns its exit status.
 *
 * `stop` finds the udmd holding the run directory's lock (flock(2) on udmd.lock, as the kernel's
 * /proc/locks names its holder), sends it SIGTERM (udmd's clean stop: I/O flushed, devices
 * removed, sockets and pid file gone) and waits until it has exited.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { ControlClient } from "../control/client.js";
import { checkRunDir, type RunPaths, runPaths } from "../daemon/run-dir.js";
import { UDMD_OPTIONS } from "../daemon/udmd-options.js";
import { CommandFailed, type Io } from "./commands.js";
import { startDaemon, waitForDaemon } from "./connect.js";
import { UsageError } from "./options.js";

/** How long `daemon stop` waits for udmd to finish its shutdown (systemd's default TimeoutStopSec). */
export const STOP_TIMEOUT_MS = 90_000;

export interface DaemonCommand {
  kind: "start" | "stop";
  /** udmd's arguments, as given (start). */
  udmdArgs: string[];
  foreground: boolean;
  /** --help among udmd's options: udmsetup prints the daemon command's help. */
  help: boolean;
  /** The run directory: udmd's own --run-dir among its arguments, else udmsetup's. */
  paths: RunPaths;
}

/** Check `daemon`'s arguments (udmd's options, or `stop`) without starting anything. */
export function parseDaemonCommand(args: string[], runDir: string): DaemonCommand {
  if (args[0] === "stop") {
    if (args.length > 1) throw new UsageError("Incorrect number of arguments.");
    return { kind: "stop", udmdArgs: [], foreground: false, help: false, paths: runPaths(runDir) };
  }
  let values;
  try {
    ({ values } = parseArgs({ args, options: UDMD_OPTIONS, strict: true, allowPositionals: false }));
  } catch (err) {
    const message = (err as Error).message;
    // A word that is not an option: a sub-command udmsetup does not know.
    if ((err as { code?: string }).code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL")
      throw new UsageError(`daemon: unknown sub-command or argument: ${message.replace(/^.*?'(.*)'.*$/s, "$1")}`);
    throw new UsageError(`udmd: ${message}`);
  }
  return {
    kind: "start",
    udmdArgs: args,
    foreground: values.foreground ?? false,
    help: values.help ?? false,
    paths: runPaths(values["run-dir"] ?? runDir),
  };
}

/** Start udmd in the background and wait until it answers; print nothing unless -v. */
export async function startInBackground(cmd: DaemonCommand, io: Io, verbose: boolean): Promise<void> {
  const running = udmdHolding(cmd.paths);
  if (running !== null) {
    const message = `udmd is already running on ${cmd.paths.dir} (pid ${running})`;
    io.err(`${message}\n`);
    throw new CommandFailed(message, "EEXIST");
  }
  const started = startDaemon(cmd.paths, cmd.udmdArgs);
  const client = await waitForDaemon(cmd.paths, started);
  client.close();
  if (verbose) io.out(`udmd (pid ${started.child.pid}) is running on ${cmd.paths.dir}, logging to ${cmd.paths.log}\n`);
}

/**
 * Run udmd attached to this terminal until it exits; its exit status (128 + N for a signal). A
 * terminal's Ctrl-C reaches udmd itself (same process group), which stops cleanly; udmsetup waits.
 */
export function runInForeground(cmd: DaemonCommand): Promise<number> {
  const udmd = fileURLToPath(new URL("../bin/udmd.js", import.meta.url));
  const child = spawn(process.execPath, [udmd, "--run-dir", cmd.paths.dir, ...cmd.udmdArgs], { stdio: "inherit" });
  const forward = (signal: NodeJS.Signals) => () => void child.kill(signal);
  const handlers: [NodeJS.Signals, () => void][] = [
    ["SIGINT", () => {}], // the terminal sent it to udmd too
    ["SIGTERM", forward("SIGTERM")],
    ["SIGHUP", forward("SIGHUP")],
  ];
  for (const [signal, handler] of handlers) process.on(signal, handler);
  return new Promise((resolve) => {
    child.once("exit", (code, signal) => {
      for (const [s, handler] of handlers) process.off(s, handler);
      resolve(code ?? 128 + (signal ? os.constants.signals[signal] : 0));
    });
  });
}

/** `daemon stop`: SIGTERM to the run directory's udmd, then wait until it has exited. */
export async function stopDaemon(cmd: DaemonCommand, io: Io, timeoutMs = STOP_TIMEOUT_MS): Promise<void> {
  const { paths } = cmd;
  checkRunDir(paths.dir);
  const fail = (message: string, errno: string): never => {
    io.err(`${message}\n`);
    throw new CommandFailed(message, errno);
  };
  const pid = udmdHolding(paths);
  if (pid === null) {
    // A daemon answering without the lock cannot be: say what is there instead.
    const answering = await ControlClient.connect(paths.control).then(
      (c) => (c.close(), true),
      () => false,
    );
    return fail(
      answering
        ? `something answers on ${paths.control} but no udmd holds ${paths.lock}; not stopping it`
        : `no udmd is running on ${paths.dir}`,
      answering ? "EBUSY" : "ESRCH",
    );
  }
  try {
    process.kill(pid, "SIGTERM");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? "EPERM";
    if (code !== "ESRCH") fail(`cannot stop udmd (pid ${pid}) on ${paths.dir}: ${(err as Error).message}`, code);
  }
  const deadline = Date.now() + timeoutMs;
  while (alive(pid)) {
    if (Date.now() > deadline) {
      fail(`udmd (pid ${pid}) is still stopping after ${timeoutMs / 1000} s; see ${paths.log}`, "ETIMEDOUT");
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * The pid of the udmd holding the run directory's lock, or null when none does. The kernel names
 * the holder of a flock(2) lock in /proc/locks; a holder that is not a udmd (a test holding the lock,
 * a reused pid) is not taken for one. Without /proc/locks, the pid file, if that process is a udmd.
 */
export function udmdHolding(paths: RunPaths): number | null {
  const st = fs.statSync(paths.lock, { throwIfNoEntry: false, bigint: true });
  if (!st) return null;
  let locks: string;
  try {
    locks = fs.readFileSync("/proc/locks", "utf8");
  } catch {
    let pid = 0;
    try {
      pid = Number(fs.readFileSync(paths.pid, "utf8").trim()) || 0;
    } catch {
      // no pid file: no daemon
    }
    return pid > 0 && isUdmd(pid) ? pid : null;
  }
  // glibc's dev_t; /proc/locks prints the major and minor in hex.
  const major = Number(((st.dev >> 8n) & 0xfffn) | ((st.dev >> 32n) & ~0xfffn));
  const minor = Number((st.dev & 0xffn) | ((st.dev >> 12n) & ~0xffn));
  let holder: number | null = null;
  for (const line of locks.split("\n")) {
    // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF" (blocked waiters have "->" and are skipped)
    const m = /^\d+:\s+FLOCK\s+\S+\s+WRITE\s+(\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s/.exec(line);
    if (m && BigInt(m[4]!) === st.ino && parseInt(m[2]!, 16) === major && parseInt(m[3]!, 16) === minor) {
      holder = Number(m[1]);
      break;
    }
  }
  return holder !== null && isUdmd(holder) ? holder : null;
}

function isUdmd(pid: number): boolean {
  try {
    const argv = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
    return argv.some((a) => /(^|\/)udmd(\.js)?$/.test(a));
  } catch {
    return false;
  }
}

/** The process exists and is not a zombie (one its parent has not reaped yet has exited). */
function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.replace(/^.*\) /s, "")[0] !== "Z";
  } catch {
    return false;
  }
}
