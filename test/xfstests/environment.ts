/**
 * What `npm run xfstests` makes for one run, and its removal: sparse images bound to loop devices
 * (TEST_DEV, formatted ext4; SCRATCH_DEV; LOGWRITES_DEV), the mount points, xfstests' config, a
 * `dmsetup` that is udmsetup, and a udmd of its own (own run directory, auto-attach, symlinks in
 * /dev/mapper). Everything lives in one temporary directory; what must outlive the run (udmd's
 * log, the dmsetup call log) goes to the results directory.
 *
 * Cleanup never depends on the run having gone well: each step has a timeout, and when one hangs
 * (a stuck unmount, a daemon that does not answer) killing nbdfuse aborts the FUSE connections,
 * so that the I/O waiting below the attached devices fails instead of hanging everything after it.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { boundLoops, isUnder, killQuietly, mounts, pidsOf } from "../support/system-state.js";
import { tool, which } from "../support/tools.js";
import type { Filesystem } from "./select.js";

export interface EnvOptions {
  /** The udm checkout whose dist/ is run. */
  udmRoot: string;
  xfstests: string;
  /** Kept after the run: udmd.log, dmsetup.log (check writes its results here too). */
  resultsDir: string;
  /** Where the temporary directory goes (images, mount points, run directory). */
  tmpParent: string;
  /** Size of each sparse image. */
  devBytes: number;
  /** Where udmd makes the device symlinks. */
  devDir: string;
  /** The filesystem made on TEST_DEV, and xfstests' FSTYP (default ext4). */
  fsType?: Filesystem;
  log(message: string): void;
}

/** mkfs for each filesystem, quiet and forced (TEST_DEV is a fresh sparse image). */
const MKFS: Record<Filesystem, [string, string[]]> = {
  ext4: ["mkfs.ext4", ["-F", "-q"]],
  xfs: ["mkfs.xfs", ["-f", "-q"]],
};

interface Loop {
  role: "TEST_DEV" | "SCRATCH_DEV" | "LOGWRITES_DEV";
  dev: string;
  file: string;
}

const DAEMON_START_MS = 30_000;
const PROBE_DEVICE = "udm-xfstests-probe";

export class XfstestsEnv {
  get fsType(): Filesystem {
    return this.opts.fsType ?? "ext4";
  }

  base = "";
  private loops: Loop[] = [];
  private daemon: ChildProcess | undefined;
  private daemonExit: Promise<number | null> | undefined;
  private readonly initialLinks: Set<string>;
  /** Kernel devices udmd attached (seen while it ran): their symlinks are ours to remove. */
  private readonly attachDevices = new Set<string>();

  constructor(private readonly opts: EnvOptions) {
    this.initialLinks = new Set(fs.existsSync(opts.devDir) ? fs.readdirSync(opts.devDir) : []);
  }

  get runDir(): string {
    return path.join(this.base, "run");
  }
  get binDir(): string {
    return path.join(this.base, "bin");
  }
  get testDir(): string {
    return path.join(this.base, "test");
  }
  get scratchMnt(): string {
    return path.join(this.base, "scratch");
  }
  get configFile(): string {
    return path.join(this.base, "local.config");
  }
  get udmdLog(): string {
    return path.join(this.opts.resultsDir, "udmd.log");
  }
  get dmsetupLog(): string {
    return path.join(this.opts.resultsDir, "dmsetup.log");
  }
  private get udmsetup(): string {
    return path.join(this.opts.udmRoot, "dist/dmsetup/bin/udmsetup.js");
  }
  private get udmd(): string {
    return path.join(this.opts.udmRoot, "dist/dmsetup/bin/udmd.js");
  }
  device(role: Loop["role"]): string {
    const loop = this.loops.find((l) => l.role === role);
    if (!loop) throw new Error(`${role} not set up`);
    return loop.dev;
  }

  /**
   * One run per dev dir: xfstests names its devices after the test (flakey-test.073), so two runs
   * would take each other's devices.
   */
  private get lockFile(): string {
    return path.join(os.tmpdir(), `udm-xfstests${this.opts.devDir.replace(/\//g, "_")}.lock`);
  }
  private locked = false;

