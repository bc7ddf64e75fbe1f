/**
 * How many NBD connections the server holds: in total, and per client address on TCP. A
 * connection over a limit is closed as soon as it is accepted, and the refusal is logged (at most
 * one line per second per limit, with the count refused since the last line, so that a flood
 * cannot flood the log too).
 *
 * The total is also kept well below RLIMIT_NOFILE: every connection holds a socket and, once it
 * sends a file range, a duplicate of it for sendfile, and whatever else the process opens (the
 * control socket and its clients, backing files, zero-copy ranges) must still find descriptors
 * when NBD clients hold as many connections as they may (docs/security.md).
 */
import type { Logger } from "../core/logger.js";
import { openFileLimit } from "../core/sys/resource.js";

/** Default total when the descriptor limit allows it. */
export const DEFAULT_MAX_CONNECTIONS = 1024;
/** Default per client address (nbdcopy opens 4 connections, qemu 1 per drive). */
export const DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 16;
/** Descriptors one connection may hold: its socket and the sendfile duplicate. */
const DESCRIPTORS_PER_CONNECTION = 2;
/** Descriptors kept for everything but NBD connections, at most. */
const MAX_RESERVED_DESCRIPTORS = 1024;
const LOG_INTERVAL_MS = 1000;

/**
 * The most connections that leave the rest of the process enough descriptors: half of the limit
 * (up to 1024 descriptors) stays for other uses, the rest is shared by connections.
 */
export function connectionsForDescriptorLimit(nofile: number): number {
  if (!Number.isFinite(nofile)) return Number.MAX_SAFE_INTEGER;
  const reserved = Math.min(MAX_RESERVED_DESCRIPTORS, Math.floor(nofile / 2));
  return Math.max(1, Math.floor((nofile - reserved) / DESCRIPTORS_PER_CONNECTION));
}

/** The process's descriptor limit (RLIMIT_NOFILE), or 1024 where it cannot be read. */
export function descriptorLimit(): number {
  try {
    return openFileLimit().soft;
  } catch {
    return 1024;
  }
}

interface RefusalLog {
  lastAt: number;
  refused: number;
}

export class ConnectionLimits {
  private open = 0;
  private readonly perClient = new Map<string, number>();
  private readonly refusals = new Map<string, RefusalLog>();

  constructor(
    readonly maxTotal: number,
    readonly maxPerClient: number,
    private readonly logger: Logger,
  ) {}

  /**
   * Count a new connection from `client` (undefined on a unix socket: only the total applies),
   * or refuse it (false, and a log line).
   */
  admit(client: string | undefined): boolean {
    if (this.open >= this.maxTotal) return this.refuse("total", this.maxTotal, client);
    const fromClient = client === undefined ? 0 : (this.perClient.get(client) ?? 0);
    if (client !== undefined && fromClient >= this.maxPerClient)
      return this.refuse("per-client", this.maxPerClient, client);
    this.open++;
    if (client !== undefined) this.perClient.set(client, fromClient + 1);
    return true;
  }

  /** A connection admitted for `client` has closed. */
  release(client: string | undefined): void {
    this.open--;
    if (client === undefined) return;
    const left = (this.perClient.get(client) ?? 1) - 1;
    if (left > 0) this.perClient.set(client, left);
    else this.perClient.delete(client);
  }

  private refuse(limit: "total" | "per-client", max: number, client: string | undefined): false {
    const now = Date.now();
    const log = this.refusals.get(limit) ?? { lastAt: -Infinity, refused: 0 };
    log.refused++;
    if (now - log.lastAt >= LOG_INTERVAL_MS) {
      const fields = { limit, max, client: client ?? "unix", open: this.open, refused: log.refused };
      this.logger.warn("nbd connection refused: limit reached", fields);
      log.lastAt = now;
      log.refused = 0;
    }
    this.refusals.set(limit, log);
    return false;
  }
}
