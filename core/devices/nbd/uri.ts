/**
 * NBD URIs as tables name remote devices (NetworkBlockDevice/nbd doc/uri.md; the query keys for
 * credentials are libnbd's, nbd_connect_uri(3)):
 *
 *   nbd://HOST[:PORT]/EXPORT                       TCP, port 10809 by default
 *   nbd+unix:///EXPORT?socket=PATH                 a unix socket (PATH may start with %00: abstract)
 *   nbds://[USER@]HOST[:PORT]/EXPORT?tls-...       the same over TLS (NBD_OPT_STARTTLS); required,
 *   nbds+unix://[USER@]/EXPORT?socket=PATH&tls-... never opportunistic
 *
 * The export name is the path without its leading `/`, percent-decoded (uri.md, "NBD URI export
 * name"). Query keys: `socket`; for TLS `tls-certificates=DIR` (ca-cert.pem, client-cert.pem,
 * client-key.pem, ca-crl.pem, as libnbd and qemu read them; without it the system's CAs),
 * `tls-psk-file=FILE` (psktool's `identity:hexkey` lines; the identity is USER, by default the
 * login name), `tls-verify-peer=0|1`, `tls-hostname=NAME`, `tls-type=x509|psk`; and udm's own
 * (uri.md, "Other NBD URI query parameters": experimental keys start with `x-`):
 * `x-udm-timeout=SECONDS` (the I/O timeout, nbd-device.ts), `x-udm-connections=N` (connections
 * when the server allows multi-conn) and `x-udm-replay-mib=N` (unflushed writes kept for sending
 * again, unflushed-writes.ts; 0 keeps none). Any other key is refused, as uri.md asks, so a misspelt key
 * fails the table load instead of being ignored.
 */
import os from "node:os";
import path from "node:path";

export const NBD_PORT = 10809;

export type NbdTransport = { kind: "unix"; path: string } | { kind: "tcp"; host: string; port: number };

export interface NbdUri {
  /** The URI exactly as the table gave it. */
  readonly text: string;
  readonly tls: boolean;
  readonly transport: NbdTransport;
  readonly exportName: string;
  /** The URI's user (PSK identity); null when absent. */
  readonly user: string | null;
  readonly tlsCertificates: string | null;
  readonly tlsPskFile: string | null;
  /** Check the server's certificate (default yes). */
  readonly tlsVerifyPeer: boolean;
  /** The name the server certificate must carry (default: the host of a TCP URI). */
  readonly tlsHostname: string | null;
  /** x-udm-timeout in milliseconds, or null for the default. */
  readonly timeoutMs: number | null;
  /** x-udm-connections, or null for the default. */
  readonly connections: number | null;
  /** x-udm-replay-mib in bytes (0: keep no copies), or null for the default. */
  readonly replayBytes: number | null;
}

const SCHEMES = ["nbd", "nbds", "nbd+unix", "nbds+unix"] as const;
const KNOWN_KEYS = new Set([
  "socket",
  "tls-certificates",
  "tls-psk-file",
  "tls-verify-peer",
  "tls-hostname",
  "tls-type",
  "x-udm-timeout",
  "x-udm-connections",
  "x-udm-replay-mib",
]);

/** An error with an errno-style code, as DeviceLookup's callers expect. */
function invalid(text: string, why: string): Error {
  return Object.assign(new Error(`${text}: ${why}`), { code: "EINVAL" });
}

/** Whether a table's device argument is an NBD URI (the scheme decides; the rest may still be wrong). */
export function isNbdUri(spec: string): boolean {
  return /^nbds?(\+[a-z]+)?:\/\//i.test(spec);
}

function decode(text: string, part: string, what: string): string {
  try {
    return decodeURIComponent(part);
  } catch {
    throw invalid(text, `bad percent-encoding in the ${what}`);
  }
}

