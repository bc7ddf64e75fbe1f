/**
 * What udmd serves on each listening socket a service manager passed it (listen-fds.ts): the
 * control protocol or NBD. The socket's name decides (FileDescriptorName=control or =nbd); a
 * socket with systemd's default name (its .socket unit's name, or "unknown" without
 * LISTEN_FDNAMES) is recognised by its address instead: the run directory's `control` or
 * `nbd.sock`, or the `--nbd-listen` address. Anything else is refused with the reason before
 * udmd takes anything: a socket udmd cannot tell the use of would otherwise sit unanswered, and
 * its clients would hang.
 *
 * Every socket is checked first: open, a socket, a stream socket, listening (a .socket unit with
 * Accept=yes passes connections, not listeners), of a family udmd serves. The checked ones are
 * made close-on-exec, as sd_listen_fds(3) does, so that no process udmd starts inherits them.
 */
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { setCloseOnExec } from "../../core/sys/file.js";
import { SOCK_STREAM, type SocketAddress, socketAddress, socketListens, socketType } from "../../core/sys/socket.js";
import type { ListenAddress } from "./nbd-listen.js";
import type { PassedSocket } from "./listen-fds.js";

/** The FileDescriptorName= values udmd knows. */
export const SOCKET_NAMES = ["control", "nbd"] as const;

export interface UnixListener {
  fd: number;
  path: string;
}

export interface TcpListener {
  fd: number;
  host: string;
  port: number;
  /** How it is named in errors and logs: `fd 4 (nbd) on 127.0.0.1:10809`. */
  label: string;
}

export interface AssignedSockets {
  /** The control socket, served as `RUN_DIR/control` is (SO_PEERCRED-checked). */
  control: UnixListener | null;
  /** NBD on unix sockets, served as `RUN_DIR/nbd.sock` is (TLS offered when on, never required). */
  nbdUnix: UnixListener[];
  /** NBD on TCP, served as `--nbd-listen`'s listener is (--tls's mode, the loopback rule). */
  nbdTcp: TcpListener[];
  /** One of nbdTcp is on the `--nbd-listen` address: that listener exists already, bound. */
  nbdListenPassed: boolean;
}

/** Where udmd would listen itself: what a socket without a name of udmd's is matched against. */
export interface OwnAddresses {
  control: string;
  nbd: string;
  /** `--nbd-listen`, if given. */
  tcp: ListenAddress | null;
}

/** Check every passed socket and say what each is for; throws an Error naming the first that is unusable. */
export function assignPassedSockets(passed: readonly PassedSocket[], own: OwnAddresses): AssignedSockets {
  const assigned: AssignedSockets = { control: null, nbdUnix: [], nbdTcp: [], nbdListenPassed: false };
  for (const socket of passed) {
    const address = listeningAddress(socket);
    const where = describeAddress(address);
    const label = `fd ${socket.fd} (${socket.name}) on ${where}`;
    const role = roleOf(socket, address, own, label);
    if (address.family === "unix") {
      const listener = { fd: socket.fd, path: address.path };
      if (role === "nbd") assigned.nbdUnix.push(listener);
      else if (assigned.control) {
        throw new Error(`${label}: a second control socket (fd ${assigned.control.fd} is one already)`);
      } else assigned.control = listener;
    } else if (address.family === "ipv4" || address.family === "ipv6") {
      if (role === "control") {
        throw new Error(`${label}: the control socket must be a unix socket (udmd checks who connects by SO_PEERCRED)`);
      }
      assigned.nbdTcp.push({ fd: socket.fd, host: address.host, port: address.port, label });
      if (own.tcp && sameTcpAddress(address, own.tcp)) assigned.nbdListenPassed = true;
    }
    setCloseOnExec(socket.fd);
  }
  return assigned;
}

type Role = (typeof SOCKET_NAMES)[number];

function roleOf(socket: PassedSocket, address: SocketAddress, own: OwnAddresses, label: string): Role {
  if ((SOCKET_NAMES as readonly string[]).includes(socket.name)) return socket.name as Role;
  // systemd's names when FileDescriptorName= is not set: the unit's name; none at all: "unknown".
  if (!(socket.name === "unknown" || socket.name.endsWith(".socket"))) {
    throw new Error(
      `${label}: unknown socket name '${socket.name}': FileDescriptorName= must be control or nbd ` +
        "(or left unset, and the socket's address says what it is)",
    );
  }
  if (address.family === "unix" && address.path !== "" && !address.path.startsWith("@")) {
    const file = path.resolve(address.path);
    if (file === path.resolve(own.control)) return "control";
    if (file === path.resolve(own.nbd)) return "nbd";
  }
  if ((address.family === "ipv4" || address.family === "ipv6") && own.tcp && sameTcpAddress(address, own.tcp)) {
    return "nbd";
  }
  const known = [own.control, own.nbd, ...(own.tcp ? [`${own.tcp.host}:${own.tcp.port} (--nbd-listen)`] : [])];
  throw new Error(
    `${label}: its name does not say what it is for and its address is none of udmd's (${known.join(", ")}); ` +
      "name it with FileDescriptorName=control or FileDescriptorName=nbd",
  );
}

function sameTcpAddress(address: { host: string; port: number }, listen: ListenAddress): boolean {
  if (address.port !== listen.port || !net.isIP(listen.host)) return false;
  return canonicalIp(address.host) === canonicalIp(listen.host);
}

/** One spelling per address: IPv6 in its short form, IPv4-mapped IPv6 as the IPv4 address. */
function canonicalIp(host: string): string {
  if (net.isIPv4(host)) return host;
  const short = new URL(`http://[${host}]/`).hostname.slice(1, -1);
  return /^::ffff:\d+\.\d+\.\d+\.\d+$/i.test(short) ? short.slice(7) : short;
}

/** The socket's address if udmd can serve on it; throws saying why not otherwise. */
function listeningAddress(socket: PassedSocket): SocketAddress {
  const name = `fd ${socket.fd} (${socket.name})`;
  let st: fs.Stats;
  try {
    st = fs.fstatSync(socket.fd);
  } catch (err) {
    throw new Error(`${name} is not open (${(err as NodeJS.ErrnoException).code})`, { cause: err });
  }
  if (!st.isSocket()) throw new Error(`${name} is not a socket but ${fileKind(st)}`);
  const type = socketType(socket.fd);
  if (type !== SOCK_STREAM) {
    throw new Error(`${name} is not a stream socket (SO_TYPE ${type}); udmd serves ListenStream= sockets`);
  }
  if (!socketListens(socket.fd)) {
    throw new Error(`${name} is not listening; udmd needs listening sockets (ListenStream= with Accept=no)`);
  }
  const address = socketAddress(socket.fd);
  if (address.family === "other") {
    throw new Error(`${name} is of address family ${address.domain}; udmd serves unix, IPv4 and IPv6 sockets`);
  }
  if (address.family === "unix" && address.path === "") throw new Error(`${name} is an unbound unix socket`);
  return address;
}

function describeAddress(address: SocketAddress): string {
  if (address.family === "unix") return address.path;
  if (address.family === "other") return `address family ${address.domain}`;
  return address.family === "ipv6" ? `[${address.host}]:${address.port}` : `${address.host}:${address.port}`;
}

function fileKind(st: fs.Stats): string {
  if (st.isFile()) return "a regular file";
  if (st.isDirectory()) return "a directory";
  if (st.isFIFO()) return "a pipe";
  if (st.isCharacterDevice()) return "a character device";
  if (st.isBlockDevice()) return "a block device";
  return "not a socket";
}
