/**
 * Real NBD servers the remote-device tests start on unix sockets or loopback TCP.
 *
 * nbdkit runs in the foreground as the test's child (`-f --exit-with-parent`), so the test sees
 * it exit ('exit' event) and can kill -9 it and start it again on the same socket. It writes its
 * pid file once it listens: a watch on the directory (inotify) tells the test, no polling.
 * qemu-nbd has no such hook: `--fork` returns once it listens, and it is ended with SIGTERM at
 * cleanup.
 */
import { type ChildProcess, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { toolOk, which } from "./tools.js";

export interface NbdkitServer {
  /** The unix socket ("" on TCP). */
  sock: string;
  /** The TCP port (0 on a unix socket). */
  port: number;
  /** The URI of `exportName` on this server (nbd+unix:// or nbd://127.0.0.1:PORT). */
  uri(exportName?: string): string;
  /** Send `signal` and wait until nbdkit has exited. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Start it again with the same arguments (same socket, same files). */
  restart(): Promise<void>;
}

const children = new Set<ChildProcess>();
const forked = new Set<number>();

/** nbdkit ARGS until it listens (its pid file is written); rejects with its stderr if it exits first. */
function launchNbdkit(args: string[], pidFile: string): Promise<ChildProcess> {
  fs.rmSync(pidFile, { force: true });
  return new Promise((resolve, reject) => {
    const dir = path.dirname(pidFile);
    let child: ChildProcess | null = null;
    let err = "";
    const watcher = fs.watch(dir, () => check());
    const check = () => {
      let text = "";
      try {
        text = fs.readFileSync(pidFile, "utf8");
      } catch {
        return;
      }
      if (!child || !text.endsWith("\n") || Number(text) !== child.pid) return;
      watcher.close();
      child.off("exit", onExit);
      resolve(child);
    };
    const onExit = (code: number | null, signal: string | null) => {
      watcher.close();
      reject(new Error(`nbdkit ${args.join(" ")} exited (${code ?? signal}) before listening:\n${err}`));
    };
    child = spawn(which("nbdkit") ?? "nbdkit", ["-f", "--exit-with-parent", "-P", pidFile, ...args], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    children.add(child);
    const c = child;
    c.once("exit", () => children.delete(c));
    c.stderr!.on("data", (d) => (err += d));
    c.once("exit", onExit);
    check(); // written before the watch saw it
  });
}

/**
 * nbdkit OPTIONS... PLUGIN ARGS... on `dir/name.sock` (or 127.0.0.1:`port` when given).
 * `options` go before the plugin (filters, -r, --tls...).
 */
export async function startNbdkit(
  dir: string,
  name: string,
  plugin: string[],
  options: string[] = [],
  port = 0,
): Promise<NbdkitServer> {
  const sock = port ? "" : path.join(dir, `${name}.sock`);
  const pidFile = path.join(dir, `${name}.pid`);
  const where = port ? ["-i", "127.0.0.1", "-p", String(port)] : ["-U", sock];
  const args = [...where, ...options, ...plugin];
  let child = await launchNbdkit(args, pidFile);
  const server: NbdkitServer = {
    sock,
    port,
    uri: (exportName = "") =>
      sock
        ? `nbd+unix:///${encodeURIComponent(exportName)}?socket=${sock}`
        : `nbd://127.0.0.1:${port}/${encodeURIComponent(exportName)}`,
    async kill(signal = "SIGTERM") {
      const c = child;
      if (c.exitCode !== null || c.signalCode !== null) return;
      const exited = new Promise((r) => c.once("exit", r));
      c.kill(signal);
      await exited;
    },
    async restart() {
      if (sock) fs.rmSync(sock, { force: true }); // a killed nbdkit leaves its socket behind
      child = await launchNbdkit(args, pidFile);
    },
  };
  return server;
}

/**
 * qemu-nbd serving `image` (format `format`) as export `exportName` on `dir/name.sock`; returns
 * once it listens. Several clients at once (`--shared=8`); not read-only unless `options` say so.
 */
export async function startQemuNbd(
  dir: string,
  name: string,
  image: string,
  format: "raw" | "qcow2",
  exportName: string,
  options: string[] = [],
): Promise<{ sock: string; uri: string }> {
  const sock = path.join(dir, `${name}.sock`);
  const pidFile = path.join(dir, `${name}.pid`);
  await toolOk("qemu-nbd", [
    "--fork",
    "--persistent",
    "--shared=8",
    `--pid-file=${pidFile}`,
    "-k",
    sock,
    "-x",
    exportName,
    "-f",
    format,
    "--cache=writeback",
    ...options,
    image,
  ]);
  forked.add(Number(fs.readFileSync(pidFile, "utf8").trim()));
  return { sock, uri: `nbd+unix:///${encodeURIComponent(exportName)}?socket=${sock}` };
}

/** Kill every server still running (afterEach/afterAll). */
export function stopNbdServers(): void {
  for (const c of children) c.kill("SIGKILL");
  for (const pid of forked) {
    try {
      process.kill(pid, "SIGTERM");
    } catch {
      // already gone
    }
  }
  forked.clear();
}