/** Parse an NBD URI; throws an Error with code EINVAL that says what is wrong. */
export function parseNbdUri(text: string): NbdUri {
  // RFC 3986 appendix B, with the authority required ("//").
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$/.exec(text);
  if (!m) throw invalid(text, "not a URI of the form SCHEME://[HOST]/EXPORT[?QUERY]");
  const scheme = m[1]!.toLowerCase();
  if (!(SCHEMES as readonly string[]).includes(scheme)) {
    throw invalid(text, `unsupported scheme ${scheme}: (udm connects with ${SCHEMES.join(":, ")}:)`);
  }
  const tls = scheme.startsWith("nbds");
  const unix = scheme.endsWith("+unix");

  // Authority: [userinfo@]host[:port]
  let authority = m[2]!;
  let user: string | null = null;
  const at = authority.lastIndexOf("@");
  if (at >= 0) {
    user = decode(text, authority.slice(0, at).split(":")[0]!, "user name");
    authority = authority.slice(at + 1);
  }
  let host = authority;
  let portText: string | null = null;
  const v6 = /^\[([^\]]+)\](?::(\d*))?$/.exec(authority);
  if (v6) {
    host = v6[1]!;
    portText = v6[2] ?? null;
  } else if (authority.includes(":")) {
    [host, portText] = [authority.slice(0, authority.indexOf(":")), authority.slice(authority.indexOf(":") + 1)];
  }
  host = decode(text, host, "host");

  // Path: the export name is everything after the first "/" (so "//disk" names "/disk").
  const rawPath = m[3]!;
  const exportName = rawPath === "" ? "" : decode(text, rawPath.slice(1), "export name");
  if (exportName.includes("\0")) throw invalid(text, "the export name contains NUL");
  if (Buffer.byteLength(exportName) > 4096) throw invalid(text, "the export name is longer than 4096 bytes");

  const query = new Map<string, string>();
  for (const pair of (m[4] ?? "").split("&")) {
    if (pair === "") continue;
    const eq = pair.indexOf("=");
    const key = decode(text, eq < 0 ? pair : pair.slice(0, eq), "query");
    const value = eq < 0 ? "" : decode(text, pair.slice(eq + 1), "query");
    if (!KNOWN_KEYS.has(key)) throw invalid(text, `unknown query parameter "${key}"`);
    if (query.has(key)) throw invalid(text, `query parameter "${key}" given twice`);
    query.set(key, value);
  }

  let transport: NbdTransport;
  if (unix) {
    if (host !== "" || portText !== null) throw invalid(text, `${scheme}: URIs take no host or port (the socket= key)`);
    const socket = query.get("socket");
    if (!socket) throw invalid(text, `${scheme}: URIs need socket=PATH`);
    transport = { kind: "unix", path: socket };
  } else {
    if (query.has("socket")) throw invalid(text, `socket= is for the ${scheme}+unix: scheme`);
    if (host === "") throw invalid(text, "no host");
    let port = NBD_PORT;
    if (portText !== null && portText !== "") {
      port = /^\d{1,5}$/.test(portText) ? Number(portText) : NaN;
      if (!(port >= 1 && port <= 65535)) throw invalid(text, `bad port "${portText}"`);
    }
    transport = { kind: "tcp", host, port };
  }

  const tlsKeys = [...query.keys()].filter((k) => k.startsWith("tls-"));
  if (!tls && tlsKeys.length > 0) {
    throw invalid(text, `${tlsKeys[0]}= needs TLS: use the ${unix ? "nbds+unix" : "nbds"}: scheme`);
  }
  const tlsCertificates = query.get("tls-certificates") ?? null;
  const tlsPskFile = query.get("tls-psk-file") ?? null;
  if (tlsCertificates !== null && tlsPskFile !== null) {
    throw invalid(text, "give tls-certificates= or tls-psk-file=, not both");
  }
  const tlsType = query.get("tls-type");
  if (tlsType !== undefined) {
    if (tlsType === "psk" ? tlsPskFile === null : tlsType === "x509" ? tlsPskFile !== null : true) {
      throw invalid(
        text,
        tlsType === "psk" || tlsType === "x509"
          ? `tls-type=${tlsType} does not match the credentials given`
          : `tls-type=${tlsType} is not supported (x509 or psk)`,
      );
    }
  }
  const verify = query.get("tls-verify-peer");
  if (verify !== undefined && verify !== "0" && verify !== "1") {
    throw invalid(text, "tls-verify-peer= takes 0 or 1");
  }

  return {
    text,
    tls,
    transport,
    exportName,
    user,
    tlsCertificates,
    tlsPskFile,
    tlsVerifyPeer: verify !== "0",
    tlsHostname: query.get("tls-hostname") ?? null,
    timeoutMs: positiveNumber(text, query.get("x-udm-timeout"), "x-udm-timeout", 1000),
    connections: positiveNumber(text, query.get("x-udm-connections"), "x-udm-connections", 1, 16),
    replayBytes: replayBytes(text, query.get("x-udm-replay-mib")),
  };
}

function positiveNumber(
  text: string,
  value: string | undefined,
  key: string,
  scale: number,
  max = Infinity,
): number | null {
  if (value === undefined) return null;
  const n = Number(value);
  if (!/^\d+(\.\d+)?$/.test(value) || !(n > 0) || n > max) {
    throw invalid(text, `${key}= takes a positive number${max < Infinity ? ` up to ${max}` : ""}`);
  }
  return scale === 1 ? Math.floor(n) : Math.round(n * scale);
}

function replayBytes(text: string, value: string | undefined): number | null {
  if (value === undefined) return null;
  if (!/^\d+$/.test(value) || Number(value) > 4096) throw invalid(text, "x-udm-replay-mib= takes 0 to 4096");
  return Number(value) * 1024 * 1024;
}

/** The PSK identity: the URI's user, else the login name (uri.md, "NBD URI authority"). */
export function pskIdentity(uri: NbdUri): string {
  return uri.user ?? os.userInfo().username;
}

/**
 * One key for every spelling of the same connection (SharedDevices opens it once): relative
 * socket and credential paths resolved, the default port filled in, query keys in one order.
 */
export function nbdUriKey(uri: NbdUri): string {
  const t = uri.transport;
  const where =
    t.kind === "unix"
      ? `unix:${t.path.startsWith("\0") ? t.path : path.resolve(t.path)}`
      : `tcp:${t.host.toLowerCase()}:${t.port}`;
  const resolve = (p: string | null) => (p === null ? "" : path.resolve(p));
  return [
    `nbd${uri.tls ? "s" : ""}`,
    where,
    JSON.stringify(uri.exportName),
    uri.user ?? "",
    resolve(uri.tlsCertificates),
    resolve(uri.tlsPskFile),
    uri.tlsVerifyPeer ? "verify" : "noverify",
    uri.tlsHostname ?? "",
    uri.timeoutMs ?? "",
    uri.connections ?? "",
    uri.replayBytes ?? "",
  ].join("|");
}

/** "nbd+unix:///vol (socket /run/x.sock)"-style description for log lines: the URI without credentials paths. */
export function describeTransport(uri: NbdUri): string {
  const t = uri.transport;
  return t.kind === "unix" ? `unix socket ${t.path}` : `${t.host.includes(":") ? `[${t.host}]` : t.host}:${t.port}`;
}
