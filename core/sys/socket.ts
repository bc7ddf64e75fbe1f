/**
 * Socket helpers Node does not expose: the descriptor under a net.Socket, the peer's credentials
 * (SO_PEERCRED), the send buffer size (SO_SNDBUF), and what a descriptor someone else made is
 * (its type, whether it listens, its address: for sockets passed by systemd).
 */
import type { Socket } from "node:net";
import { check, libc } from "./libc.js";

const SOL_SOCKET = 1;
const SO_TYPE = 3;
const SO_SNDBUF = 7;
const SO_PEERCRED = 17;
const SO_ACCEPTCONN = 30;

export const SOCK_STREAM = 1;
const AF_UNIX = 1;
const AF_INET = 2;
const AF_INET6 = 10;

/**
 * The descriptor under a net.Socket. Node keeps it on the socket's private handle and has no
 * public accessor. Undefined when the handle exposes none (callers then fall back).
 */
export function socketFd(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === "number" && fd >= 0 ? fd : undefined;
}

/** getsockopt(SO_PEERCRED) on a connected unix socket: who is on the other end. */
export function peerCredentials(fd: number): { pid: number; uid: number; gid: number } {
  const ucred = Buffer.alloc(12); // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
  const len = Buffer.alloc(4);
  len.writeUInt32LE(12);
  check(libc().getsockopt(fd, SOL_SOCKET, SO_PEERCRED, ucred, len) as number, "getsockopt", "SO_PEERCRED");
  return { pid: ucred.readInt32LE(0), uid: ucred.readUInt32LE(4), gid: ucred.readUInt32LE(8) };
}

/**
 * Ask for a socket send buffer of `bytes` (SO_SNDBUF; the kernel doubles the value for its own
 * bookkeeping and caps it at net.core.wmem_max). Returns the size the kernel granted.
 */
export function setSendBuffer(fd: number, bytes: number): number {
  const { getsockopt, setsockopt } = libc();
  const value = Buffer.alloc(4);
  value.writeInt32LE(bytes);
  check(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, value, 4) as number, "setsockopt", "SO_SNDBUF");
  const len = Buffer.alloc(4);
  len.writeUInt32LE(4);
  check(getsockopt(fd, SOL_SOCKET, SO_SNDBUF, value, len) as number, "getsockopt", "SO_SNDBUF");
  return value.readInt32LE(0);
}

/** getsockopt(SO_TYPE): SOCK_STREAM, SOCK_DGRAM, ... Throws ENOTSOCK for a descriptor that is no socket. */
export function socketType(fd: number): number {
  return intOption(fd, SO_TYPE, "SO_TYPE");
}

/** getsockopt(SO_ACCEPTCONN): whether listen(2) was called on the socket. */
export function socketListens(fd: number): boolean {
  return intOption(fd, SO_ACCEPTCONN, "SO_ACCEPTCONN") !== 0;
}

function intOption(fd: number, option: number, name: string): number {
  const value = Buffer.alloc(4);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(4);
  check(libc().getsockopt(fd, SOL_SOCKET, option, value, len) as number, "getsockopt", name);
  return value.readInt32LE(0);
}

/**
 * A socket's own address (getsockname). A unix socket's `path` is "" when it is unbound and
 * starts with "@" for an abstract address (as ss(8) shows it).
 */
export type SocketAddress =
  | { family: "unix"; path: string }
  | { family: "ipv4" | "ipv6"; host: string; port: number }
  | { family: "other"; domain: number };

export function socketAddress(fd: number): SocketAddress {
  const addr = Buffer.alloc(128); // sizeof(struct sockaddr_storage)
  const len = Buffer.alloc(4);
  len.writeUInt32LE(addr.length);
  check(libc().getsockname(fd, addr, len) as number, "getsockname");
  const size = Math.min(len.readUInt32LE(0), addr.length);
  const domain = addr.readUInt16LE(0);
  if (domain === AF_UNIX) {
    const raw = addr.subarray(2, size);
    if (raw.length > 0 && raw[0] === 0) return { family: "unix", path: `@${raw.subarray(1).toString("utf8")}` };
    const end = raw.indexOf(0);
    return { family: "unix", path: raw.subarray(0, end < 0 ? raw.length : end).toString("utf8") };
  }
  if (domain === AF_INET) {
    return { family: "ipv4", host: [...addr.subarray(4, 8)].join("."), port: addr.readUInt16BE(2) };
  }
  if (domain === AF_INET6) {
    const groups = Array.from({ length: 8 }, (_, i) => addr.readUInt16BE(8 + 2 * i).toString(16));
    // The URL parser writes IPv6 addresses in their canonical short form.
    const host = new URL(`http://[${groups.join(":")}]/`).hostname.slice(1, -1);
    return { family: "ipv6", host, port: addr.readUInt16BE(2) };
  }
  return { family: "other", domain };
}
