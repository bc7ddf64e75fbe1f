/**
 * Remote devices against real NBD servers the tests start on unix sockets and loopback TCP:
 * nbdkit (memory, file, and its error and delay filters), qemu-nbd (a qcow2 image, whose holes
 * come back as OFFSET_HOLE chunks) and another udmd (over a unix socket, and over TCP with TLS).
 * Tables name the exports by URI through udmsetup, and the I/O goes through this test's udmd's own
 * NBD export, as a user's would: linear and striped over remote exports, a persistent snapshot
 * whose origin is remote and whose COW is a local file, errors and delays as targets see them,
 * and the server killed (-9) and restarted under verified I/O and during FUA writes.
 *
 * Each group needs its tools; without them it is skipped with the reason printed (a failure with
 * UDM_REQUIRE_ROOT_TESTS=1, as in CI, where .ci/run installs nbdkit and qemu-utils).
 */
import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { CmdFlags } from "../../nbd/protocol.js";
import { type RunningDaemon, startDaemon, tempDir, udmsetup, useDaemon } from "../support/daemon.js";
import {
  type NbdkitServer,
  freePort,
  startNbdkit,
  startQemuNbd,
  startQemuStorageDaemon,
  stopNbdServers,
} from "../support/nbd-servers.js";
import { WireClient } from "../support/nbd-client.js";
import { missingTools } from "../support/requirements.js";
import { writePskFiles, makeX509Dirs } from "../support/tls-credentials.js";
import { sh } from "../support/tools.js";
import { cli, makeFile, nbdTcpPort } from "../support/udmd-tools.js";
import { BLOCK, IoStats, newWriteId, runWorker, stamp } from "../support/verified-io.js";
import { pattern } from "../../testing/memory-backing.js";
import { Rng } from "../../testing/rng.js";

const MiB = 1024 * 1024;
const missing = missingTools("remote device tests", [
  "nbdkit",
  "qemu-nbd",
  "qemu-img",
  "qemu-io",
  "qemu-storage-daemon",
  "nbdinfo",
  "openssl",
]);
const needs = (...tools: string[]) => tools.some((t) => (missing as string[]).includes(t));

const env = useDaemon("udm-nbd-remote-");
const ok = (...args: string[]) => cli(env.dir, ...args);
const clients: WireClient[] = [];
const daemons: RunningDaemon[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  // udmd first: stopping it flushes its devices, which would wait for servers already gone (up
  // to the I/O timeout) if they went first.
  await env.daemon.stop();
  stopNbdServers();
  for (const d of daemons.splice(0)) await d.stop();
});

/** A client of this test's udmd export `name`. */
async function connect(name: string): Promise<WireClient> {
  const c = await WireClient.connect(path.join(env.dir, "nbd.sock"), name);
  clients.push(c);
  return c;
}

async function readOk(c: WireClient, offset: number, length: number): Promise<Buffer> {
  const r = await c.read(offset, length);
  expect(r.error, r.message).toBe(0);
  return r.data!;
}

async function writeOk(c: WireClient, offset: number, data: Buffer, flags = 0): Promise<void> {
  const r = await c.write(offset, data, flags);
  expect(r.error, r.message).toBe(0);
}

