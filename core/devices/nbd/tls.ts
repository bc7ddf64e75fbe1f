/**
 * The client's TLS (proto.md, "TLS support"): credentials as the URI names them, read once when
 * the device is opened, and the upgrade of a socket after the server acknowledged
 * NBD_OPT_STARTTLS.
 *
 * x509 (`tls-certificates=DIR`): DIR holds what libnbd and qemu read there: ca-cert.pem (the CA the
 * server's certificate must chain to; without it the system's CAs), client-cert.pem and
 * client-key.pem (presented when the server asks for a client certificate), ca-crl.pem. The
 * server's name is checked against the URI's host (or `tls-hostname=`); over a unix socket with no
 * `tls-hostname=` only the chain is checked, since there is no host to compare with.
 * `tls-verify-peer=0` checks nothing (tests, and servers with self-made certificates).
 *
 * PSK (`tls-psk-file=FILE`): psktool's `identity:hexkey` lines; the key used is the one of the
 * URI's user (by default the login name). TLS 1.3's suites, then the (EC)DHE-PSK TLS 1.2 ones
 * (Node's default cipher list has no PSK suite at all).
 */
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import tls from "node:tls";
import { PSK_CIPHERS, parsePskFile } from "../../tls-psk.js";
import { type NbdUri, pskIdentity } from "./uri.js";

/** Connection options for tls.connect, minus the socket. */
export type ClientTls = Omit<tls.ConnectionOptions, "socket">;

function credentialError(message: string, cause?: unknown): Error {
  return Object.assign(new Error(message, cause ? { cause } : undefined), { code: "EINVAL" });
}

/** Read the credentials `uri` names (an Error with code EINVAL says which file is wrong). */
export function loadClientTls(uri: NbdUri): ClientTls {
  const base: ClientTls = { minVersion: "TLSv1.2" };
  if (uri.tlsPskFile !== null) return { ...base, ...pskOptions(uri, uri.tlsPskFile) };
  const options: ClientTls = { ...base, rejectUnauthorized: uri.tlsVerifyPeer };
  if (uri.tlsCertificates !== null) {
    const dir = uri.tlsCertificates;
    const read = (name: string): Buffer | undefined => {
      const file = path.join(dir, name);
      try {
        return fs.readFileSync(file);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
        throw credentialError(`TLS certificates: ${file}: ${(err as Error).message}`, err);
      }
    };
    const ca = read("ca-cert.pem");
    const cert = read("client-cert.pem");
    const key = read("client-key.pem");
    const crl = read("ca-crl.pem");
    if ((cert === undefined) !== (key === undefined)) {
      throw credentialError(`TLS certificates in ${dir}: client-cert.pem and client-key.pem go together`);
    }
    if (ca === undefined && cert === undefined) {
      throw credentialError(`TLS certificates in ${dir}: neither ca-cert.pem nor client-cert.pem is there`);
    }
    Object.assign(options, { ca, cert, key, crl });
    try {
      tls.createSecureContext(options); // a bad PEM file fails the table load, not every reconnect
    } catch (err) {
      throw credentialError(`TLS certificates in ${dir}: ${(err as Error).message}`, err);
    }
  }
  const t = uri.transport;
  const hostname = uri.tlsHostname ?? (t.kind === "tcp" ? t.host : null);
  if (hostname !== null && net.isIP(hostname) === 0) options.servername = hostname;
  options.checkServerIdentity = (_name, cert) =>
    hostname === null || !uri.tlsVerifyPeer ? undefined : tls.checkServerIdentity(hostname, cert);
  return options;
}

function pskOptions(uri: NbdUri, file: string): ClientTls {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    throw credentialError(`TLS PSK file ${file}: ${(err as Error).message}`, err);
  }
  const identity = pskIdentity(uri);
  const key = findPskKey(text, identity, file);
  return {
    ciphers: PSK_CIPHERS,
    pskCallback: () => ({ identity, psk: key }),
    // PSK authenticates both ends; there is no certificate to check.
    checkServerIdentity: () => undefined,
  };
}

/** The key of `identity` in a psktool file (errors name the file and line, never a key). */
export function findPskKey(text: string, identity: string, file: string): Buffer {
  let keys: Map<string, Buffer>;
  try {
    keys = parsePskFile(text, file);
  } catch (err) {
    throw credentialError((err as Error).message, err);
  }
  const key = keys.get(identity);
  if (!key) throw credentialError(`${file}: no key for the PSK identity "${identity}" (the URI's user, USER@HOST)`);
  return key;
}

/**
 * Run the client side of the TLS handshake on `socket` (nothing of the server's unread in it: the
 * server sends nothing after its STARTTLS ACK). Rejects with code EACCES when the handshake fails
 * or the server's certificate is refused.
 */
export function startTls(socket: net.Socket, options: ClientTls): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const secure = tls.connect({ ...options, socket });
    const fail = (err: Error) => {
      const reason = (err as Error & { reason?: string }).reason ?? err.message;
      secure.destroy();
      reject(Object.assign(new Error(`TLS handshake failed: ${reason}`, { cause: err }), { code: "EACCES" }));
    };
    secure.once("error", fail);
    secure.once("secureConnect", () => {
      secure.off("error", fail);
      resolve(secure);
    });
  });
}
