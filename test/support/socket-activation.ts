/**
 * Socket activation as a service manager does it, for tests: listening sockets made here (with
 * socket/bind/listen, not net.Server, which would accept on them too and unlink the file when
 * closed), then udmd started with them as descriptors 3, 4, ... and LISTEN_PID, LISTEN_FDS and
 * LISTEN_FDNAMES in its environment. LISTEN_PID must be udmd's own pid, known only once it runs:
 * a shell sets it to its own pid and execs node, which keeps the pid, as systemd sets it in the
 * forked child before exec.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { check, libc, libcFunction } from "../../core/sys/libc.js";
import { socketAddress } from "../../core/sys/socket.js";
import { UDMD } from "./daemon.js";

const AF_UNIX = 1;
const AF_INET = 2;
const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;

let calls: { bind: ReturnType<typeof libcFunction>; listen: ReturnType<typeof libcFunction> } | null = null;
function sys() {
  calls ??= {
    bind: libcFunction("bind", "int", ["int", "void *", "uint32_t"]),
    listen: libcFunction("listen", "int", ["int", "int"]),
  };
  return calls;
}

interface SocketOptions {
  /** listen(2) on it (default true). */
  listen?: boolean;
  /** Made close-on-exec (default true); systemd passes its sockets without the flag. */
  cloexec?: boolean;
  /** SOCK_STREAM (default) or another type. */
  type?: number;
}

function listeningSocket(domain: number, address: Buffer, opts: SocketOptions): number {
  const flags = (opts.type ?? SOCK_STREAM) | ((opts.cloexec ?? true) ? SOCK_CLOEXEC : 0);
  const fd = check(libc().socket(domain, flags, 0) as number, "socket");
  try {
    check(sys().bind(fd, address, address.length) as number, "bind");
    if (opts.listen ?? true) check(sys().listen(fd, 128) as number, "listen");
  } catch (err) {
    closeFd(fd);
    throw err;
  }
  return fd;
}

/**
 * A unix socket bound to `path` (which must not exist; `@name` binds the abstract address
 * `name`): a listening stream socket unless told otherwise.
 */
export function unixSocketFd(path: string, opts: SocketOptions = {}): number {
  const abstract = path.startsWith("@");
  // An abstract name is its bytes after a NUL, all of the length given; a path ends at its NUL.
  const addr = Buffer.alloc(2 + Buffer.byteLength(path) + (abstract ? 0 : 1));
  addr.writeUInt16LE(AF_UNIX, 0);
  addr.write(abstract ? `\0${path.slice(1)}` : path, 2);
  return listeningSocket(AF_UNIX, addr, opts);
}

/** A TCP socket listening on 127.0.0.1, on a port the kernel picks (or `port`). */
export function tcpSocketFd(port = 0): { fd: number; port: number } {
  const addr = Buffer.alloc(16);
  addr.writeUInt16LE(AF_INET, 0);
  addr.writeUInt16BE(port, 2);
  Buffer.from([127, 0, 0, 1]).copy(addr, 4);
  const fd = listeningSocket(AF_INET, addr, {});
  const bound = socketAddress(fd);
  if (bound.family !== "ipv4") throw new Error(`unexpected address family ${bound.family}`);
  return { fd, port: bound.port };
}

export function closeFd(fd: number): void {
  libc().close(fd);
}

export interface PassedFd {
  fd: number;
  /** LISTEN_FDNAMES entry; omitted on every socket: no LISTEN_FDNAMES at all. */
  name?: string;
}

/**
 * Start the built udmd with `sockets` as descriptors 3, 4, ... (in order) and the LISTEN_*
 * variables; `env` adds to the environment. stdout and stderr are piped.
 */
export function spawnActivated(sockets: PassedFd[], args: string[], env: NodeJS.ProcessEnv = {}): ChildProcess {
  const names = sockets.every((s) => s.name === undefined)
    ? {}
    : { LISTEN_FDNAMES: sockets.map((s) => s.name).join(":") };
  return spawn("/bin/sh", ["-c", 'export LISTEN_PID=$$; exec "$0" "$@"', process.execPath, UDMD, ...args], {
    env: { ...process.env, ...env, LISTEN_FDS: String(sockets.length), ...names },
    stdio: ["ignore", "pipe", "pipe", ...sockets.map((s) => s.fd)],
  });
}