  private lock(): void {
    for (let attempt = 0; ; attempt++) {
      try {
        fs.writeFileSync(this.lockFile, `${process.pid}\n`, { flag: "wx" });
        this.locked = true;
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST" || attempt > 0) throw err;
      }
      const pid = Number(fs.readFileSync(this.lockFile, "utf8").trim());
      if (pid > 0 && processAlive(pid))
        throw new Error(
          `another npm run xfstests (pid ${pid}) is running with its devices in ${this.opts.devDir} ` +
            `(${this.lockFile}); xfstests' device names would collide`,
        );
      fs.rmSync(this.lockFile, { force: true }); // its run died without removing it
    }
  }

  private unlock(): void {
    if (this.locked) fs.rmSync(this.lockFile, { force: true });
    this.locked = false;
  }

  /** Make everything; `aborted()` is asked between steps (Ctrl-C during setup). */
  async setup(aborted: () => boolean): Promise<void> {
    const step = (what: string) => {
      if (aborted()) throw new Error(`interrupted while setting up (${what})`);
      this.opts.log(what);
    };
    this.lock();
    fs.mkdirSync(this.opts.tmpParent, { recursive: true });
    this.base = fs.mkdtempSync(path.join(this.opts.tmpParent, "udm-xfstests-"));
    for (const dir of [this.binDir, this.testDir, this.scratchMnt]) fs.mkdirSync(dir);
    fs.mkdirSync(this.runDir, { mode: 0o700 });
    fs.mkdirSync(this.opts.resultsDir, { recursive: true });

    step(`loop devices over sparse ${formatBytes(this.opts.devBytes)} images in ${this.base}`);
    for (const role of ["TEST_DEV", "SCRATCH_DEV", "LOGWRITES_DEV"] as const) {
      const file = path.join(this.base, `${role.toLowerCase().replace("_dev", "")}.img`);
      fs.closeSync(fs.openSync(file, "w"));
      fs.truncateSync(file, this.opts.devBytes);
      const r = await tool("losetup", ["--find", "--show", file], { timeoutMs: 30_000 });
      if (r.code !== 0) throw new Error(`losetup ${file} failed: ${r.stderr.trim()}`);
      this.loops.push({ role, dev: r.stdout.trim(), file });
    }
    const [mkfs, mkfsArgs] = MKFS[this.fsType];
    step(`${mkfs} on TEST_DEV ${this.device("TEST_DEV")}`);
    await mustRun(mkfs, [...mkfsArgs, this.device("TEST_DEV")], 300_000);

    step(`udmd (run directory ${this.runDir}, --auto-attach, --dev-dir ${this.opts.devDir})`);
    fs.writeFileSync(this.dmsetupLog, "");
    this.writeWrapper();
    this.writeConfig();
    await this.startDaemon();
    step(`probe: a device made with the dmsetup wrapper appears as ${this.opts.devDir}/${PROBE_DEVICE}`);
    await this.probe();
  }

  /** The environment of ./check: the wrapper first on PATH, our config. */
  checkEnv(): NodeJS.ProcessEnv {
    return {
      ...process.env,
      PATH: `${this.binDir}:${process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin"}`,
      HOST_OPTIONS: this.configFile,
      LANG: "C",
      LC_ALL: "C",
    };
  }

  private writeWrapper(): void {
    const q = shellQuote;
    // Each call is logged with its exit status (and its stderr when it failed); stdin (tables
    // piped to load) and stdout go straight through.
    const wrapper = `#!/bin/sh
# dmsetup for xfstests, written by udm's npm run xfstests: udmsetup on that run's udmd.
export UDM_RUN_DIR=${q(this.runDir)}
export UDM_DEV_DIR=${q(this.opts.devDir)}
export UDM_NO_AUTOSTART=1
err=$(mktemp ${q(path.join(this.base, "dmsetup-err.XXXXXX"))}) || exit 1
${q(process.execPath)} ${q(this.udmsetup)} "$@" 2>"$err"
rc=$?
cat "$err" >&2
{
  printf '%s rc=%s dmsetup %s\\n' "$(date +%H:%M:%S.%N | cut -c1-12)" "$rc" "$*"
  [ "$rc" -eq 0 ] || sed 's/^/    /' "$err"
} >> ${q(this.dmsetupLog)}
rm -f "$err"
exit $rc
`;
    fs.writeFileSync(path.join(this.binDir, "dmsetup"), wrapper, { mode: 0o755 });
  }

  private writeConfig(): void {
    const lines = [
      "# xfstests local.config written by udm's npm run xfstests",
      `export FSTYP=${this.fsType}`,
      `export TEST_DEV=${this.device("TEST_DEV")}`,
      `export TEST_DIR=${this.testDir}`,
      `export SCRATCH_DEV=${this.device("SCRATCH_DEV")}`,
      `export SCRATCH_MNT=${this.scratchMnt}`,
      `export LOGWRITES_DEV=${this.device("LOGWRITES_DEV")}`,
      `export RESULT_BASE=${this.opts.resultsDir}`,
      "",
    ];
    fs.writeFileSync(this.configFile, lines.join("\n"));
  }