describe.skipIf(needs("nbdkit"))("nbdkit exports in tables", () => {
  it("linear over nbdkit's memory plugin: I/O through udmd; table and deps print the URI as given", async () => {
    const nbdkit = await startNbdkit(env.files, "mem", ["memory", "64M"]);
    const uri = nbdkit.uri();
    await ok("create", "r", "--table", `0 65536 linear ${uri} 4096`);
    expect(await ok("table", "r")).toBe(`0 65536 linear ${uri} 4096\n`);
    expect(await ok("deps", "r")).toBe(`1 dependencies\t: (${uri})\n`);
    const c = await connect("r");
    const data = pattern(1, 4 * MiB);
    await writeOk(c, 3 * MiB, data, CmdFlags.FUA);
    expect((await readOk(c, 3 * MiB, 4 * MiB)).equals(data)).toBe(true);
    // The bytes are on nbdkit's disk, 4096 sectors (2 MiB) further in: a table over the whole
    // export sees them there (and shares the connection with the first).
    await ok("create", "whole", "--table", `0 131072 linear ${uri} 0`);
    const whole = await connect("whole");
    expect((await readOk(whole, 5 * MiB, 4 * MiB)).equals(data)).toBe(true);
  });

  it("striped over two exports (nbdkit memory and file): chunks alternate between them", async () => {
    const file = makeFile(path.join(env.files, "b.img"), 16 * MiB);
    const a = await startNbdkit(env.files, "a", ["memory", "16M"]);
    const b = await startNbdkit(env.files, "b", ["file", file]);
    // 2 stripes of 64 KiB (128 sectors).
    await ok("create", "s", "--table", `0 32768 striped 2 128 ${a.uri()} 0 ${b.uri()} 0`);
    expect(await ok("deps", "s")).toBe(`2 dependencies\t: (${b.uri()}) (${a.uri()})\n`);
    const c = await connect("s");
    const data = pattern(2, 1 * MiB);
    await writeOk(c, 0, data);
    await c.flush();
    expect((await readOk(c, 0, MiB)).equals(data)).toBe(true);
    // Odd 64 KiB chunks are in b.img, back to back.
    const onB = fs.readFileSync(file).subarray(0, MiB / 2);
    for (let i = 0; i < 8; i++) {
      const chunk = data.subarray((2 * i + 1) * 65536, (2 * i + 2) * 65536);
      expect(onB.subarray(i * 65536, (i + 1) * 65536).equals(chunk), `chunk ${2 * i + 1}`).toBe(true);
    }
  });

  it("a persistent snapshot whose origin is remote (read-only export) and whose COW is a local file", async () => {
    const base = path.join(env.files, "base.img");
    fs.writeFileSync(base, pattern(3, 8 * MiB));
    const nbdkit = await startNbdkit(env.files, "base", ["file", base], ["-r"]);
    const origin = nbdkit.uri();
    const cow = makeFile(path.join(env.files, "cow.img"), 4 * MiB);
    const table = `0 16384 snapshot ${origin} ${cow} P 8`;
    await ok("create", "vm", "--table", table);
    expect(await ok("table", "vm")).toBe(`${table}\n`);
    let c = await connect("vm");
    expect((await readOk(c, 0, MiB)).equals(pattern(3, 8 * MiB).subarray(0, MiB))).toBe(true);
    const mine = pattern(4, 256 * 1024);
    await writeOk(c, 2 * MiB, mine, CmdFlags.FUA);
    expect((await readOk(c, 2 * MiB, mine.length)).equals(mine)).toBe(true);
    expect(await ok("status", "vm")).toBe(`0 16384 snapshot ${(2 + 64) * 8}/8192 16\n`); // 64 chunks copied
    expect(fs.readFileSync(base).equals(pattern(3, 8 * MiB))).toBe(true); // the base image is untouched
    // Persistent: the snapshot comes back from the COW file with the write in it.
    c.destroy();
    await ok("remove", "vm");
    await ok("create", "vm", "--table", table);
    c = await connect("vm");
    expect((await readOk(c, 2 * MiB, mine.length)).equals(mine)).toBe(true);
    expect((await readOk(c, 0, 4096)).equals(pattern(3, 4096))).toBe(true);
  });

  it("a writable table over a read-only export is refused with EROFS", async () => {
    const nbdkit = await startNbdkit(env.files, "ro", ["memory", "1M"], ["-r"]);
    const r = await udmsetup(env.dir, ["create", "w", "--table", `0 2048 linear ${nbdkit.uri()} 0`]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("linear: Device lookup failed");
    expect(r.stderr).toContain("EROFS");
    await ok("create", "w", "--readonly", "--table", `0 2048 linear ${nbdkit.uri()} 0`);
  });

  it("nbdkit's error filter: reads fail with EIO while the trigger file exists, and work after", async () => {
    const trigger = path.join(env.files, "fail-reads");
    const nbdkit = await startNbdkit(
      env.files,
      "err",
      ["memory", "8M", "error-pread=EIO", "error-pread-rate=100%", `error-pread-file=${trigger}`],
      ["--filter=error"],
    );
    await ok("create", "e", "--table", `0 16384 linear ${nbdkit.uri()} 0`);
    const c = await connect("e");
    await writeOk(c, 0, pattern(5, 65536));
    fs.writeFileSync(trigger, "");
    const r = await c.read(0, 65536);
    expect(r.error).toBe(5); // EIO, as from a failing disk
    fs.rmSync(trigger);
    expect((await readOk(c, 0, 65536)).equals(pattern(5, 65536))).toBe(true);
  });

  it("a snapshot whose COW is remote becomes Invalid when the COW's writes fail", async () => {
    const trigger = path.join(env.files, "fail-writes");
    const nbdkit = await startNbdkit(
      env.files,
      "cow",
      ["memory", "4M", "error-pwrite=EIO", "error-pwrite-rate=100%", `error-pwrite-file=${trigger}`],
      ["--filter=error"],
    );
    const origin = makeFile(path.join(env.files, "origin.img"), 8 * MiB);
    await ok("create", "base", "--table", `0 16384 snapshot-origin ${origin}`);
    await ok("suspend", "base");
    await ok("create", "snap", "--table", `0 16384 snapshot ${origin} ${nbdkit.uri()} P 8`);
    await ok("resume", "base");
    expect(await ok("status", "snap")).toBe("0 16384 snapshot 16/8192 16\n");
    fs.writeFileSync(trigger, "");
    const c = await connect("base");
    await c.write(0, pattern(6, 4096)); // the chunk's copy to the COW fails
    expect(await ok("status", "snap")).toBe("0 16384 snapshot Invalid\n");
  });

  it("nbdkit's delay filter: a server slower than x-udm-timeout makes reads fail with EIO, writes in time succeed", async () => {
    const nbdkit = await startNbdkit(env.files, "slow", ["memory", "8M", "rdelay=2"], ["--filter=delay"]);
    await ok("create", "d", "--table", `0 16384 linear ${nbdkit.uri()}&x-udm-timeout=0.5 0`);
    const c = await connect("d");
    await writeOk(c, 0, pattern(7, 4096));
    const r = await c.read(0, 4096);
    expect(r.error).toBe(5);
  });

  it("nbdkit killed (-9) and restarted under verified I/O: no request fails, every read matches", async () => {
    const file = makeFile(path.join(env.files, "disk.img"), 16 * MiB);
    const nbdkit = await startNbdkit(env.files, "disk", ["file", file]);
    await ok("create", "v", "--table", `0 32768 linear ${nbdkit.uri()} 0`);
    await verifiedIoAcrossRestarts(nbdkit, "v", 16 * MiB, 2);
  });

  it("kill -9 during FUA writes: every FUA write completes after the restart and is in the file", async () => {
    const file = makeFile(path.join(env.files, "fua.img"), 8 * MiB);
    const nbdkit = await startNbdkit(env.files, "fua", ["file", file]);
    await ok("create", "f", "--table", `0 16384 linear ${nbdkit.uri()} 0`);
    const c = await connect("f");
    const writes = Array.from({ length: 64 }, (_, i) => stamp(newWriteId(), i * 128, 128));
    const restart: { done: Promise<void> | null } = { done: null };
    const done = writes.map((data, i) =>
      c.write(i * BLOCK, data, CmdFlags.FUA).then((r) => {
        restart.done ??= nbdkit.kill("SIGKILL").then(() => nbdkit.restart()); // at the first completion
        return r;
      }),
    );
    const replies = await Promise.all(done);
    await restart.done;
    expect(replies.map((r) => r.error)).toEqual(writes.map(() => 0));
    // The kill came with FUA writes in flight, and udmd sent them again.
    expect(retriedAfterLoss(env.daemon)).toBeGreaterThan(0);
    const onDisk = fs.readFileSync(file);
    writes.forEach((data, i) => expect(onDisk.subarray(i * BLOCK, i * BLOCK + BLOCK).equals(data)).toBe(true));
  });
});

/**
 * Verified I/O (test/support/verified-io.ts) on udmd's export `name` while `server` is killed
 * (-9) and restarted `restarts` times: each kill comes after some writes completed, each restart
 * as soon as the server is gone; the run ends after more verified reads following the last one.
 */
async function verifiedIoAcrossRestarts(server: NbdkitServer, name: string, size: number, restarts: number) {
  const c = await connect(name);
  const model = { name, expected: Buffer.alloc(size) };
  const stats = new IoStats();
  const blocks = Array.from({ length: size / BLOCK }, (_, i) => i);
  let round = 0;
  let restarting: Promise<void> | null = null;
  let readsAtLastRestart = Infinity;
  const stop = () => {
    if (round < restarts && restarting === null && stats.writes >= (round + 1) * 200) {
      round++;
      restarting = server
        .kill("SIGKILL")
        .then(() => server.restart())
        .then(() => {
          readsAtLastRestart = stats.verifiedReads;
          restarting = null;
        });
    }
    return round === restarts && restarting === null && stats.verifiedReads >= readsAtLastRestart + 300;
  };
  await runWorker({ client: c, model, own: blocks, still: [], queueDepth: 16, rng: new Rng(20) }, stats, stop);
  expect(stats.mismatches).toEqual([]);
  expect(stats.errors).toEqual([]);
  expect(stats.verifiedReads).toBeGreaterThan(300);
  expect(logLines(env.daemon, "nbd: reconnected").length).toBeGreaterThanOrEqual(restarts);
}

/** udmd's JSON log lines with message `msg`. */
function logLines(daemon: RunningDaemon, msg: string): Record<string, unknown>[] {
  return daemon
    .stderr()
    .split("\n")
    .filter((l) => l.startsWith("{") && l.includes(JSON.stringify(msg)))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** Requests udmd's NBD client had in flight when it lost a connection, in total. */
function retriedAfterLoss(daemon: RunningDaemon): number {
  return logLines(daemon, "nbd: connection lost").reduce((n, l) => n + Number(l.retrying ?? 0), 0);
}

describe.skipIf(needs("qemu-nbd", "qemu-img", "qemu-io"))("qemu-nbd exports in tables", () => {
  it("linear over a qcow2 image served by qemu-nbd: unallocated clusters read as zeros, writes land", async () => {
    const image = path.join(env.files, "disk.qcow2");
    await sh("qemu-img", "create", "-q", "-f", "qcow2", image, "64M");
    await sh("qemu-io", "-f", "qcow2", image, "-c", "write -P 0x5c 1M 1M");
    const q = await startQemuNbd(env.files, "qemu", image, "qcow2", "disk");
    await ok("create", "q", "--table", `0 131072 linear ${q.uri} 0`);
    const c = await connect("q");
    expect(
      (await readOk(c, 0, 3 * MiB)).equals(
        Buffer.concat([Buffer.alloc(MiB), Buffer.alloc(MiB, 0x5c), Buffer.alloc(MiB)]),
      ),
    ).toBe(true);
    await writeOk(c, 8 * MiB, pattern(8, MiB));
    await c.flush();
    expect((await readOk(c, 8 * MiB, MiB)).equals(pattern(8, MiB))).toBe(true);
    expect(await sh("qemu-io", "-r", "-f", "raw", q.uri, "-c", "read -P 0x5c 1M 1M")).toMatch(/read 1048576/);
  });
});

describe.skipIf(needs("openssl"))("another udmd's exports", () => {
  it("over its unix socket: udm stacked on udm", async () => {
    const server = await startDaemon(tempDir());
    daemons.push(server);
    const file = makeFile(path.join(env.files, "lower.img"), 8 * MiB);
    await cli(server.dir, "create", "lower", "--table", `0 16384 linear ${file} 0`);
    const uri = `nbd+unix:///lower?socket=${server.dir}/nbd.sock`;
    await ok("create", "upper", "--table", `0 8192 linear ${uri} 8192`);
    const c = await connect("upper");
    await writeOk(c, 0, pattern(9, MiB), CmdFlags.FUA);
    expect(
      fs
        .readFileSync(file)
        .subarray(4 * MiB, 5 * MiB)
        .equals(pattern(9, MiB)),
    ).toBe(true);
    // The lower device is open while the upper table holds it.
    const r = await udmsetup(server.dir, ["remove", "lower"]);
    expect(r.code).toBe(1);
  });

  it("over TCP with TLS (pre-shared keys, then x509); plaintext is refused with a reason", async () => {
    const creds = tempDir("udm-nbd-remote-creds-");
    try {
      const psk = writePskFiles(creds, "alice");
      const server = await startDaemon(tempDir(), [
        "--nbd-listen",
        "127.0.0.1:0",
        "--tls=require",
        "--tls-psk",
        psk.file,
      ]);
      daemons.push(server);
      const file = makeFile(path.join(env.files, "tls.img"), 4 * MiB);
      await cli(server.dir, "create", "vol", "--table", `0 8192 linear ${file} 0`);
      const port = nbdTcpPort(server);
      const plain = await udmsetup(env.dir, ["create", "p", "--table", `0 8192 linear nbd://127.0.0.1:${port}/vol 0`]);
      expect(plain.code).toBe(1);
      expect(plain.stderr).toContain("Permission denied");
      const uri = `nbds://alice@127.0.0.1:${port}/vol?tls-psk-file=${psk.file}`;
      await ok("create", "t", "--table", `0 8192 linear ${uri} 0`);
      const c = await connect("t");
      await writeOk(c, 0, pattern(10, MiB));
      expect((await readOk(c, 0, MiB)).equals(pattern(10, MiB))).toBe(true);
      expect(fs.readFileSync(file).subarray(0, MiB).equals(pattern(10, MiB))).toBe(true);

      const pki = await makeX509Dirs(creds);
      const x509 = await startDaemon(tempDir(), [
        "--nbd-listen",
        "127.0.0.1:0",
        "--tls=require",
        "--tls-certificates",
        pki.server,
      ]);
      daemons.push(x509);
      await cli(x509.dir, "create", "vol", "--table", `0 8192 linear ${file} 0`);
      const xport = nbdTcpPort(x509);
      await ok(
        "create",
        "x",
        "--table",
        `0 8192 linear nbds://localhost:${xport}/vol?tls-certificates=${pki.client} 0`,
      );
      const cx = await connect("x");
      expect((await readOk(cx, 0, MiB)).equals(pattern(10, MiB))).toBe(true);
      const stranger = await udmsetup(env.dir, [
        "create",
        "s",
        "--table",
        `0 8192 linear nbds://localhost:${xport}/vol?tls-certificates=${pki.stranger} 0`,
      ]);
      expect(stranger.code).toBe(1);
      expect(stranger.stderr).toContain("Permission denied"); // EACCES: the TLS handshake failed
    } finally {
      fs.rmSync(creds, { recursive: true, force: true });
    }
  });
});

describe.skipIf(needs("qemu-storage-daemon", "nbdinfo", "openssl"))("the scale-out recipe (docs/nbd.md)", () => {
  it("a base image exported read-only by qemu-storage-daemon over TLS, a local COW per host", async () => {
    const creds = tempDir("udm-nbd-remote-pki-");
    try {
      const pki = await makeX509Dirs(creds);
      const image = path.join(env.files, "debian12.raw");
      fs.writeFileSync(image, pattern(11, 8 * MiB));
      const storage = await startQemuStorageDaemon(env.files, image, "debian12", await freePort(), pki.server);
      // The host's side, as the recipe has it.
      const base = storage.uri(pki.client);
      const sectors = Number((await sh("nbdinfo", "--size", base)).trim()) / 512;
      const cow = makeFile(path.join(env.files, "vm1.cow"), 4 * MiB);
      await ok("create", "vm1", "--table", `0 ${sectors} snapshot ${base} ${cow} P 8`);
      const c = await connect("vm1");
      expect((await readOk(c, 0, MiB)).equals(pattern(11, MiB))).toBe(true);
      await writeOk(c, MiB, pattern(12, 64 * 1024), CmdFlags.FUA);
      expect((await readOk(c, MiB, 64 * 1024)).equals(pattern(12, 64 * 1024))).toBe(true);
      expect(fs.readFileSync(image).equals(pattern(11, 8 * MiB))).toBe(true);
    } finally {
      fs.rmSync(creds, { recursive: true, force: true });
    }
  });
});
