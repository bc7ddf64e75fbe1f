/**
 * The per-file environment of the root-run tests in test/root/: real loop devices over sparse
 * files, the built udmd and udmsetup (dist/), `udmsetup attach`, mounts and fsfreeze, with a
 * cleanup that cannot hang. Their other support: requirements.ts (skip or fail), tools.ts
 * (running tools), system-state.ts (mounts, loops, processes), filesystems.ts, file-tree.ts,
 * device-data.ts, fio.ts and live-snapshot.ts.
 *
 * `useRootEnv(label)` (called inside the suite's `describe`) gives a `RootEnv` that records every
 * resource a test makes: child processes, loop devices, mounts, frozen filesystems, the daemon,
 * and (through the daemon) nbdfuse processes, FUSE mounts, attach loop devices and symlinks.
 * - afterEach undoes all of it, whatever state the test left (suspended devices, a frozen
 *   filesystem, a hung daemon), then asserts that nothing is left;
 * - a process exit handler (and SIGINT/SIGTERM/SIGHUP, when nobody else handles them) does the
 *   same synchronously if the worker goes away mid-test;
 * - afterAll asserts that `losetup -a`, the mount table and the run directory are as the file
 *   found them, as far as this file's resources go (other test files may run in parallel).
 *
 * Every name a test makes (udm devices, hence FUSE files and attach links) starts with a
 * prefix unique to this process, and every path lives under one base directory, so leftovers
 * are recognisable and nothing outside the file is touched.
 */
import { spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, afterEach, beforeAll, beforeEach, expect } from "vitest";
import { type CliResult, type RunningDaemon, startDaemon, udmsetup } from "./daemon.js";
import { createLoopDevice, type LoopDevice, type LoopOptions } from "./loop-device.js";
import { boundLoops, isUnder, killQuietly, mounts, pidsOf, unescapeMount } from "./system-state.js";
import { killRunningTools, runningTools, sh, tool, which } from "./tools.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface Leftovers {
  children: number[];
  daemons: number[];
  nbdfuse: number[];
  mounts: string[];
  loops: string[];
  links: string[];
  runDir: string[];
  devDir: string[];
}

export interface Attached {
  /** The kernel block device (/dev/loopN over nbdfuse, or /dev/nbdN). */
  dev: string;
  /** The symlink `$devDir/NAME`. */
  link: string;
}

const liveEnvs = new Set<RootEnv>();
let safetyNetInstalled = false;

/** Synchronous last-resort cleanup at process exit (or on a fatal signal). */
function installSafetyNet(): void {
  if (safetyNetInstalled) return;
  safetyNetInstalled = true;
  const cleanAll = () => {
    for (const env of liveEnvs) env.cleanupSync();
  };
  process.on("exit", cleanAll);
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    if (process.listenerCount(sig) > 0) continue; // someone else handles it (and exits normally)
    const handler = () => {
      cleanAll();
      process.off(sig, handler);
      process.kill(process.pid, sig);
    };
    process.on(sig, handler);
  }
}

export class RootEnv {
  /** Everything this file makes lives under here. */
  readonly base: string;
  /** The daemon's run directory (shared by the file's tests, one daemon at a time). */
  readonly runDir: string;
  /** Where attach makes its NAME symlinks. */
  readonly devDir: string;
  /** Prefix of every udm device name this process makes. */
  readonly prefix: string;

  private serial = 0;
  private scratchDir: string | undefined;
  private daemonHandle: RunningDaemon | undefined;
  private pastLogs: string[] = [];
  private readonly loops: LoopDevice[] = [];
  private readonly mountPoints: string[] = [];
  private readonly frozen = new Set<string>();
  private closed = true;
  private initial: { runDir: string[]; devDir: string[] } = { runDir: [], devDir: [] };

