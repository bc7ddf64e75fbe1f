/**
 * Real NBD servers the remote-device tests start on unix sockets or loopback TCP.
 *
 * nbdkit runs as the test's child with `--run`: nbdkit starts the command once it is listening
 * (the command prints "ready", the test's signal), and the command then waits on its stdin, our
 * pipe; so the test knows when nbdkit listens and sees it exit ('exit' event), and can kill -9 it
 * and start it again on the same socket. qemu-nbd has no such hook: `--fork` returns once it
 * listens, and it is ended with SIGTERM at cleanup.
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

/** nbdkit until it listens; rejects with its stderr if it exits first. */
function launchNbdkit(args: string[]): Promise<ChildProcess> {
  return new Promise((resolve, reject) => {
    const child = spawn(which("nbdkit") ?? "nbdkit", [...args], { stdio: ["pipe", "pipe", "pipe"] });
    children.add(child);
    let out = "";
    let err = "";
    child.stderr!.on("data", (d) => (err += d));
    child.stdin!.on("error", () => undefined);
    const onOut = (d: Buffer) => {
      out += d;
      if (out.includes("ready\n")) {
        child.stdout!.off("data", onOut);
        child.off("exit", onExit);
        resolve(child);
      }
    };
    const onExit = (code: number | null, signal: string | null) => {
      children.delete(child);
      reject(new Error(`nbdkit ${args.join(" ")} exited (${code ?? signal}) before listening:\n${err}`));
    };
    child.stdout!.on("data", onOut);
    child.once("exit", onExit);
    child.once("exit", () => children.delete(child));
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
  const where = port ? ["-i", "127.0.0.1", "-p", String(port)] : ["-U", sock];
  // The command holds nbdkit up until our end of its stdin closes (or nbdkit is killed).
  const args = [...where, ...options, ...plugin, "--run", "echo ready; exec cat >/dev/null"];
  let child = await launchNbdkit(args);
  const server: NbdkitServer = {
    sock,
    port,
    uri: (exportName = "") =>
      sock
        ? `nbd+unix:///${encodeURIComponent(exportName)}?socket=${sock}`
        : `nbd://127.0.0.1:${port}/${encodeURIComponent(exportName)}`,
    async kill(signal = "SIGTERM") {
      const c = child;
      if (c.exitCode === null && c.signalCode === null) {
        const exited = new Promise((r) => c.once("exit", r));
        c.kill(signal);
        await exited;
      }
      c.stdin!.end(); // the --run command (cat) exits too
    },
    async restart() {
      if (sock) fs.rmSync(sock, { force: true }); // a killed nbdkit leaves its socket behind
      child = await launchNbdkit(args);
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
  for (const c of children) {
    c.kill("SIGKILL");
    c.stdin?.end();
  }
  for (const pid of forked) {
    try {
      process.kill(pid, "SIGTERM");
    } catch {
      // already gone
    }
  }
  forked.clear();
}