  private async startDaemon(): Promise<void> {
    const logFd = fs.openSync(this.udmdLog, "w");
    const args = [this.udmd, "--run-dir", this.runDir, "--auto-attach", "--dev-dir", this.opts.devDir];
    // Its own session: a Ctrl-C in the terminal must not stop it before the devices are let go.
    const proc = spawn(process.execPath, args, { detached: true, stdio: ["ignore", logFd, logFd] });
    fs.closeSync(logFd);
    this.daemon = proc;
    this.daemonExit = new Promise((resolve) => proc.once("exit", (code) => resolve(code)));
    const deadline = Date.now() + DAEMON_START_MS;
    while (Date.now() < deadline) {
      if (proc.exitCode !== null || proc.signalCode !== null)
        throw new Error(`udmd exited (${proc.exitCode ?? proc.signalCode}) before it started:\n${tail(this.udmdLog)}`);
      if (fs.readFileSync(this.udmdLog, "utf8").includes('"udmd started"')) return;
      await sleep(100);
    }
    throw new Error(`udmd did not start within ${DAEMON_START_MS / 1000} s:\n${tail(this.udmdLog)}`);
  }

  /** Create and remove a device the way xfstests will, so that a broken attach fails here, clearly. */
  private async probe(): Promise<void> {
    const dmsetup = path.join(this.binDir, "dmsetup");
    const link = path.join(this.opts.devDir, PROBE_DEVICE);
    const run = (args: string[]) => tool(dmsetup, args, { timeoutMs: 60_000 });
    const created = await run(["create", PROBE_DEVICE, "--table", "0 2048 zero"]);
    if (created.code !== 0) throw new Error(`dmsetup create (udmsetup) failed: ${created.stderr.trim()}`);
    try {
      const st = fs.statSync(link, { throwIfNoEntry: false });
      if (!st?.isBlockDevice())
        throw new Error(`udmd did not attach ${PROBE_DEVICE} as a block device at ${link}:\n${tail(this.udmdLog)}`);
    } finally {
      const removed = await run(["remove", PROBE_DEVICE]);
      if (removed.code !== 0) this.opts.log(`warning: removing the probe device failed: ${removed.stderr.trim()}`);
    }
  }

  /** The targets udmd offers (`dmsetup targets`). */
  async targets(): Promise<string[]> {
    const r = await tool(path.join(this.binDir, "dmsetup"), ["targets"], { timeoutMs: 60_000 });
    if (r.code !== 0) throw new Error(`dmsetup targets (udmsetup) failed: ${r.stderr.trim()}`);
    return r.stdout
      .split("\n")
      .map((l) => l.trim().split(/\s+/)[0]!)
      .filter(Boolean);
  }

  private daemonAlive(): boolean {
    return this.daemon !== undefined && this.daemon.exitCode === null && this.daemon.signalCode === null;
  }

  private udm(args: string[], timeoutMs = 30_000) {
    return tool(process.execPath, [this.udmsetup, "--run-dir", this.runDir, "--no-autostart", ...args], {
      timeoutMs,
    });
  }

  /** Kernel devices over udmd's nbdfuse files (bound to files in our run directory). */
  private attachLoops(): string[] {
    return this.base
      ? boundLoops()
          .filter((l) => isUnder(l.backing, this.runDir))
          .map((l) => l.dev)
      : [];
  }

  /** Remember udmd's attached devices, so their symlinks can be found even after a crash. */
  noteAttachments(): void {
    for (const dev of this.attachLoops()) this.attachDevices.add(dev);
  }

  /** Names of the devices made through our dmsetup (its log), whose /dev/mapper links are ours. */
  private createdNames(): Set<string> {
    const names = new Set([PROBE_DEVICE]);
    try {
      for (const line of fs.readFileSync(this.dmsetupLog, "utf8").split("\n")) {
        const m = / dmsetup (?:create (\S+)|rename \S+ (\S+))/.exec(line);
        if (m) names.add((m[1] ?? m[2])!);
      }
    } catch {
      // no log yet
    }
    return names;
  }

