/**
 * The systemd units in docs/cli.md ("As a systemd service"), started the way systemd starts them.
 *
 * The plain service: the runtime directory made first with RuntimeDirectoryMode, the ExecStart
 * command line (with the built udmd in place of /usr/local/bin/udmd and a private directory in
 * place of /run/udm), then KillSignal, which must stop udmd cleanly (exit 0, run directory
 * emptied) within TimeoutStopSec.
 *
 * Socket activation: the .socket units' ListenStream= sockets made as systemd makes them (the
 * directory with DirectoryMode, the files with SocketMode; unix paths moved under a private
 * directory, the TCP port one the kernel picks), named as systemd names them (FileDescriptorName=,
 * else the unit's name) and passed as descriptors 3.. to the socket-activated service's ExecStart;
 * udmsetup and qemu-io work through them, KillSignal stops udmd and the socket files stay. Then
 * the same with systemd's own systemd-socket-activate, which starts udmd on the first connection.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { UDMD, udmsetup } from "../support/daemon.js";
import { missingToolsReason, skipOrFail } from "../support/requirements.js";
import { closeFd, type PassedFd, spawnActivated, tcpSocketFd, unixSocketFd } from "../support/socket-activation.js";
import { tool } from "../support/tools.js";

const doc = fs.readFileSync(path.join(import.meta.dirname, "../../docs/cli.md"), "utf8");
const section = doc.slice(doc.indexOf("### As a systemd service"), doc.indexOf("### udmsetup daemon, daemon stop"));
const activation = section.slice(section.indexOf("#### Socket activation"));

interface Unit {
  /** The unit's file name, from the `# /etc/systemd/system/NAME` line that opens the block. */
  name: string;
  /** `[Section]` → its keys in order (a key may repeat, as ListenStream= does). */
  sections: Map<string, [string, string][]>;
}

/** The ```ini blocks of `text`, parsed. */
function units(text: string): Unit[] {
  return [...text.matchAll(/```ini\n([\s\S]*?)```/g)].map(([, body]) => {
    const name = /^# \/etc\/systemd\/system\/(\S+)$/m.exec(body!)![1]!;
    const sections = new Map<string, [string, string][]>();
    let current: [string, string][] = [];
    for (const line of body!.split("\n")) {
      const header = /^\[(.*)\]$/.exec(line);
      if (header) sections.set(header[1]!, (current = []));
      const m = /^(\w+)=(.*)$/.exec(line);
      if (m) current.push([m[1]!, m[2]!]);
    }
    return { name, sections };
  });
}

/** The values of `key` in `[section]`. */
function values(unit: Unit, section: string, key: string): string[] {
  return (unit.sections.get(section) ?? []).filter(([k]) => k === key).map(([, v]) => v);
}

/** The last value of `key` in `[section]` (the one systemd uses for a single-valued key). */
function value(unit: Unit, section: string, key: string): string | undefined {
  return values(unit, section, key).at(-1);
}

const plainService = units(section.slice(0, section.indexOf("#### Socket activation")))[0]!;
const activated = units(activation);
const socketUnits = activated.filter((u) => u.name.endsWith(".socket"));
const activatedService = activated.find((u) => u.name === "udmd.service")!;

/** ExecStart's arguments, /run/udm and /dev/udm moved under `parent`. */
function execArgs(service: Unit, runDir: string, devDir: string): string[] {
  const [exe, ...args] = value(service, "Service", "ExecStart")!.split(/\s+/);
  expect(exe).toBe("/usr/local/bin/udmd");
  return args.map((a) => (a === "/run/udm" ? runDir : a === "/dev/udm" ? devDir : a));
}

/** Resolves once udmd's stderr has the "udmd started" line; rejects if it exits first. */
function started(proc: ReturnType<typeof spawn>, stderr: () => string, exit: Promise<number | null>): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    proc.stderr!.on("data", () => stderr().includes('"udmd started"') && resolve());
    void exit.then((code) => reject(new Error(`udmd exited with ${code}: ${stderr()}`)));
  });
}