  /** Names only: the directories are made by `init()` (in beforeAll, so not for skipped files). */
  constructor(label: string) {
    const id = `${process.pid}-${crypto.randomBytes(3).toString("hex")}`;
    this.base = path.join(os.tmpdir(), `udm-root-${label}-${id}`);
    this.runDir = path.join(this.base, "run");
    this.devDir = path.join(this.base, "dev");
    this.prefix = `udmr${process.pid}${label.replace(/[^a-z0-9]/gi, "").slice(0, 8)}`;
  }

  init(): void {
    fs.mkdirSync(this.base, { mode: 0o700 });
    fs.mkdirSync(this.runDir, { mode: 0o700 });
    fs.mkdirSync(this.devDir, { mode: 0o755 });
    this.initial = { runDir: fs.readdirSync(this.runDir), devDir: fs.readdirSync(this.devDir) };
    liveEnvs.add(this);
    installSafetyNet();
  }

  /** Start of a test: a fresh scratch directory. */
  begin(): void {
    this.closed = false;
    this.pastLogs = [];
    this.scratchDir = fs.mkdtempSync(path.join(this.base, "t-"));
  }

  private live(): void {
    if (this.closed) throw new Error("the test has ended (timed out or failed): not creating anything more");
  }

  get scratch(): string {
    this.live();
    return this.scratchDir!;
  }

  /** A udm device name unique to this process and test. */
  name(role: string): string {
    return `${this.prefix}x${this.serial++}${role}`;
  }

  /** A directory in the scratch directory (for mount points). */
  dir(name: string): string {
    const d = path.join(this.scratch, name);
    fs.mkdirSync(d, { recursive: true });
    return d;
  }

  /** A sparse file of `bytes` in the scratch directory. */
  sparseFile(name: string, bytes: number): string {
    const file = path.join(this.scratch, name);
    fs.writeFileSync(file, "");
    fs.truncateSync(file, bytes);
    return file;
  }

  /** Bind `file` to a loop device (detached by cleanup). */
  async loop(file: string, opts: LoopOptions = {}): Promise<LoopDevice> {
    this.live();
    const loop = await createLoopDevice(file, opts);
    this.loops.push(loop);
    return loop;
  }

  /** Detach one of our loop devices now (it must no longer be used by a daemon). */
  async detachLoop(loop: LoopDevice): Promise<void> {
    await loop.detach();
    const i = this.loops.indexOf(loop);
    if (i >= 0) this.loops.splice(i, 1);
  }

  /** Start udmd on the file's run directory, with attach links in devDir. */
  async startDaemon(): Promise<RunningDaemon> {
    this.live();
    if (this.daemonHandle && this.daemonHandle.proc.exitCode === null && this.daemonHandle.proc.signalCode === null) {
      throw new Error("a daemon is already running for this test");
    }
    this.daemonHandle = await startDaemon(this.runDir, ["--dev-dir", this.devDir]);
    return this.daemonHandle;
  }

  get daemon(): RunningDaemon | undefined {
    return this.daemonHandle;
  }

  /** Logs of the daemons this test started (stopped ones included). */
  daemonLogs(): string {
    return [...this.pastLogs, this.daemonHandle?.stderr() ?? ""].join("");
  }

  /** Stop the daemon normally (SIGTERM); its exit code. */
  async stopDaemon(): Promise<number | null> {
    const d = this.daemonHandle;
    if (!d) return null;
    this.daemonHandle = undefined;
    const code = await d.stop("SIGTERM");
    this.pastLogs.push(d.stderr());
    return code;
  }

  /** udmsetup against our daemon. */
  udm(...args: string[]): Promise<CliResult> {
    return udmsetup(this.runDir, args);
  }

  /** udmsetup that must succeed with nothing on stderr; its stdout. */
  async ok(...args: string[]): Promise<string> {
    const r = await this.udm(...args);
    expect({ code: r.code, stderr: r.stderr }, `udmsetup ${args.join(" ")}`).toEqual({ code: 0, stderr: "" });
    return r.stdout;
  }

