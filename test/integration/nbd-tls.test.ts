/**
 * udmd's NBD over TLS against real clients: libnbd's nbdinfo and nbdcopy (`nbds://`,
 * `nbds+unix://` with tls-psk-file= and tls-certificates=) and qemu-img (tls-creds-psk,
 * tls-creds-x509), byte for byte; `--tls=require` turning plaintext clients away with a reason;
 * wrong keys and strangers' certificates refused. Tools that are missing skip the file with a
 * printed reason (a failure with UDM_REQUIRE_ROOT_TESTS=1).
 */
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type RunningDaemon, startDaemon, stderrMatches, tempDir, udmsetup, useDaemon } from "../support/daemon.js";
import { missingToolsReason, skipOrFail } from "../support/requirements.js";
import { type PskFiles, type X509Dirs, makeX509Dirs, writePskFiles } from "../support/tls-credentials.js";
import { tool, toolOk } from "../support/tools.js";
import { nbdTcpPort } from "../support/udmd-tools.js";

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const skip = skipOrFail("NBD TLS client tests", missingToolsReason(["nbdinfo", "nbdcopy", "qemu-img", "openssl"]));

/** Credentials live outside the run directory, made before the daemon of this file starts. */
const creds = tempDir("udm-nbd-tls-creds-");
const psk: PskFiles = writePskFiles(creds, "udmtest");
const wrongPsk: PskFiles = writePskFiles(creds, "udmtest", "wrong");
afterAll(() => fs.rmSync(creds, { recursive: true, force: true }));

/** A linear device `vol` over a file of random bytes; the file and its content. */
async function createVolume(dir: string, files: string): Promise<{ file: string; content: Buffer }> {
  const content = crypto.randomBytes(SIZE);
  const file = path.join(files, "vol.img");
  fs.writeFileSync(file, content);
  const r = await udmsetup(dir, ["create", "vol", "--table", `0 ${SIZE / 512} linear ${file} 0`]);
  expect(r.stderr).toBe("");
  return { file, content };
}

const qemuTarget = (port: number, creds: string) =>
  `driver=nbd,host=127.0.0.1,port=${port},export=vol,tls-creds=${creds}`;

describe.skipIf(skip)("TLS with pre-shared keys (--tls=require --tls-psk)", () => {
  const env = useDaemon("udm-nbd-tls-", {
    args: ["--nbd-listen", "127.0.0.1:0", "--tls=require", "--tls-psk", psk.file],
  });
  let port: number;
  let vol: { file: string; content: Buffer };
  const nbds = (keys = psk.file) => `nbds://${psk.identity}@127.0.0.1:${port}/vol?tls-psk-file=${keys}`;
  const nbdsUnix = () => `nbds+unix://${psk.identity}@/vol?socket=${env.dir}/nbd.sock&tls-psk-file=${psk.file}`;

  beforeEach(async () => {
    port = nbdTcpPort(env.daemon);
    vol = await createVolume(env.dir, env.files);
  });

  it("nbdinfo connects over TCP and the unix socket with TLS", async () => {
    for (const uri of [nbds(), nbdsUnix()]) {
      const info = JSON.parse((await toolOk("nbdinfo", ["--json", uri])).stdout) as {
        TLS: boolean;
        exports: { "export-size": number }[];
      };
      expect(info.TLS).toBe(true);
      expect(info.exports[0]!["export-size"]).toBe(SIZE);
    }
    expect(env.daemon.stderr()).toMatch(/"msg":"nbd TLS established".*"protocol":"TLSv1.3"/);
  });

  it("nbdcopy writes and reads the device through TLS byte for byte", async () => {
    const source = crypto.randomBytes(SIZE);
    const input = path.join(env.files, "in.img");
    const output = path.join(env.files, "out.img");
    fs.writeFileSync(input, source);
    await toolOk("nbdcopy", [input, nbds()]);
    expect(fs.readFileSync(vol.file).equals(source)).toBe(true);
    await toolOk("nbdcopy", [nbdsUnix(), output]);
    expect(fs.readFileSync(output).equals(source)).toBe(true);
  });

  it("qemu-img reads and writes it with tls-creds-psk", async () => {
    const object = `tls-creds-psk,id=tls0,endpoint=client,dir=${psk.qemuDir},username=${psk.identity}`;
    const info = await toolOk("qemu-img", ["info", "--object", object, "--image-opts", qemuTarget(port, "tls0")]);
    expect(info.stdout).toMatch(new RegExp(`virtual size: 8 MiB \\(${SIZE} bytes\\)`));
    const source = crypto.randomBytes(SIZE);
    const input = path.join(env.files, "qemu-in.img");
    fs.writeFileSync(input, source);
    await toolOk("qemu-img", [
      "convert",
      "-n",
      "--object",
      object,
      "-f",
      "raw",
      input,
      "--target-image-opts",
      qemuTarget(port, "tls0"),
    ]);
    expect(fs.readFileSync(vol.file).equals(source)).toBe(true);
  });

  it("turns plaintext TCP clients away, saying TLS is required", async () => {
    const plain = await tool("nbdinfo", ["--size", `nbd://127.0.0.1:${port}/vol`]);
    expect(plain.code).not.toBe(0);
    expect(plain.stderr).toMatch(/server requires TLS/);
    const qemu = await tool("qemu-img", ["info", `nbd://127.0.0.1:${port}/vol`]);
    expect(qemu.code).not.toBe(0);
    expect(qemu.stderr).toMatch(/TLS is required/);
    // The unix socket (mode 0600) offers TLS without requiring it: attach's nbdfuse uses it plain.
    expect((await toolOk("nbdinfo", ["--size", `nbd+unix:///vol?socket=${env.dir}/nbd.sock`])).stdout).toBe(
      `${SIZE}\n`,
    );
  });

  it("refuses a client with the wrong key", async () => {
    const wrong = await tool("nbdinfo", ["--size", nbds(wrongPsk.file)]);
    expect(wrong.code).not.toBe(0);
    expect(wrong.stdout).toBe("");
    // The client gives up before the server has logged why: wait for the line, then it is there.
    await stderrMatches(env.daemon, /"msg":"nbd TLS handshake failed, closing connection"/);
  });
});

