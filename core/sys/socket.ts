/**
 * Socket helpers Node does not expose: the descriptor under a net.Socket, the peer's credentials
 * (SO_PEERCRED) and the send buffer size (SO_SNDBUF).
 */
import type { Socket } from "node:net";
import { check, libc } from "./libc.js";

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_PEERCRED = 17;

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