  /**
   * Mounts of ours, innermost (latest) first: on our directories, of our loop devices (ours or
   * udmd's), or of a link in the dev dir to a device made through our dmsetup.
   */
  private ourMounts(): { source: string; target: string }[] {
    if (!this.base) return [];
    const ourDevs = new Set(
      boundLoops()
        .filter((l) => isUnder(l.backing, this.base))
        .map((l) => l.dev),
    );
    const created = this.createdNames();
    const ourLink = (source: string) =>
      path.dirname(source) === this.opts.devDir &&
      created.has(path.basename(source)) &&
      !this.initialLinks.has(path.basename(source));
    return mounts()
      .filter((m) => isUnder(m.target, this.base) || ourDevs.has(m.source) || ourLink(m.source))
      .reverse();
  }

  /**
   * Links udmd made in the dev dir and left (a killed daemon cannot remove them): new since the
   * start, named after a device made through our dmsetup or pointing to a device udmd attached,
   * and not pointing to a loop device someone else has bound since.
   */
  private ourLinks(): string[] {
    if (!fs.existsSync(this.opts.devDir)) return [];
    const created = this.createdNames();
    const bound = new Map(boundLoops().map((l) => [l.dev, l.backing]));
    return fs
      .readdirSync(this.opts.devDir)
      .filter((name) => !this.initialLinks.has(name))
      .filter((name) => {
        let target;
        try {
          target = fs.readlinkSync(path.join(this.opts.devDir, name));
        } catch {
          return false; // not a symlink
        }
        if (!created.has(name) && !this.attachDevices.has(target)) return false;
        const backing = bound.get(target);
        return backing === undefined || isUnder(backing, this.runDir);
      });
  }

  private abortFuse(): void {
    if (this.base) for (const pid of pidsOf("nbdfuse", this.runDir)) killQuietly(pid);
  }

  /**
   * Undo everything, in an order that cannot hang on a half-dead stack; returns what is left
   * (empty when everything went). The caller has stopped ./check and its tests before.
   */
  async cleanup(): Promise<string[]> {
    try {
      return await this.removeAll();
    } finally {
      this.unlock();
    }
  }

  private async removeAll(): Promise<string[]> {
    if (!this.base) return [];
    this.noteAttachments();
    // 1. Suspended devices hold I/O (an unmount's writeback would wait forever): resume them.
    let hung = false;
    if (this.daemonAlive()) {
      const info = await this.udm(["--json", "info"], 15_000);
      hung = info.code === null;
      for (const name of suspendedDevices(info.code === 0 ? info.stdout : "")) {
        if ((await this.udm(["resume", name], 15_000)).code === null) hung = true;
      }
    }
    if (hung) {
      this.opts.log("cleanup: udmd does not answer; aborting its FUSE connections and killing it");
      this.abortFuse();
      killQuietly(this.daemon!.pid!, "SIGKILL");
    }
    // 2. Our mounts, innermost first; an unmount that hangs means the I/O path is stuck.
    this.opts.log("cleanup: unmounting");
    await this.unmountOurs();
    // 3. Loop devices xfstests made on files of ours (images on the test filesystem): theirs to
    //    go before the devices under them.
    for (const l of boundLoops()) {
      if (isUnder(l.backing, this.base) && !isUnder(l.backing, this.runDir) && !this.isOurImage(l.dev))
        await tool("losetup", ["-d", l.dev], { timeoutMs: 20_000 });
    }
    // 4. The udm devices (auto-attach detaches them), then the daemon.
    if (this.daemonAlive()) {
      this.opts.log("cleanup: udmsetup remove_all -f, then udmd stops");
      const r = await this.udm(["remove_all", "-f"], 120_000);
      if (r.code !== 0) this.opts.log(`cleanup: udmsetup remove_all -f: ${(r.stderr || r.stdout).trim()}`);
      killQuietly(this.daemon!.pid!, "SIGTERM");
      const code = await Promise.race([this.daemonExit!, sleep(30_000).then(() => "timeout" as const)]);
      if (code === "timeout") {
        this.opts.log("cleanup: udmd did not stop within 30 s of SIGTERM; killing it");
        this.abortFuse();
        killQuietly(this.daemon!.pid!, "SIGKILL");
        await Promise.race([this.daemonExit!, sleep(5_000)]);
      }
    }
    // 5. What a broken daemon left: nbdfuse, FUSE mounts, attach loop devices.
    this.opts.log("cleanup: loop devices, temporary directory");
    this.abortFuse();
    for (const pid of pidsOf("udmd.js", this.runDir)) killQuietly(pid, "SIGKILL");
    await this.unmountOurs();
    for (let i = 0; i < 100; i++) {
      const left = boundLoops().filter((l) => isUnder(l.backing, this.base));
      if (left.length === 0) break;
      if (i % 20 === 0) for (const l of left) await tool("losetup", ["-d", l.dev], { timeoutMs: 20_000 });
      await sleep(100);
    }
    // 6. Symlinks of attached devices a killed daemon could not remove.
    for (const name of this.ourLinks()) fs.rmSync(path.join(this.opts.devDir, name), { force: true });
    // 7. The temporary directory, unless something is still mounted in it.
    const left = this.leftovers();
    if (!this.ourMounts().some((m) => isUnder(m.target, this.base)))
      fs.rmSync(this.base, { recursive: true, force: true });
    return left;
  }

