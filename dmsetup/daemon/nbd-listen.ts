/**
 * udmd's TCP NBD listener address: `--nbd-listen [HOST:]PORT` parsed, and the rule that only a
 * loopback address may be served without `--tls=require` (docs/security.md): on any other
 * address, whoever reaches the port could read and write every device, as root when udmd runs as
 * root.
 */
import dns from "node:dns/promises";
import net from "node:net";
import type { NbdTlsMode } from "../../nbd/server.js";

export interface ListenAddress {
  host: string;
  port: number;
}

/** `[HOST:]PORT`, `[V6]:PORT`; the host defaults to 127.0.0.1. */
export function parseListen(spec: string): ListenAddress {
  const m = /^(?:(.*):)?(\d+)$/.exec(spec);
  if (!m || Number(m[2]) > 65535) throw new Error(`--nbd-listen: expected [HOST:]PORT, got '${spec}'`);
  const host = (m[1] ?? "").replace(/^\[(.*)\]$/, "$1");
  return { host: host || "127.0.0.1", port: Number(m[2]) };
}

/** 127.0.0.0/8, ::1, and IPv4-mapped loopback. */
export function isLoopbackAddress(address: string): boolean {
  const v4 = address.replace(/^::ffff:/i, "");
  if (net.isIPv4(v4)) return v4.startsWith("127.");
  if (!net.isIPv6(address)) return false;
  const canonical = new URL(`http://[${address}]/`).hostname; // 0:0:0:0:0:0:0:1 → [::1]
  return canonical === "[::1]" || /^\[::ffff:7f[0-9a-f]{2}:[0-9a-f]{1,4}\]$/.test(canonical);
}

/**
 * Refuse to serve `addr` in plaintext unless every address it names is a loopback one. A host
 * name counts as loopback only if all of its addresses are. `what` names the listener in the
 * error (`--nbd-listen SPEC`, or a socket systemd passed).
 */
export async function checkListenAddress(what: string, addr: ListenAddress, tls: NbdTlsMode): Promise<void> {
  if (tls === "require") return;
  const addresses = net.isIP(addr.host) ? [addr.host] : await resolveAll(addr.host);
  if (addresses.length > 0 && addresses.every(isLoopbackAddress)) return;
  throw new Error(
    `${what}: ${addr.host} is not a loopback address; serving NBD there needs --tls=require ` +
      "(with --tls-certificates DIR or --tls-psk FILE), or anyone who can reach the port could read and write " +
      "every device",
  );
}

async function resolveAll(host: string): Promise<string[]> {
  try {
    return (await dns.lookup(host, { all: true })).map((a) => a.address);
  } catch {
    return []; // unresolvable: listen fails on its own, but never in plaintext on a guess
  }
}
