/**
 * The NBD servers of the benchmark matrix (bench/matrix.ts) as child processes of this one:
 * nbdkit, qemu-nbd and the built udmd (dist/dmsetup/bin/udmd.js), each on a unix socket, plus what the
 * matrix reads about them: CPU time from /proc/PID/stat and the files they have open.
 *
 * Every process started here is stopped by its own handle (its pid), never by name.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { ControlClient } from "../dmsetup/control/client.js";
import type { ConfigInstance } from "./matrix.js";

export const ROOT = path.join(import.meta.dirname, "..");
export const UDMD = path.join(ROOT, "dist/dmsetup/bin/udmd.js");

/** Clock ticks per second of /proc/PID/stat's utime and stime. */
export const CLK_TCK = (() => {
  try {
    const n = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim());
    return n > 0 ? n : 100;
  } catch {
    return 100;
  }
})();

/** CPU seconds (user + system, all threads) a process has used so far, from /proc/PID/stat. */
export function cpuSeconds(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  // Fields after "(comm)": state is field 3, utime 14, stime 15.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}

/** fdatasync every regular file `pid` has open (through /proc/PID/fd, so unlinked overlays too). */
export function syncOpenFiles(pid: number): void {
  let fds: string[];
  try {
    fds = fs.readdirSync(`/proc/${pid}/fd`);
  } catch {
    return;
  }
  for (const n of fds) {
    const link = `/proc/${pid}/fd/${n}`;
    try {
      if (!fs.statSync(link).isFile()) continue;
      const fd = fs.openSync(link, "r");
      try {
        fs.fdatasyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    } catch {
      // closed meanwhile, or not ours to open: nothing to sync
    }
  }
}

export function syncFile(file: string): void {
  const fd = fs.openSync(file, "r");
  try {
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export interface Server {
  readonly name: string;
  readonly pid: number;
  /** The NBD URI of the export fio's nbd engine connects to. */
  uri(exportName?: string): string;
  /** The last part of the server's stderr (for error messages). */
  stderr(): string;
  stop(): Promise<void>;
}

/** Connect to a unix socket and hang up. */
function probe(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection(socket);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** util-linux's setpriv, when it can set a parent-death signal (it execs the command: same pid). */
const SETPRIV = (() => {
  try {
    return execFileSync("setpriv", ["--help"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).includes(
      "--pdeathsig",
    );
  } catch {
    return false;
  }
})();

/** Children still running: stopped when this process exits, whatever the way. */
const live = new Set<ChildProcess>();
let exitHook = false;

/**
 * Spawn a server that cannot outlive this process: killed on exit, and (through setpriv
 * --pdeathsig) when this process dies without running exit handlers, e.g. a test worker torn down
 * mid-run. qemu-nbd and udmd have no --exit-with-parent of their own.
 */
function spawnServer(cmd: string, args: string[], env?: NodeJS.ProcessEnv): ChildProcess {
  if (!exitHook) {
    exitHook = true;
    process.once("exit", () => {
      for (const child of live) child.kill("SIGKILL");
    });
  }
  const [file, argv] = SETPRIV ? ["setpriv", ["--pdeathsig", "SIGKILL", "--", cmd, ...args]] : [cmd, args];
  const proc = spawn(file, argv, { stdio: ["ignore", "pipe", "pipe"], env: env ?? process.env });
  live.add(proc);
  proc.once("exit", () => live.delete(proc));
  return proc;
}

/** A child process with its stderr kept (the last 64 KiB) and a stop() that waits for the exit. */
function track(name: string, proc: ChildProcess) {
  let err = "";
  proc.stderr?.on("data", (d: Buffer) => {
    err = (err + d.toString()).slice(-65536);
  });
  proc.stdout?.on("data", () => undefined);
  const exited = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
  proc.once("error", (e) => {
    err += `\n${e.message}`;
  });
  const alive = () => proc.exitCode === null && proc.signalCode === null;
  const stop = async () => {
    if (alive()) proc.kill("SIGTERM");
    const timer = setTimeout(() => alive() && proc.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  };
  return { stderr: () => err, alive, exited, stop, pid: () => proc.pid ?? -1, name };
}

/** Wait until `socket` accepts connections; throws if the process exits or 15 s pass. */
async function waitForSocket(t: ReturnType<typeof track>, socket: string): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline) {
    if (!t.alive()) throw new Error(`${t.name} exited before listening on ${socket}: ${t.stderr().trim()}`);
    if (fs.existsSync(socket) && (await probe(socket))) return;
    await sleep(20);
  }
  await t.stop();
  throw new Error(`${t.name} did not listen on ${socket} within 15 s: ${t.stderr().trim()}`);
}

function unixUri(socket: string, exportName = ""): string {
  return `nbd+unix:///${exportName}?socket=${socket}`;
}

/** nbdkit in the foreground on `socket`, e.g. args ["file", "data.bin"] or ["--filter=cow", "file", ...]. */
export async function startNbdkit(socket: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<Server> {
  fs.rmSync(socket, { force: true });
  const proc = spawnServer("nbdkit", ["--foreground", "--exit-with-parent", "--unix", socket, ...args], {
    ...process.env,
    ...env,
  });
  const t = track("nbdkit", proc);
  await waitForSocket(t, socket);
  return { name: "nbdkit", pid: t.pid(), uri: () => unixUri(socket), stderr: t.stderr, stop: t.stop };
}

/** qemu-nbd (persistent: it outlives each client) on `socket`, e.g. args ["-f", "raw", "data.bin"]. */
export async function startQemuNbd(socket: string, args: string[]): Promise<Server> {
  fs.rmSync(socket, { force: true });
  const proc = spawnServer("qemu-nbd", ["--socket", socket, "--persistent", "--shared=4", ...args]);
  const t = track("qemu-nbd", proc);
  await waitForSocket(t, socket);
  return { name: "qemu-nbd", pid: t.pid(), uri: () => unixUri(socket), stderr: t.stderr, stop: t.stop };
}

export interface Udmd extends Server {
  readonly runDir: string;
  readonly control: ControlClient;
}

/**
 * The built udmd (dist/, or `udmd`: another checkout's udmd.js for a before/after run) on
 * `runDir`, run by this Node, as users run it, with `args` added (tuning flags such as
 * --no-write-plug). With `profileDir` it is started with `node --cpu-prof`, and writes its profile
 * there when stopped.
 */
export async function startUdmd(
  runDir: string,
  opts: { udmd?: string; args?: string[]; profileDir?: string; profileName?: string } = {},
): Promise<Udmd> {
  const udmd = opts.udmd ?? UDMD;
  if (!fs.existsSync(udmd))
    throw new Error(
      `${path.relative(process.cwd(), udmd)} is missing: build udm first (npx tsc -p tsconfig.build.json)`,
    );
  fs.mkdirSync(runDir, { recursive: true, mode: 0o700 });
  const prof = opts.profileDir
    ? [
        "--cpu-prof",
        `--cpu-prof-dir=${path.resolve(opts.profileDir)}`,
        `--cpu-prof-name=${opts.profileName ?? `udmd-${Date.now()}.cpuprofile`}`,
      ]
    : [];
  const proc = spawnServer(process.execPath, [...prof, udmd, "--run-dir", runDir, ...(opts.args ?? [])]);
  const t = track("udmd", proc);
  const deadline = Date.now() + 15_000;
  while (!t.stderr().includes('"udmd started"')) {
    if (!t.alive()) throw new Error(`udmd exited at start: ${t.stderr().trim()}`);
    if (Date.now() > deadline) {
      await t.stop();
      throw new Error(`udmd did not start within 15 s: ${t.stderr().trim()}`);
    }
    await sleep(20);
  }
  const control = await ControlClient.connect(path.join(runDir, "control"));
  const socket = path.join(runDir, "nbd.sock");
  return {
    name: "udmd",
    pid: t.pid(),
    runDir,
    control,
    uri: (name = "") => unixUri(socket, name),
    stderr: t.stderr,
    stop: async () => {
      control.close();
      await t.stop();
    },
  };
}

/** `tool --version`'s first line, or "not installed". */
export function toolVersion(tool: string, args = ["--version"]): string {
  try {
    return execFileSync(tool, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })
      .split("\n")[0]!
      .trim();
  } catch {
    return "not installed";
  }
}

/**
 * A benchmark instance whose fresh() remakes its devices on a server that keeps running (udmd),
 * exporting `uri`: the first fresh() runs here (the server is stopped if it fails); close() stops
 * the server and removes `files`.
 */
export async function remakingInstance(
  server: Server,
  uri: string,
  fresh: () => Promise<void>,
  files: string[],
): Promise<ConfigInstance> {
  try {
    await fresh();
  } catch (err) {
    await server.stop();
    throw err;
  }
  return {
    running: () => ({ target: { engine: "nbd", uri }, server }),
    fresh,
    close: async () => {
      await server.stop();
      for (const file of files) fs.rmSync(file, { force: true });
    },
  };
}
