/**
 * TLS for NBD_OPT_STARTTLS (proto.md, "TLS support"): the server's credentials, loaded once, and
 * the upgrade of a connection's socket once the STARTTLS ACK has gone out.
 *
 * Credentials are taken as nbdkit (--tls-certificates, --tls-psk) and qemu-nbd (tls-creds-x509,
 * tls-creds-psk) take them: a directory of PEM files (server-cert.pem, server-key.pem; with
 * ca-cert.pem every client must present a certificate signed by that CA, as qemu's default
 * verify-peer=on; ca-crl.pem if present), or a PSK file in psktool's format, `identity:hexkey`
 * per line. TLS 1.3 where the client has it, TLS 1.2 at least (proto.md: "MUST support TLS
 * version 1.2"); the TLS 1.2 PSK suites are the (EC)DHE ones GnuTLS offers by default.
 */
import fs from "node:fs";
import type { Socket } from "node:net";
import path from "node:path";
import tls from "node:tls";
import { PSK_CIPHERS, parsePskFile } from "../core/tls-psk.js";

export { parsePskFile };

/** off: STARTTLS is refused. on: offered, plaintext allowed. require: no option but STARTTLS/ABORT before TLS. */
export type NbdTlsMode = "off" | "on" | "require";

export const TLS_MODES: readonly NbdTlsMode[] = ["off", "on", "require"];

export interface NbdTlsOptions {
  mode: NbdTlsMode;
  /** Directory with server-cert.pem, server-key.pem, and optionally ca-cert.pem and ca-crl.pem. */
  certificates?: string;
  /** PSK file: `identity:hexkey` lines (psktool's format). */
  psk?: string;
}

/** The server's TLS credentials; `upgrade` turns a connection's socket into a TLS socket. */
export class TlsCredentials {
  /** Client certificates are required and checked against ca-cert.pem. */
  readonly verifiesClients: boolean;

  private constructor(
    readonly kind: "x509" | "psk",
    private readonly serverOptions: tls.TlsOptions,
    /** Where the credentials came from, for log lines. */
    readonly source: string,
  ) {
    this.verifiesClients = serverOptions.requestCert === true;
  }

  /** Read the credentials of `opts` (a certificates directory or a PSK file, not both). */
  static load(opts: Omit<NbdTlsOptions, "mode">): TlsCredentials {
    if (opts.certificates !== undefined && opts.psk !== undefined) {
      throw new Error("TLS: give either certificates or a PSK file, not both");
    }
    if (opts.psk !== undefined) return TlsCredentials.fromPskFile(opts.psk);
    if (opts.certificates !== undefined) return TlsCredentials.fromCertificates(opts.certificates);
    throw new Error("TLS needs credentials: a certificates directory or a PSK file");
  }

  private static fromCertificates(dir: string): TlsCredentials {
    const read = (name: string, required: boolean): Buffer | undefined => {
      const file = path.join(dir, name);
      try {
        return fs.readFileSync(file);
      } catch (err) {
        if (!required && (err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
        throw new Error(`TLS certificates: ${file}: ${(err as Error).message}`, { cause: err });
      }
    };
    const ca = read("ca-cert.pem", false);
    const options: tls.TlsOptions = {
      minVersion: "TLSv1.2",
      cert: read("server-cert.pem", true),
      key: read("server-key.pem", true),
      ca,
      crl: read("ca-crl.pem", false),
      requestCert: ca !== undefined,
      rejectUnauthorized: ca !== undefined,
    };
    try {
      tls.createSecureContext(options); // bad PEM, a key that does not match: fail now, not per client
    } catch (err) {
      throw new Error(`TLS certificates in ${dir}: ${(err as Error).message}`, { cause: err });
    }
    return new TlsCredentials("x509", options, dir);
  }

  private static fromPskFile(file: string): TlsCredentials {
    let text: string;
    try {
      text = fs.readFileSync(file, "utf8");
    } catch (err) {
      throw new Error(`TLS PSK file ${file}: ${(err as Error).message}`, { cause: err });
    }
    const keys = parsePskFile(text, file);
    const options: tls.TlsOptions = {
      minVersion: "TLSv1.2",
      ciphers: PSK_CIPHERS,
      dhparam: "auto",
      // An unknown identity gets no key, and the handshake fails.
      pskCallback: (_socket, identity) => keys.get(identity) ?? null,
    };
    return new TlsCredentials("psk", options, file);
  }

  /**
   * Run the server side of a TLS handshake on `socket` (paused, with nothing of the client's
   * unread in it). Resolves with the secure socket; rejects when the handshake fails or the client
   * certificate is refused (the socket is then destroyed). A tls.Server that never listens does
   * the work: it is Node's public way to get client certificates checked.
   */
  upgrade(socket: Socket): Promise<tls.TLSSocket> {
    return new Promise((resolve, reject) => {
      const server = tls.createServer(this.serverOptions);
      // The TLS socket inherits this: a client that hangs up mid-handshake must fail it, not
      // leave it half open until the handshake timeout.
      socket.allowHalfOpen = false;
      server.once("secureConnection", (secure: tls.TLSSocket) => {
        secure.allowHalfOpen = true; // as the plain socket: a client that shut down writing still gets its replies
        resolve(secure);
      });
      server.once("tlsClientError", (err: Error, secure: tls.TLSSocket) => {
        const refused = secure.authorizationError;
        // OpenSSL's errors carry their reason apart from the file and line noise.
        const reason = (err as Error & { reason?: string }).reason ?? err.message;
        reject(new Error(refused ? `client certificate refused: ${String(refused)}` : reason));
        socket.destroy();
      });
      server.emit("connection", socket);
    });
  }
}