  private isOurImage(dev: string): boolean {
    return this.loops.some((l) => l.dev === dev);
  }

  private async unmountOurs(): Promise<void> {
    for (const m of this.ourMounts()) {
      if (!mounts().some((x) => x.target === m.target)) continue;
      const r = await tool("umount", [m.target], { timeoutMs: 30_000 });
      if (r.code === 0) continue;
      if (r.code === null) this.abortFuse();
      await tool("umount", ["-l", m.target], { timeoutMs: 15_000 });
    }
  }

  /** What is still there of ours, one line each. */
  leftovers(): string[] {
    if (!this.base) return [];
    return [
      ...pidsOf("udmd.js", this.runDir).map((pid) => `udmd process ${pid}`),
      ...pidsOf("nbdfuse", this.runDir).map((pid) => `nbdfuse process ${pid}`),
      ...this.ourMounts().map((m) => `mount ${m.source} on ${m.target}`),
      ...boundLoops()
        .filter((l) => isUnder(l.backing, this.base))
        .map((l) => `loop device ${l.dev} (${l.backing})`),
      ...this.ourLinks().map((name) => `symlink ${path.join(this.opts.devDir, name)}`),
    ];
  }

  /** The last resort when the process must exit now: the same, synchronously, waiting for nothing long. */
  cleanupSync(): void {
    this.unlock();
    if (!this.base) return;
    const quiet = (cmd: string, args: string[]) =>
      spawnSync(which(cmd) ?? cmd, args, { stdio: "ignore", timeout: 10_000 });
    this.noteAttachments();
    this.abortFuse();
    if (this.daemon?.pid) killQuietly(this.daemon.pid, "SIGKILL");
    for (const pid of pidsOf("udmd.js", this.runDir)) killQuietly(pid, "SIGKILL");
    for (const m of this.ourMounts()) quiet("umount", ["-l", m.target]);
    for (const l of boundLoops().filter((l) => isUnder(l.backing, this.base))) quiet("losetup", ["-d", l.dev]);
    for (const name of this.ourLinks()) fs.rmSync(path.join(this.opts.devDir, name), { force: true });
    if (!this.ourMounts().some((m) => isUnder(m.target, this.base)))
      fs.rmSync(this.base, { recursive: true, force: true });
  }
}

/** The suspended devices in `udmsetup --json info` output (which is "No devices found" when there are none). */
export function suspendedDevices(jsonInfo: string): string[] {
  let devices: unknown;
  try {
    devices = JSON.parse(jsonInfo);
  } catch {
    return [];
  }
  return Array.isArray(devices)
    ? devices.filter((d: { name?: unknown; suspended?: unknown }) => d.suspended === true).map((d) => String(d.name))
    : [];
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

async function mustRun(cmd: string, args: string[], timeoutMs: number): Promise<void> {
  const r = await tool(cmd, args, { timeoutMs });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed: ${(r.stderr || r.stdout).trim()}`);
}

/** The end of a log file, for error messages. */
export function tail(file: string, lines = 15): string {
  try {
    return fs.readFileSync(file, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

export function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1 && n % 1024 === 0) {
    n /= 1024;
    i++;
  }
  return `${n} ${units[i]}`;
}

/** `10G`, `512M`, `1T`, or bytes. */
export function parseSize(text: string): number | undefined {
  const m = /^(\d+)([KMGT]?)(i?B)?$/i.exec(text.trim());
  if (!m) return undefined;
  const shift = { "": 0, K: 10, M: 20, G: 30, T: 40 }[m[2]!.toUpperCase() as "" | "K" | "M" | "G" | "T"];
  return Number(m[1]) * 2 ** shift;
}

export const DEFAULT_TMP_PARENT = os.tmpdir();
