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
import net from "node:net";
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

/**
 * qemu-storage-daemon exporting `image` (raw, read-only) as `exportName` over TCP on 127.0.0.1:`port`
 * with x509 TLS from `pki` (ca-cert.pem, server-cert.pem, server-key.pem; clients must present a
 * certificate the CA signed). `--daemonize` returns once it listens.
 */
export async function startQemuStorageDaemon(
  dir: string,
  image: string,
  exportName: string,
  port: number,
  pki: string,
): Promise<{ uri: (clientPki: string) => string }> {
  const pidFile = path.join(dir, "qsd.pid");
  await toolOk("qemu-storage-daemon", [
    "--daemonize",
    "--pidfile",
    pidFile,
    "--object",
    `tls-creds-x509,id=tls0,endpoint=server,dir=${pki}`,
    "--blockdev",
    `driver=file,node-name=file0,filename=${image},read-only=on`,
    "--blockdev",
    "driver=raw,node-name=base,file=file0,read-only=on",
    "--nbd-server",
    `addr.type=inet,addr.host=127.0.0.1,addr.port=${port},tls-creds=tls0`,
    "--export",
    `type=nbd,id=e0,node-name=base,name=${exportName},writable=off`,
  ]);
  forked.add(Number(fs.readFileSync(pidFile, "utf8").trim()));
  return { uri: (clientPki) => `nbds://localhost:${port}/${exportName}?tls-certificates=${clientPki}` };
}

/** A TCP port nothing listens on right now (bound and released: another process may take it first). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}