  nbdUri(name: string): string {
    return `nbd+unix:///${name}?socket=${path.join(this.runDir, "nbd.sock")}`;
  }

  /** `udmsetup attach NAME`: the kernel device and its link. */
  async attach(name: string): Promise<Attached> {
    this.live();
    const dev = (await this.ok("attach", name)).trim();
    const link = path.join(this.devDir, name);
    expect(fs.readlinkSync(link)).toBe(dev);
    expect(fs.statSync(link).isBlockDevice()).toBe(true);
    return { dev, link };
  }

  async mount(dev: string, target: string, options: string[] = []): Promise<void> {
    this.live();
    await sh("mount", ...(options.length ? ["-o", options.join(",")] : []), dev, target);
    this.mountPoints.push(target);
  }

  async umount(target: string): Promise<void> {
    if (this.frozen.has(target)) await this.thaw(target);
    await sh("umount", target);
    const i = this.mountPoints.lastIndexOf(target);
    if (i >= 0) this.mountPoints.splice(i, 1);
  }

  /** fsfreeze -f (thawed by cleanup if the test does not). */
  async freeze(target: string): Promise<void> {
    this.live();
    await sh("fsfreeze", "-f", target);
    this.frozen.add(target);
  }

  async thaw(target: string): Promise<void> {
    await sh("fsfreeze", "-u", target);
    this.frozen.delete(target);
  }

  /** Loop devices bound to our files or to our FUSE files. */
  ourLoops(): { dev: string; backing: string }[] {
    return boundLoops().filter(
      ({ backing }) => isUnder(backing.replace(/ \(deleted\)$/, ""), this.base) || backing.includes(`/${this.prefix}`),
    );
  }

  ourMounts(): string[] {
    return mounts()
      .filter((m) => isUnder(m.target, this.base))
      .map((m) => m.target);
  }

  private ourLinks(): string[] {
    if (!fs.existsSync(this.devDir)) return [];
    return fs.readdirSync(this.devDir).filter((n) => n.startsWith(this.prefix));
  }

