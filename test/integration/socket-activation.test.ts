/**
 * Socket activation (issue 18 item 14): udmd started as systemd starts a socket-activated service,
 * with listening sockets made before it as descriptors 3, 4, ... and LISTEN_PID, LISTEN_FDS,
 * LISTEN_FDNAMES. udmsetup reaches it through the passed control socket, qemu-io and nbdinfo
 * (clients no one here wrote) through the passed NBD sockets, unix and TCP; a clean stop leaves
 * the socket files (systemd's), and a second udmd serves on the same sockets, as after a restart.
 * A descriptor udmd cannot use, or a name it does not know, stops it before it takes anything.
 */
import { type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { tempDir, udmsetup } from "../support/daemon.js";
import { missingToolsReason, skipOrFail } from "../support/requirements.js";
import { closeFd, type PassedFd, spawnActivated, tcpSocketFd, unixSocketFd } from "../support/socket-activation.js";
import { tool } from "../support/tools.js";

const skipReason = missingToolsReason(["qemu-io", "nbdinfo"]);
skipOrFail("socket activation tests", skipReason);

interface Activated {
  proc: ChildProcess;
  stderr(): string;
  exit: Promise<number | null>;
}

/** udmd with `sockets` passed; resolves once it logs "udmd started" (rejects if it exits first). */
async function startActivated(sockets: PassedFd[], args: string[]): Promise<Activated> {
  const proc = spawnActivated(sockets, args);
  let stderr = "";
  proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  proc.stdout!.resume();
  const exit = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  await new Promise<void>((resolve, reject) => {
    proc.stderr!.on("data", () => stderr.includes('"udmd started"') && resolve());
    void exit.then((code) => reject(new Error(`udmd exited with ${code}: ${stderr}`)));
  });
  return { proc, stderr: () => stderr, exit };
}

/** udmd with `sockets` passed, expected to refuse them: its exit status and stderr. */
async function refused(sockets: PassedFd[], args: string[]): Promise<{ code: number | null; stderr: string }> {
  const proc = spawnActivated(sockets, args);
  let stderr = "";
  proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  proc.stdout!.resume();
  const code = await new Promise<number | null>((r) => proc.once("exit", (c) => r(c)));
  return { code, stderr };
}

describe.skipIf(skipReason !== null)("udmd on sockets passed by a service manager", () => {
  let runDir: string;
  let files: string;
  const fds: number[] = [];
  const procs: ChildProcess[] = [];
  const keep = (fd: number) => (fds.push(fd), fd);

  beforeEach(() => {
    runDir = tempDir("udm-activated-run-");
    files = tempDir("udm-activated-files-");
  });
  afterEach(() => {
    for (const p of procs.splice(0)) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
    for (const fd of fds.splice(0)) closeFd(fd);
    for (const d of [runDir, files]) fs.rmSync(d, { recursive: true, force: true });
  });

  it("serves udmsetup and NBD clients on sockets named control and nbd, leaves them at stop, and a restart serves on them again", async () => {
    const controlPath = path.join(runDir, "control");
    const nbdPath = path.join(files, "exports.sock"); // not the run directory's nbd.sock
    const tcp = tcpSocketFd();
    keep(tcp.fd);
    const sockets: PassedFd[] = [
      { fd: keep(unixSocketFd(controlPath)), name: "control" },
      { fd: keep(unixSocketFd(nbdPath)), name: "nbd" },
      { fd: tcp.fd, name: "nbd" },
    ];
    const img = path.join(files, "disk.img");
    fs.writeFileSync(img, Buffer.alloc(1024 * 1024));

    const first = await startActivated(sockets, ["--run-dir", runDir]);
    procs.push(first.proc);
    expect(await udmsetup(runDir, ["create", "vol", "--table", `0 2048 linear ${img} 0`])).toMatchObject({ code: 0 });
    const info = await udmsetup(runDir, ["--json", "info", "vol"]);
    const uri = (JSON.parse(info.stdout) as { nbdUri: string }).nbdUri;
    expect(uri).toBe(`nbd+unix:///vol?socket=${nbdPath}`);
    // udmd made no NBD socket of its own: the passed one is it.
    expect(fs.existsSync(path.join(runDir, "nbd.sock"))).toBe(false);

    const write = await tool("qemu-io", ["-f", "raw", uri, "-c", "write -P 0x5a 4096 65536"]);
    expect(write.code, write.stderr + write.stdout).toBe(0);
    const tcpUri = `nbd://127.0.0.1:${tcp.port}/vol`;
    const read = await tool("qemu-io", ["-f", "raw", tcpUri, "-c", "read -P 0x5a 4096 65536"]);
    expect(read.code, read.stderr + read.stdout).toBe(0);
    expect(read.stdout).not.toMatch(/Pattern verification failed/);
    expect(
      fs
        .readFileSync(img)
        .subarray(4096, 4096 + 65536)
        .every((b) => b === 0x5a),
    ).toBe(true);

    first.proc.kill("SIGTERM");
    expect(await first.exit).toBe(0);
    // The service manager's files stay; the daemon's own (pid, lock, attach.sock, devices.json) go.
    expect(fs.lstatSync(controlPath).isSocket()).toBe(true);
    expect(fs.lstatSync(nbdPath).isSocket()).toBe(true);
    expect(fs.readdirSync(runDir)).toEqual(["control"]);

    // Restarted on the same sockets, as systemd does: a client that connects while no udmd
    // runs waits in the listen queue, and the next udmd answers it.
    const waiting = udmsetup(runDir, ["create", "again", "--table", "0 8 zero"]);
    const second = await startActivated(sockets, ["--run-dir", runDir]);
    procs.push(second.proc);
    expect(await waiting).toMatchObject({ code: 0 });
    const size = await tool("nbdinfo", ["--size", `nbd+unix:///again?socket=${nbdPath}`]);
    expect(size.stdout.trim(), size.stderr).toBe("4096");
    second.proc.kill("SIGTERM");
    expect(await second.exit).toBe(0);
    expect(fs.readdirSync(runDir)).toEqual(["control"]);
  }, 60_000);

  it("tells sockets by their address when they carry systemd's default name, and its children inherit neither the sockets nor LISTEN_*", async () => {
    const tcp = tcpSocketFd();
    keep(tcp.fd);
    const sockets: PassedFd[] = [
      { fd: keep(unixSocketFd(path.join(runDir, "control"))), name: "udmd.socket" },
      { fd: keep(unixSocketFd(path.join(runDir, "nbd.sock"))), name: "udmd.socket" },
      { fd: tcp.fd, name: "udmd-tcp.socket" },
    ];
    fs.writeFileSync(path.join(files, "z.table"), "0 16 zero\n");
    const out = path.join(files, "out");
    // CMD: the variables (absent), the passed sockets among its shell's descriptors (none), and
    // NBD over the passed TCP socket, which --nbd-listen names and udmd therefore does not bind.
    const cmd =
      `echo "\${LISTEN_PID-unset} \${LISTEN_FDS-unset} \${LISTEN_FDNAMES-unset} $socket" > ${out}; ` +
      `for f in /proc/$$/fd/*; do echo "$f $(readlink "$f")"; done >> ${out}; ` +
      `nbdinfo --size "nbd://127.0.0.1:${tcp.port}/z" >> ${out};`;
    const r = await refused(sockets, [
      "--run-dir",
      runDir,
      "--nbd-listen",
      `127.0.0.1:${tcp.port}`,
      "--run",
      cmd,
      "--device",
      `z=${path.join(files, "z.table")}`,
    ]);
    expect(r.code, r.stderr).toBe(0);
    const [vars, ...rest] = fs.readFileSync(out, "utf8").trimEnd().split("\n");
    expect(vars).toBe(`unset unset unset ${path.join(runDir, "nbd.sock")}`);
    expect(rest.at(-1)).toBe("8192");
    const links = rest.slice(0, -1).map((line) => line.split(" ")[1]);
    expect(links.length).toBeGreaterThanOrEqual(3); // the listing worked: stdin, stdout, stderr at least
    const passed = sockets.map((s) => `socket:[${fs.fstatSync(s.fd).ino}]`);
    expect(links.filter((link) => passed.includes(link!))).toEqual([]);
    expect(fs.readdirSync(runDir).sort()).toEqual(["control", "nbd.sock"]);
  }, 60_000);

  it("serves NBD on an abstract unix socket, and makes RUN_DIR/nbd.sock for the URIs, which need a path", async () => {
    const abstract = `@udm-test-${process.pid}-${path.basename(runDir)}`;
    const sockets: PassedFd[] = [
      { fd: keep(unixSocketFd(path.join(runDir, "control"))), name: "control" },
      { fd: keep(unixSocketFd(abstract)), name: "nbd" },
    ];
    const daemon = await startActivated(sockets, ["--run-dir", runDir]);
    procs.push(daemon.proc);
    expect(await udmsetup(runDir, ["create", "z", "--table", "0 8 zero"])).toMatchObject({ code: 0 });
    const info = JSON.parse((await udmsetup(runDir, ["--json", "info", "z"])).stdout) as { nbdUri: string };
    expect(info.nbdUri).toBe(`nbd+unix:///z?socket=${path.join(runDir, "nbd.sock")}`);
    const size = await tool("nbdinfo", ["--size", info.nbdUri]);
    expect(size.stdout.trim(), size.stderr).toBe("4096");
    // The abstract socket answers with NBD's greeting (no client here takes an abstract address).
    const greeting = await new Promise<Buffer>((resolve, reject) => {
      const socket = net.connect(`\0${abstract.slice(1)}`);
      let got = Buffer.alloc(0);
      socket.on("data", (d: Buffer) => {
        got = Buffer.concat([got, d]);
        if (got.length >= 8) {
          socket.destroy();
          resolve(got);
        }
      });
      socket.once("error", reject);
    });
    expect(greeting.subarray(0, 8).toString("latin1")).toBe("NBDMAGIC");
    daemon.proc.kill("SIGTERM");
    expect(await daemon.exit).toBe(0);
    expect(fs.readdirSync(runDir)).toEqual(["control"]);
  }, 60_000);

  it("warns about a passed NBD socket file others may connect to, and a control socket udmsetup will not find", async () => {
    const controlPath = path.join(files, "control");
    const nbdPath = path.join(files, "open.sock");
    const sockets: PassedFd[] = [
      { fd: keep(unixSocketFd(controlPath)), name: "control" },
      { fd: keep(unixSocketFd(nbdPath)), name: "nbd" },
    ];
    fs.chmodSync(nbdPath, 0o666);
    const daemon = await startActivated(sockets, ["--run-dir", runDir]);
    procs.push(daemon.proc);
    const warnings = daemon
      .stderr()
      .split("\n")
      .filter((l) => l.includes('"level":"warn"'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(warnings).toEqual([
      expect.objectContaining({
        msg: "control socket passed outside the run directory: udmsetup looks for its own",
        socket: controlPath,
        udmsetup: path.join(runDir, "control"),
      }),
      expect.objectContaining({
        msg: "nbd: passed socket is writable by others: they can read and write every device",
        socket: nbdPath,
        mode: "0666",
      }),
    ]);
    daemon.proc.kill("SIGTERM");
    expect(await daemon.exit).toBe(0);
  }, 60_000);

  it("refuses a descriptor that is not a listening socket, and a name it does not know, before taking anything", async () => {
    const file = path.join(files, "not-a-socket");
    fs.writeFileSync(file, "");
    const notSocket = await refused([{ fd: keep(fs.openSync(file, "r")), name: "control" }], ["--run-dir", runDir]);
    expect(notSocket.code).toBe(1);
    expect(notSocket.stderr).toContain("udmd: cannot start: fd 3 (control) is not a socket but a regular file\n");

    const idle = path.join(files, "idle.sock");
    const notListening = await refused(
      [{ fd: keep(unixSocketFd(idle, { listen: false })), name: "nbd" }],
      ["--run-dir", runDir],
    );
    expect(notListening.code).toBe(1);
    expect(notListening.stderr).toContain("fd 3 (nbd) is not listening; udmd needs listening sockets");

    const misnamed = await refused(
      [
        { fd: keep(unixSocketFd(path.join(files, "c.sock"))), name: "control" },
        { fd: keep(unixSocketFd(path.join(files, "n.sock"))), name: "nbd-unix" },
      ],
      ["--run-dir", runDir],
    );
    expect(misnamed.code).toBe(1);
    expect(misnamed.stderr).toContain(
      `fd 4 (nbd-unix) on ${path.join(files, "n.sock")}: unknown socket name 'nbd-unix'`,
    );
    // Nothing was taken: no lock, no pid file, no socket of udmd's own.
    expect(fs.readdirSync(runDir)).toEqual([]);
  }, 60_000);
});