describe("the documented systemd units", () => {
  const dirs: string[] = [];
  const fds: number[] = [];
  const procs: ReturnType<typeof spawn>[] = [];
  afterEach(() => {
    for (const p of procs.splice(0)) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
    for (const fd of fds.splice(0)) closeFd(fd);
    for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
  });
  const privateDir = () => {
    const parent = fs.mkdtempSync(path.join(os.tmpdir(), "udm-systemd-"));
    dirs.push(parent);
    return { parent, runDir: path.join(parent, "udm"), devDir: path.join(parent, "dev") };
  };

  it("starts udmd with ExecStart's arguments and stops it cleanly with KillSignal within TimeoutStopSec", async () => {
    const keys = plainService.sections.get("Service")!;
    expect(plainService.name).toBe("udmd.service");
    expect(value(plainService, "Service", "RuntimeDirectory")).toBe("udm");
    expect(keys.length).toBeGreaterThan(0);
    const { runDir, devDir } = privateDir();
    fs.mkdirSync(runDir, { mode: Number.parseInt(value(plainService, "Service", "RuntimeDirectoryMode")!, 8) });
    const argv = execArgs(plainService, runDir, devDir);
    expect(argv).toContain(runDir);

    const proc = spawn(process.execPath, [UDMD, ...argv], { stdio: ["ignore", "ignore", "pipe"] });
    procs.push(proc);
    let stderr = "";
    proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    const exit = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
    await started(proc, () => stderr, exit);
    expect(await udmsetup(runDir, ["create", "v", "--table", "0 8 zero"])).toMatchObject({ code: 0 });

    const stopStarted = Date.now();
    proc.kill(value(plainService, "Service", "KillSignal") as NodeJS.Signals);
    expect(await exit).toBe(0);
    expect(Date.now() - stopStarted).toBeLessThan(Number(value(plainService, "Service", "TimeoutStopSec")) * 1000);
    expect(fs.readdirSync(runDir)).toEqual([]);
  }, 120_000);

  const clientReason = missingToolsReason(["qemu-io"]);
  skipOrFail("socket activation from the documented units", clientReason);
  it.skipIf(clientReason !== null)(
    "socket activation: udmd serves on the .socket units' sockets, stops with KillSignal and leaves their files",
    async () => {
      expect(socketUnits.map((u) => u.name)).toEqual(["udmd.socket", "udmd-tcp.socket"]);
      expect(values(activatedService, "Unit", "Requires")).toEqual(["udmd.socket"]);
      // systemd would remove a RuntimeDirectory= at stop, and the socket files in it.
      const runtime = value(activatedService, "Service", "RuntimeDirectory");
      if (runtime !== undefined) expect(value(activatedService, "Service", "RuntimeDirectoryPreserve")).toBe("yes");
      const { parent, runDir, devDir } = privateDir();
      const moved = (p: string) => path.join(parent, path.relative("/run", p));

      const sockets: PassedFd[] = [];
      let tcpPort: number | undefined;
      const unixFiles: string[] = [];
      for (const unit of socketUnits) {
        if (unit.name !== "udmd.socket") expect(value(unit, "Socket", "Service")).toBe("udmd.service");
        const name = value(unit, "Socket", "FileDescriptorName") ?? unit.name;
        const mode = Number.parseInt(value(unit, "Socket", "SocketMode") ?? "0666", 8);
        for (const listen of values(unit, "Socket", "ListenStream")) {
          if (listen.startsWith("/")) {
            const file = moved(listen);
            fs.mkdirSync(path.dirname(file), {
              recursive: true,
              mode: Number.parseInt(value(unit, "Socket", "DirectoryMode") ?? "0755", 8),
            });
            const fd = unixSocketFd(file);
            fds.push(fd);
            fs.chmodSync(file, mode);
            unixFiles.push(file);
            sockets.push({ fd, name });
          } else {
            expect(listen).toMatch(/^127\.0\.0\.1:\d+$/);
            const tcp = tcpSocketFd();
            fds.push(tcp.fd);
            tcpPort = tcp.port;
            sockets.push({ fd: tcp.fd, name });
          }
        }
      }
      expect(unixFiles).toEqual([path.join(runDir, "control"), path.join(runDir, "nbd.sock")]);
      expect((fs.statSync(runDir).mode & 0o777).toString(8)).toBe("700");

      const proc = spawnActivated(sockets, execArgs(activatedService, runDir, devDir));
      procs.push(proc);
      let stderr = "";
      proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
      proc.stdout!.resume();
      const exit = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
      await started(proc, () => stderr, exit);
      // The one warning is the plaintext TCP listener's, as with --nbd-listen: none about the sockets.
      const warnings = stderr.split("\n").filter((l) => l.includes('"level":"warn"'));
      expect(warnings.map((l) => (JSON.parse(l) as { msg: string }).msg)).toEqual([
        "nbd: TCP listener without --tls=require: every local user can read and write every device",
      ]);

      const img = path.join(parent, "disk.img");
      fs.writeFileSync(img, Buffer.alloc(1024 * 1024));
      expect(await udmsetup(runDir, ["create", "v", "--table", `0 2048 linear ${img} 0`])).toMatchObject({ code: 0 });
      const unixUri = `nbd+unix:///v?socket=${path.join(runDir, "nbd.sock")}`;
      const write = await tool("qemu-io", ["-f", "raw", unixUri, "-c", "write -P 0x3c 0 65536"]);
      expect(write.code, write.stderr + write.stdout).toBe(0);
      const read = await tool("qemu-io", ["-f", "raw", `nbd://127.0.0.1:${tcpPort}/v`, "-c", "read -P 0x3c 0 65536"]);
      expect(read.code, read.stderr + read.stdout).toBe(0);
      expect(read.stdout).not.toMatch(/Pattern verification failed/);

      const stopStarted = Date.now();
      proc.kill(value(activatedService, "Service", "KillSignal") as NodeJS.Signals);
      expect(await exit).toBe(0);
      expect(Date.now() - stopStarted).toBeLessThan(
        Number(value(activatedService, "Service", "TimeoutStopSec")) * 1000,
      );
      expect(fs.readdirSync(runDir).sort()).toEqual(["control", "nbd.sock"]);
      for (const file of unixFiles) expect(fs.lstatSync(file).isSocket()).toBe(true);
    },
    120_000,
  );

  const activateReason = missingToolsReason(["systemd-socket-activate", "qemu-io"]);
  skipOrFail("systemd-socket-activate with udmd.socket", activateReason);
  it.skipIf(activateReason !== null)(
    "socket activation by systemd-socket-activate: udmd starts on the first connection to udmd.socket's sockets",
    async () => {
      const unit = socketUnits.find((u) => u.name === "udmd.socket")!;
      const { parent, runDir, devDir } = privateDir();
      fs.mkdirSync(runDir, { mode: Number.parseInt(value(unit, "Socket", "DirectoryMode")!, 8) });
      const listens = values(unit, "Socket", "ListenStream").map((p) => path.join(parent, path.relative("/run", p)));
      const name = value(unit, "Socket", "FileDescriptorName") ?? unit.name;
      const proc = spawn(
        "systemd-socket-activate",
        [
          ...listens.map((l) => `--listen=${l}`),
          `--fdname=${listens.map(() => name).join(":")}`,
          "--",
          process.execPath,
          UDMD,
          ...execArgs(activatedService, runDir, devDir),
        ],
        { stdio: ["ignore", "ignore", "pipe"] },
      );
      procs.push(proc);
      let stderr = "";
      proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
      const exit = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
      // It logs each socket as it listens; udmd does not run until someone connects.
      await new Promise<void>((resolve, reject) => {
        const ready = () => listens.every((l) => stderr.includes(`Listening on ${l} as`));
        proc.stderr!.on("data", () => ready() && resolve());
        void exit.then((code) => reject(new Error(`systemd-socket-activate exited with ${code}: ${stderr}`)));
      });
      expect(stderr).not.toContain("udmd started");

      expect(await udmsetup(runDir, ["create", "z", "--table", "0 16 zero"])).toMatchObject({ code: 0 });
      // The connection started udmd, which answered it.
      await new Promise<void>((resolve) => {
        if (stderr.includes('"udmd started"')) resolve();
        proc.stderr!.on("data", () => stderr.includes('"udmd started"') && resolve());
      });
      const size = await tool("qemu-io", ["-f", "raw", `nbd+unix:///z?socket=${listens[1]}`, "-c", "length"]);
      expect(size.stdout.trim(), size.stderr).toBe("8 KiB");

      proc.kill(value(activatedService, "Service", "KillSignal") as NodeJS.Signals);
      expect(await exit).toBe(0);
      expect(fs.readdirSync(runDir).sort()).toEqual(["control", "nbd.sock"]);
    },
    60_000,
  );
});