  /**
   * Undo everything the test made, in an order that cannot hang on a half-dead stack: running
   * tools, suspended devices (resumed), frozen filesystems (thawed), our mounts, the daemon, then
   * whatever a broken daemon left, our loop devices and the scratch directory. Whenever a step
   * hangs, killing nbdfuse aborts the FUSE connections so that the I/O below fails instead.
   * Returns what is left (all empty when everything went).
   */
  async cleanup(): Promise<Leftovers> {
    this.closed = true;
    const d = this.daemonHandle;
    this.daemonHandle = undefined; // whatever happens below, the next test starts afresh
    const daemonAlive = () => d !== undefined && d.proc.exitCode === null && d.proc.signalCode === null;
    const aliveAtStart = daemonAlive();
    /** The way out of any hang below the kernel devices: abort the FUSE connections (I/O fails). */
    const abortFuse = () => pidsOf("nbdfuse", this.runDir).forEach((pid) => killQuietly(pid));
    // 1. Tools still running from a test that timed out (they may be stuck until step 2).
    killRunningTools();
    // 2. Suspended devices: I/O to them (a thaw's superblock write, an unmount's writeback)
    //    would wait forever. So resume them before anything else.
    let hung = false;
    if (daemonAlive()) {
      const info = await Promise.race([this.udm("info", "--json"), sleep(5_000).then(() => null)]);
      try {
        for (const dev of JSON.parse(info?.stdout || "") as { name: string; suspended: boolean }[]) {
          if (dev.suspended) await Promise.race([this.udm("resume", dev.name), sleep(5_000)]);
        }
      } catch {
        hung = true;
      }
    }
    if (hung && d) {
      // No answer on the control socket: the daemon is hung (or stopped). Nothing below can
      // complete through it, so abort FUSE (pending I/O fails) and kill it now.
      abortFuse();
      d.proc.kill("SIGKILL");
    }
    for (let i = 0; i < 50 && runningTools().length > 0; i++) await sleep(20);
    // 3. Frozen filesystems block every writer, umount included.
    for (const target of [...this.frozen]) {
      if ((await tool("fsfreeze", ["-u", target], { timeoutMs: 10_000 })).code === null) abortFuse();
      this.frozen.delete(target);
    }
    // 4. Our mounts, innermost first. An unmount that hangs means the I/O path is stuck: abort
    //    FUSE and detach lazily.
    const ours = [
      ...new Set([...this.mountPoints, ...this.ourMounts().filter((m) => !isUnder(m, this.runDir))]),
    ].reverse();
    for (const target of ours) {
      if (!mounts().some((m) => m.target === target)) continue;
      const r = await tool("umount", [target], { timeoutMs: 20_000 });
      if (r.code !== 0) {
        if (r.code === null) abortFuse();
        await tool("umount", ["-l", target], { timeoutMs: 10_000 });
      }
    }
    this.mountPoints.length = 0;
    // 5. The daemon detaches its attachments on SIGTERM. If it hangs (in a FUSE request), abort
    //    FUSE, then kill it. Only a daemon that was alive and answering, and exits 0 on SIGTERM,
    //    must have cleaned its run directory; one the test killed, or that we had to, cannot have.
    let cleanExit = true;
    if (d) {
      const code = await Promise.race([d.stop("SIGTERM"), sleep(20_000).then(() => "timeout" as const)]);
      if (code === "timeout") {
        abortFuse();
        await Promise.race([d.stop("SIGKILL"), sleep(5_000)]);
      }
      cleanExit = aliveAtStart && !hung && code === 0;
      this.pastLogs.push(d.stderr());
    }
    // 6. What a broken daemon left behind: nbdfuse, FUSE mounts, attach loop devices, links.
    abortFuse();
    for (const target of this.ourMounts().reverse()) await tool("umount", ["-l", target], { timeoutMs: 10_000 });
    // 7. Our own loop devices (the daemon has closed them), then any other loop on our files.
    for (const loop of this.loops.splice(0)) await Promise.race([loop.detach().catch(() => undefined), sleep(10_000)]);
    for (let i = 0; i < 50 && this.ourLoops().length > 0; i++) {
      if (i === 10) for (const { dev } of this.ourLoops()) await tool("losetup", ["-d", dev], { timeoutMs: 10_000 });
      await sleep(50);
    }
    for (const link of this.ourLinks()) fs.rmSync(path.join(this.devDir, link), { force: true });
    // Record what the daemon left in its run directory, then reset it for the next test.
    const runDirAfterDaemon = fs.readdirSync(this.runDir);
    if (this.ourMounts().length === 0) this.resetRunDir();
    // 8. The scratch directory, unless something is still mounted in it.
    if (this.scratchDir && !this.ourMounts().some((m) => isUnder(m, this.scratchDir!))) {
      fs.rmSync(this.scratchDir, { recursive: true, force: true });
      this.scratchDir = undefined;
    }
    for (let i = 0; i < 50 && runningTools().length > 0; i++) await sleep(20);
    return {
      children: runningTools().map((c) => c.pid ?? -1),
      daemons: pidsOf("udmd.js", this.runDir),
      nbdfuse: pidsOf("nbdfuse", this.runDir),
      mounts: this.ourMounts(),
      loops: this.ourLoops().map((l) => `${l.dev} (${l.backing})`),
      links: this.ourLinks(),
      runDir: cleanExit ? runDirAfterDaemon.filter((e) => !this.initial.runDir.includes(e)) : [],
      devDir: fs.readdirSync(this.devDir).filter((e) => !this.initial.devDir.includes(e)),
    };
  }

  /** Remove what a killed daemon left in the run directory (never through a mount). */
  private resetRunDir(): void {
    for (const e of fs.readdirSync(this.runDir)) {
      if (!this.initial.runDir.includes(e)) fs.rmSync(path.join(this.runDir, e), { recursive: true, force: true });
    }
  }

