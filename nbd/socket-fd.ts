/**
 * The descriptor under a net.Socket. Node keeps it on the socket's private handle and has no
 * public accessor; the NBD server needs it to re-open accepted connections with `onread` and to
 * sendfile into them. Undefined when the handle exposes none (then both fall back).
 */
import type { Socket } from "node:net";

export function socketFd(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === "number" && fd >= 0 ? fd : undefined;
}