describe.skipIf(skip)("TLS with x509 certificates (--tls=require --tls-certificates)", () => {
  let pki: X509Dirs;
  let dir: string;
  let files: string;
  let daemon: RunningDaemon;
  let port: number;
  let vol: { file: string; content: Buffer };
  const nbds = (certs: string) => `nbds://127.0.0.1:${port}/vol?tls-certificates=${certs}`;

  beforeAll(async () => {
    pki = await makeX509Dirs(path.join(creds, "x509"));
    dir = tempDir();
    files = tempDir("udm-nbd-x509-");
    daemon = await startDaemon(dir, ["--nbd-listen", "127.0.0.1:0", "--tls=require", "--tls-certificates", pki.server]);
    port = nbdTcpPort(daemon);
    vol = await createVolume(dir, files);
  });

  afterAll(async () => {
    await daemon?.stop();
    for (const d of [dir, files]) if (d) fs.rmSync(d, { recursive: true, force: true });
  });

  it("nbdinfo and nbdcopy connect with a client certificate the CA signed", async () => {
    expect((await toolOk("nbdinfo", ["--size", nbds(pki.client)])).stdout).toBe(`${SIZE}\n`);
    const unix = `nbds+unix:///vol?socket=${dir}/nbd.sock&tls-certificates=${pki.client}`;
    const output = path.join(files, "out.img");
    await toolOk("nbdcopy", [unix, output]);
    expect(fs.readFileSync(output).equals(vol.content)).toBe(true);
  });

  it("qemu-img reads it with tls-creds-x509", async () => {
    const object = `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.client}`;
    const output = path.join(files, "qemu-out.img");
    await toolOk("qemu-img", [
      "convert",
      "--object",
      object,
      "--image-opts",
      qemuTarget(port, "tls0"),
      "-O",
      "raw",
      output,
    ]);
    expect(fs.readFileSync(output).equals(vol.content)).toBe(true);
  });

  it("refuses a client whose certificate another CA signed", async () => {
    const r = await tool("nbdinfo", ["--size", nbds(pki.stranger)]);
    expect(r.code).not.toBe(0);
    expect(r.stdout).toBe("");
    await stderrMatches(daemon, /"msg":"nbd TLS handshake failed, closing connection"/);
  });
});