  /** The process-exit safety net: the same, synchronously and without waiting for anything. */
  cleanupSync(): void {
    const quiet = (cmd: string, args: string[]) =>
      spawnSync(which(cmd) ?? cmd, args, { stdio: "ignore", timeout: 10_000 });
    killRunningTools();
    // Abort FUSE first: I/O to the attached devices then fails at once instead of waiting on a
    // daemon that may be suspended or hung, so nothing below can block.
    for (const pid of pidsOf("nbdfuse", this.runDir)) killQuietly(pid);
    if (this.daemonHandle?.proc.pid) killQuietly(this.daemonHandle.proc.pid);
    for (const pid of pidsOf("udmd.js", this.runDir)) killQuietly(pid);
    for (const target of this.frozen) quiet("fsfreeze", ["-u", target]);
    this.frozen.clear();
    for (const target of this.ourMounts().reverse()) quiet("umount", ["-l", target]);
    // Our createLoopDevice handles are released by loop-device.ts's own exit handler (and are
    // bound with autoclear); anything else bound to our files goes here.
    for (const { dev } of this.ourLoops()) quiet("losetup", ["-d", dev]);
    if (this.ourMounts().length === 0) fs.rmSync(this.base, { recursive: true, force: true });
    liveEnvs.delete(this);
  }

  /** End of the file: remove the base directory. */
  dispose(): void {
    fs.rmSync(this.base, { recursive: true, force: true });
    liveEnvs.delete(this);
  }
}

/**
 * `losetup -a` lines and mount lines that name `env`'s files, FUSE files or directories. Only
 * ours: other test files (attach.test.ts, the other root files) run in parallel with their own.
 */
function systemListing(env: RootEnv): { losetup: string[]; mounts: string[] } {
  const losetup = spawnSync(which("losetup") ?? "losetup", ["-a"], { encoding: "utf8" }).stdout ?? "";
  const mine = (line: string) => line.includes(env.base) || line.includes(`/${env.prefix}`);
  return {
    losetup: losetup.split("\n").filter((l) => l && mine(l)),
    mounts: fs
      .readFileSync("/proc/self/mounts", "utf8")
      .split("\n")
      .filter((l) => l && mine(unescapeMount(l))),
  };
}

/**
 * Register the hooks of a root test file (call inside its `describe`): a fresh scratch directory
 * per test, full cleanup after each test with a check that nothing is left, and at the end of the
 * file a check that `losetup -a`, the mounts and the run directory are as they were found.
 */
export function useRootEnv(label: string): RootEnv {
  const env = new RootEnv(label);
  let found: ReturnType<typeof systemListing> & { runDir: string[]; devDir: string[] };
  beforeAll(() => {
    env.init();
    found = { ...systemListing(env), runDir: fs.readdirSync(env.runDir), devDir: fs.readdirSync(env.devDir) };
  });
  beforeEach(() => env.begin());
  afterEach(async (ctx) => {
    const leftovers = await env.cleanup();
    const logs = env.daemonLogs();
    if (ctx.task.result?.state === "fail" && logs)
      console.error(`udmd log of "${ctx.task.name}" (last 6 KiB):\n${logs.slice(-6144)}`);
    const empty: Leftovers = {
      children: [],
      daemons: [],
      nbdfuse: [],
      mounts: [],
      loops: [],
      links: [],
      runDir: [],
      devDir: [],
    };
    expect(leftovers, "cleanup left resources behind").toEqual(empty);
  }, 120_000);
  afterAll(() => {
    const now = { ...systemListing(env), runDir: fs.readdirSync(env.runDir), devDir: fs.readdirSync(env.devDir) };
    env.dispose();
    expect(now, "losetup -a, the mounts and the run directory as the file found them").toEqual(found);
    expect(fs.existsSync(env.base)).toBe(false);
  }, 60_000);
  return env;
}
