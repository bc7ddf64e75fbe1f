/**
 * TLS credentials for the NBD TLS tests, laid out as nbdkit, qemu and libnbd expect them: a PSK
 * file in psktool's format (`identity:hexkey`), qemu's PSK directory (keys.psk), and x509
 * directories made with openssl (a CA, a server certificate for 127.0.0.1 and localhost, a client
 * certificate; and a client whose certificate another CA signed).
 */
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { toolOk } from "./tools.js";

export interface PskFiles {
  identity: string;
  key: Buffer;
  /** psktool format: what udmd's --tls-psk and libnbd's tls-psk-file= take. */
  file: string;
  /** qemu's tls-creds-psk dir= (the same key in DIR/keys.psk). */
  qemuDir: string;
}

/** A fresh random key for `identity` in `dir`. */
export function writePskFiles(dir: string, identity: string, name = "psk"): PskFiles {
  const key = crypto.randomBytes(32);
  const line = `${identity}:${key.toString("hex")}\n`;
  const file = path.join(dir, `${name}.keys`);
  fs.writeFileSync(file, line, { mode: 0o600 });
  const qemuDir = path.join(dir, `${name}-qemu`);
  fs.mkdirSync(qemuDir, { recursive: true });
  fs.writeFileSync(path.join(qemuDir, "keys.psk"), line, { mode: 0o600 });
  return { identity, key, file, qemuDir };
}

export interface X509Dirs {
  /** udmd --tls-certificates: ca-cert.pem, server-cert.pem, server-key.pem. */
  server: string;
  /** libnbd tls-certificates= and qemu tls-creds-x509 dir=: ca-cert.pem, client-cert.pem, client-key.pem. */
  client: string;
  /** Like `client`, but the client certificate is signed by a CA the server does not know. */
  stranger: string;
}

/** A CA, a server and a client certificate (EC P-256, valid for two days), made with openssl. */
export async function makeX509Dirs(dir: string): Promise<X509Dirs> {
  const work = path.join(dir, "pki-work");
  const dirs: X509Dirs = {
    server: path.join(dir, "server"),
    client: path.join(dir, "client"),
    stranger: path.join(dir, "stranger"),
  };
  for (const d of [work, ...Object.values(dirs)]) fs.mkdirSync(d, { recursive: true });
  const at = (name: string) => path.join(work, name);
  const newKey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  const ca = async (name: string, cn: string) => {
    await toolOk("openssl", [
      "req",
      "-x509",
      ...newKey,
      "-keyout",
      at(`${name}-key.pem`),
      "-out",
      at(`${name}-cert.pem`),
      "-days",
      "2",
      "-subj",
      `/CN=${cn}`,
    ]);
  };
  const signed = async (name: string, cn: string, by: string, extensions: string) => {
    fs.writeFileSync(at(`${name}.ext`), extensions);
    await toolOk("openssl", [
      "req",
      ...newKey,
      "-keyout",
      at(`${name}-key.pem`),
      "-out",
      at(`${name}.csr`),
      "-subj",
      `/CN=${cn}`,
    ]);
    const sign = [
      "-CA",
      at(`${by}-cert.pem`),
      "-CAkey",
      at(`${by}-key.pem`),
      "-CAcreateserial",
      "-days",
      "2",
      "-extfile",
      at(`${name}.ext`),
    ];
    await toolOk("openssl", ["x509", "-req", "-in", at(`${name}.csr`), ...sign, "-out", at(`${name}-cert.pem`)]);
  };
  await ca("ca", "udm test CA");
  await ca("other-ca", "some other CA");
  const usage = "keyUsage=digitalSignature\n";
  await signed(
    "server",
    "localhost",
    "ca",
    `subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n${usage}`,
  );
  await signed("client", "udm test client", "ca", `extendedKeyUsage=clientAuth\n${usage}`);
  await signed("stranger", "udm test stranger", "other-ca", `extendedKeyUsage=clientAuth\n${usage}`);
  const copy = (from: string, to: string) => fs.copyFileSync(at(from), to);
  copy("ca-cert.pem", path.join(dirs.server, "ca-cert.pem"));
  copy("server-cert.pem", path.join(dirs.server, "server-cert.pem"));
  copy("server-key.pem", path.join(dirs.server, "server-key.pem"));
  for (const [who, d] of [
    ["client", dirs.client],
    ["stranger", dirs.stranger],
  ] as const) {
    copy("ca-cert.pem", path.join(d, "ca-cert.pem"));
    copy(`${who}-cert.pem`, path.join(d, "client-cert.pem"));
    copy(`${who}-key.pem`, path.join(d, "client-key.pem"));
  }
  fs.rmSync(work, { recursive: true, force: true });
  return dirs;
}
