/**
 * Shared support for the root-run integration tests in test/root/: real loop devices over sparse
 * files, the built udmd and udmsetup (dist/), `udmsetup attach`, filesystems, mounts, fsfreeze,
 * fio and NBD clients.
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
import { type ChildProcess, execFile, spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, afterEach, beforeAll, beforeEach, expect, it } from "vitest";
import { type RunningDaemon, startDaemon, udmsetup, type CliResult } from "./daemon.js";
import { createLoopDevice, type LoopDevice, type LoopOptions } from "./loop-device.js";

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const SECTOR = 512;

export const REQUIRED = process.env.UDM_REQUIRE_ROOT_TESTS === "1";

// ---------------------------------------------------------------------------------------------
// Availability and skip rules

/** Absolute path of `tool` on PATH (or /usr/sbin, /sbin), or undefined. */
export function which(tool: string): string | undefined {
  const dirs = [...(process.env.PATH ?? "").split(path.delimiter), "/usr/sbin", "/sbin", "/usr/bin", "/bin"];
  return dirs
    .filter(Boolean)
    .map((d) => path.join(d, tool))
    .find((p) => {
      try {
        fs.accessSync(p, fs.constants.X_OK);
        return fs.statSync(p).isFile();
      } catch {
        return false;
      }
    });
}

/** The tools every root test uses (attach needs nbdfuse + fusermount3, checks need losetup). */
export const BASE_TOOLS = ["nbdfuse", "fusermount3", "mount", "umount", "losetup"];

const DEBIAN_PACKAGES: Record<string, string> = {
  nbdfuse: "libnbd-bin",
  nbdcopy: "libnbd-bin",
  fusermount3: "fuse3",
  "mkfs.ext4": "e2fsprogs",
  e2fsck: "e2fsprogs",
  debugfs: "e2fsprogs",
  fsfreeze: "util-linux",
  losetup: "util-linux",
  mount: "mount",
  umount: "mount",
  fio: "fio",
  "mkfs.xfs": "xfsprogs",
  xfs_repair: "xfsprogs",
};

/** Why the root tests needing `tools` cannot run here, or null if they can. */
export function rootUnavailableReason(tools: readonly string[]): string | null {
  if (process.platform !== "linux") return `needs Linux (this is ${process.platform})`;
  if (process.getuid?.() !== 0) return "needs root (loop devices, mounts, FUSE)";
  for (const dev of ["/dev/loop-control", "/dev/fuse"]) if (!fs.existsSync(dev)) return `${dev} is missing`;
  const missing = [...new Set([...BASE_TOOLS, ...tools])].filter((t) => !which(t));
  if (missing.length) {
    const pkgs = [...new Set(missing.map((t) => DEBIAN_PACKAGES[t] ?? t))];
    return `${missing.join(", ")} not installed (Debian: apt-get install ${pkgs.join(" ")})`;
  }
  return null;
}

/**
 * Print why `suite` is skipped. With UDM_REQUIRE_ROOT_TESTS=1 the skip is a failure: a test that
 * fails with the reason is registered (only then, so a normal run shows no extra test).
 */
export function announceSkip(suite: string, reason: string | null): void {
  if (reason === null) return;
  console.warn(`${suite} ${REQUIRED ? "REQUIRED but cannot run" : "skipped"}: ${reason}`);
  if (REQUIRED) {
    it(`${suite} must run (UDM_REQUIRE_ROOT_TESTS=1)`, () => {
      throw new Error(`UDM_REQUIRE_ROOT_TESTS=1 but ${suite} cannot run: ${reason}`);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Running tools

export interface ToolResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Children started by `tool()` and not yet exited: a cleanup kills them. */
const children = new Set<ChildProcess>();

/**
 * Run a system tool; resolves whatever its exit status (see `sh` for "must succeed"). After
 * `timeoutMs` it is killed, and the promise resolves (code null) even if the process cannot die
 * yet: a tool stuck in uninterruptible I/O on a hung device must not hang the caller too.
 */
export function tool(name: string, args: string[], opts: { timeoutMs?: number; input?: string } = {}): Promise<ToolResult> {
  return new Promise((resolve) => {
    let settled = false;
    let timedOut = false;
    const finish = (r: ToolResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(r);
    };
    const child = execFile(
      which(name) ?? name,
      args,
      { encoding: "utf8", maxBuffer: 64 * MiB, env: { ...process.env, LANG: "C" } },
      (err, stdout, stderr) => {
        children.delete(child);
        const e = err as (Error & { code?: number | string; signal?: NodeJS.Signals }) | null;
        const code = e ? (typeof e.code === "number" ? e.code : null) : 0;
        const note = timedOut ? `\n(killed after ${opts.timeoutMs ?? 60_000} ms)` : e && code === null && !e.signal ? e.message : "";
        finish({ code, signal: e?.signal ?? null, stdout, stderr: stderr + note });
      },
    );
    children.add(child);
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
      // Still not gone after a second: in D state. Give up waiting; the cleanup kills it again.
      setTimeout(() => finish({ code: null, signal: "SIGKILL", stdout: "", stderr: `${name} ${args.join(" ")}: killed after ${opts.timeoutMs ?? 60_000} ms, not exited (stuck in I/O)` }), 1_000).unref();
    }, opts.timeoutMs ?? 60_000);
    child.stdin?.on("error", () => undefined); // EPIPE when it was killed or never reads
    child.stdin?.end(opts.input ?? "");
  });
}

/** Run a system tool that must succeed; returns its stdout. */
export async function sh(name: string, ...args: string[]): Promise<string> {
  const r = await tool(name, args);
  if (r.code !== 0) {
    throw new Error(`${name} ${args.join(" ")} failed (${r.signal ? `signal ${r.signal}` : `exit ${r.code}`}):\n${r.stderr}${r.stdout}`);
  }
  return r.stdout;
}

// ---------------------------------------------------------------------------------------------
// System state: mounts, loop devices, processes

function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** [source, target] of every mount, from /proc/self/mounts. */
export function mounts(): { source: string; target: string }[] {
  return fs
    .readFileSync("/proc/self/mounts", "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => {
      const [source, target] = l.split(" ");
      return { source: unescapeMount(source!), target: unescapeMount(target!) };
    });
}

/** Bound loop devices and their backing files (as sysfs reports them). */
export function boundLoops(): { dev: string; backing: string }[] {
  const out: { dev: string; backing: string }[] = [];
  for (const d of fs.readdirSync("/sys/block").filter((n) => n.startsWith("loop"))) {
    try {
      out.push({ dev: `/dev/${d}`, backing: fs.readFileSync(`/sys/block/${d}/loop/backing_file`, "utf8").trim() });
    } catch {
      // not bound
    }
  }
  return out;
}

/** Processes whose executable basename is `exe` and whose command line mentions `needle`. */
export function pidsOf(exe: string, needle: string): number[] {
  const pids: number[] = [];
  for (const pid of fs.readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    if (Number(pid) === process.pid) continue;
    try {
      const argv = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
      if (argv.some((a) => path.basename(a) === exe) && argv.some((a) => a.includes(needle))) pids.push(Number(pid));
    } catch {
      // exited meanwhile
    }
  }
  return pids;
}

function isUnder(p: string, dir: string): boolean {
  return p === dir || p.startsWith(dir + "/");
}

function killQuietly(pid: number, signal: NodeJS.Signals = "SIGKILL"): void {
  try {
    process.kill(pid, signal);
  } catch {
    // gone
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// Files with known contents

/** `bytes` of deterministic pseudo-random data for `key` (AES-CTR keystream). */
export function patternBytes(key: string, bytes: number): Buffer {
  const k = crypto.createHash("sha256").update(key).digest();
  const cipher = crypto.createCipheriv("aes-256-ctr", k, Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(bytes)), cipher.final()]);
}

export const sha256 = (b: Buffer) => crypto.createHash("sha256").update(b).digest("hex");

/** A directory tree: relative path → contents. Directories are implied by the paths. */
export type Tree = Map<string, Buffer>;

/**
 * A tree of `count` files in nested directories, sizes from 0 bytes to `maxBytes`, including the
 * awkward ones (1, 4095, 4096, 4097 bytes), contents derived from `seed`.
 */
export function makeTree(seed: string, count: number, maxBytes: number): Tree {
  const fixed = [0, 1, 511, 4095, 4096, 4097, 65536 + 17];
  const tree: Tree = new Map();
  for (let i = 0; i < count; i++) {
    const dir = i % 5 === 0 ? "" : `d${i % 3}/${i % 2 ? "sub/" : ""}`;
    const size = i < fixed.length ? fixed[i]! : Math.floor(((i * 7919) % 1000) / 1000 * maxBytes) + 1;
    tree.set(`${dir}f${i}.bin`, patternBytes(`${seed}/${i}`, Math.min(size, maxBytes)));
  }
  return tree;
}

export function writeTree(root: string, tree: Tree): void {
  for (const [rel, data] of tree) {
    fs.mkdirSync(path.dirname(path.join(root, rel)), { recursive: true });
    fs.writeFileSync(path.join(root, rel), data);
  }
}

/** sha256 of every regular file under `root` (lost+found excluded), by relative path, sorted. */
export function hashTree(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (rel: string) => {
    for (const e of fs.readdirSync(path.join(root, rel), { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (r === "lost+found") continue;
      if (e.isDirectory()) walk(r);
      else if (e.isFile()) out[r] = sha256(fs.readFileSync(path.join(root, r)));
      else out[r] = `<${e.isSymbolicLink() ? "symlink" : "special"}>`;
    }
  };
  walk("");
  return Object.fromEntries(Object.entries(out).sort(([a], [b]) => a.localeCompare(b)));
}

/** What `hashTree` should return for `tree`. */
export function treeHashes(tree: Tree): Record<string, string> {
  return Object.fromEntries([...tree].map(([rel, data]) => [rel, sha256(data)] as const).sort(([a], [b]) => a.localeCompare(b)));
}

/** sha256 of the first `bytes` (default: all) of a device or file, read in 4 MiB steps. */
export function digestDevice(dev: string, bytes?: number): string {
  const fd = fs.openSync(dev, "r");
  try {
    const h = crypto.createHash("sha256");
    const buf = Buffer.alloc(4 * MiB);
    for (let pos = 0; bytes === undefined || pos < bytes; ) {
      const n = fs.readSync(fd, buf, 0, bytes === undefined ? buf.length : Math.min(buf.length, bytes - pos), pos);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
      pos += n;
    }
    return h.digest("hex");
  } finally {
    fs.closeSync(fd);
  }
}

/** `length` bytes of `dev` (a device or file) at byte offset `pos`. */
export function readAt(dev: string, pos: number, length: number): Buffer {
  const fd = fs.openSync(dev, "r");
  try {
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, buf, done, length - done, pos + done);
      if (n === 0) break;
      done += n;
    }
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}

// ---------------------------------------------------------------------------------------------
// The per-file environment

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
    return boundLoops().filter(({ backing }) => isUnder(backing.replace(/ \(deleted\)$/, ""), this.base) || backing.includes(`/${this.prefix}`));
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
    for (const child of [...children]) child.kill("SIGKILL");
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
    for (let i = 0; i < 50 && children.size > 0; i++) await sleep(20);
    // 3. Frozen filesystems block every writer, umount included.
    for (const target of [...this.frozen]) {
      if ((await tool("fsfreeze", ["-u", target], { timeoutMs: 10_000 })).code === null) abortFuse();
      this.frozen.delete(target);
    }
    // 4. Our mounts, innermost first. An unmount that hangs means the I/O path is stuck: abort
    //    FUSE and detach lazily.
    const ours = [...new Set([...this.mountPoints, ...this.ourMounts().filter((m) => !isUnder(m, this.runDir))])].reverse();
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
    for (let i = 0; i < 50 && children.size > 0; i++) await sleep(20);
    return {
      children: [...children].map((c) => c.pid ?? -1),
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
    const quiet = (cmd: string, args: string[]) => spawnSync(which(cmd) ?? cmd, args, { stdio: "ignore", timeout: 10_000 });
    for (const child of children) child.kill("SIGKILL");
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
    mounts: fs.readFileSync("/proc/self/mounts", "utf8").split("\n").filter((l) => l && mine(unescapeMount(l))),
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
    if (ctx.task.result?.state === "fail" && logs) console.error(`udmd log of "${ctx.task.name}" (last 6 KiB):\n${logs.slice(-6144)}`);
    const empty: Leftovers = { children: [], daemons: [], nbdfuse: [], mounts: [], loops: [], links: [], runDir: [], devDir: [] };
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

// ---------------------------------------------------------------------------------------------
// Filesystems

export interface FsKind {
  name: "ext4" | "xfs";
  /** Tools it needs besides BASE_TOOLS. */
  tools: string[];
  /** Smallest sensible device for it. */
  minBytes: number;
  mkfs(dev: string): Promise<void>;
  /** A read-only check that must exit 0 on a clean filesystem; returns its output. */
  check(dev: string): Promise<ToolResult>;
  /** Mount options for a second copy of the same filesystem (a snapshot) next to the original. */
  snapshotMountOptions(readOnly: boolean): string[];
  /**
   * Whether a snapshot of the frozen filesystem needs its log replayed (a read-write mount and
   * unmount) before the read-only check can be clean. ext4's freeze leaves a clean journal; XFS's
   * only covers its log, and its lazy superblock counters are settled by log recovery.
   */
  replayLogBeforeCheck: boolean;
}

export const EXT4: FsKind = {
  name: "ext4",
  tools: ["mkfs.ext4", "e2fsck", "fsfreeze"],
  minBytes: 64 * MiB,
  // No lazy initialisation: a background thread would keep writing after mount.
  mkfs: async (dev) => void (await sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)),
  check: (dev) => tool("e2fsck", ["-fn", dev]),
  snapshotMountOptions: (readOnly) => (readOnly ? ["ro"] : []),
  replayLogBeforeCheck: false,
};

export const XFS: FsKind = {
  name: "xfs",
  tools: ["mkfs.xfs", "xfs_repair", "fsfreeze"],
  minBytes: 320 * MiB, // mkfs.xfs refuses filesystems under 300 MB
  mkfs: async (dev) => void (await sh("mkfs.xfs", "-q", "-f", dev)),
  check: (dev) => tool("xfs_repair", ["-n", dev]),
  // The snapshot has the origin's UUID.
  snapshotMountOptions: (readOnly) => ["nouuid", ...(readOnly ? ["ro"] : [])],
  replayLogBeforeCheck: true,
};

// ---------------------------------------------------------------------------------------------
// Changing a mounted tree, with a model of the result

/**
 * Change the files of `tree` under `root` in every way a filesystem writes differently: rewrite
 * whole files, overwrite a range in place, append, truncate, delete, rename, and create new files
 * (one of `bigBytes`). Returns the tree the directory now holds.
 */
export function changeTree(root: string, tree: Tree, seed: string, bigBytes = 2 * MiB): Tree {
  const next: Tree = new Map(tree);
  const names = [...tree.keys()].sort();
  const at = (i: number) => names[i % names.length]!;
  const file = (rel: string) => path.join(root, rel);
  // Rewrite whole files (new blocks).
  for (const rel of [at(1), at(7)]) {
    const data = patternBytes(`${seed}/rewrite/${rel}`, tree.get(rel)!.length + 3000);
    fs.writeFileSync(file(rel), data);
    next.set(rel, data);
  }
  // Overwrite a range in the middle, in place (the old blocks change).
  for (const rel of names.filter((n) => tree.get(n)!.length >= 16 * KiB).slice(0, 3)) {
    const data = Buffer.from(next.get(rel)!);
    const patch = patternBytes(`${seed}/patch/${rel}`, Math.min(9000, data.length >> 1));
    const pos = (data.length >> 2) + 123;
    const fd = fs.openSync(file(rel), "r+");
    fs.writeSync(fd, patch, 0, patch.length, pos);
    fs.closeSync(fd);
    patch.copy(data, pos);
    next.set(rel, data);
  }
  // Append.
  {
    const rel = at(4);
    const extra = patternBytes(`${seed}/append`, 70_000);
    fs.appendFileSync(file(rel), extra);
    next.set(rel, Buffer.concat([next.get(rel)!, extra]));
  }
  // Truncate.
  {
    const rel = at(5);
    const keep = Math.floor(next.get(rel)!.length / 3);
    fs.truncateSync(file(rel), keep);
    next.set(rel, next.get(rel)!.subarray(0, keep));
  }
  // Delete, rename.
  for (const rel of [at(2), at(9)]) {
    fs.rmSync(file(rel));
    next.delete(rel);
  }
  {
    const rel = at(11);
    const to = `${path.dirname(rel) === "." ? "" : `${path.dirname(rel)}/`}renamed-${seed}.bin`;
    fs.renameSync(file(rel), file(to));
    next.set(to, next.get(rel)!);
    next.delete(rel);
  }
  // New files, one big, one in a new directory.
  const added: [string, number][] = [
    [`new-${seed}/big.bin`, bigBytes],
    [`new-${seed}/small.txt`, 100],
    [`d1/new-${seed}.bin`, 33_333],
  ];
  for (const [rel, size] of added) {
    const data = patternBytes(`${seed}/new/${rel}`, size);
    fs.mkdirSync(path.dirname(file(rel)), { recursive: true });
    fs.writeFileSync(file(rel), data);
    next.set(rel, data);
  }
  return next;
}

// ---------------------------------------------------------------------------------------------
// A snapshot of a live filesystem, the documented way

export interface LiveSnapshot {
  fs: FsKind;
  originFile: string;
  cowFile: string;
  originLoop: LoopDevice;
  cowLoop: LoopDevice;
  /** Size of both tables, in sectors. */
  sectors: number;
  /** udm device names. */
  base: string;
  snap: string;
  /** `base` attached and mounted here. */
  baseDev: Attached;
  mnt: string;
  /** The files when the snapshot was taken. */
  before: Tree;
  /** The files on the origin now. */
  after: Tree;
}

/** The snapshot table for `rig`, with chunk size `chunk` (0: from the COW header). */
export function snapshotTable(rig: Pick<LiveSnapshot, "sectors" | "originLoop" | "cowLoop">, chunk: number, store = "P"): string {
  return `0 ${rig.sectors} snapshot ${rig.originLoop.path} ${rig.cowLoop.path} ${store} ${chunk}`;
}

/**
 * Make a filesystem on a loop device (the origin), put it behind a snapshot-origin device in a
 * fresh udmd, attach and mount that, write a tree of files, freeze the filesystem and take a
 * persistent snapshot with 4 KiB chunks on a second loop device (suspend the origin, create the
 * snapshot, resume: docs/snapshot.md), thaw, then keep changing files on the origin (`change`).
 */
export async function takeLiveSnapshot(
  env: RootEnv,
  kind: FsKind,
  opts: {
    originBytes?: number;
    cowBytes: number;
    /** Snapshot chunk size in sectors (default 8: one 4 KiB filesystem block per chunk). */
    chunk?: number;
    files?: number;
    maxFileBytes?: number;
    /** Rounds of changes on the origin after the snapshot (default 2). */
    changes?: number;
    /**
     * Also overwrite a file of this size (`fio.dat`, written before the snapshot) with fio:
     * random 4 KiB direct writes, 32 in flight, verified, while the changes run.
     */
    fioBytes?: number;
  },
): Promise<LiveSnapshot> {
  const originBytes = opts.originBytes ?? Math.max(128 * MiB, kind.minBytes);
  const originFile = env.sparseFile("origin.img", originBytes);
  const cowFile = env.sparseFile("cow.img", opts.cowBytes); // sparse: its start reads as zeros, a new store
  const originLoop = await env.loop(originFile);
  const cowLoop = await env.loop(cowFile);
  await kind.mkfs(originLoop.path);

  const sectors = originBytes / SECTOR;
  const base = env.name("base");
  const snap = env.name("snap");
  await env.startDaemon();
  await env.ok("create", base, "--table", `0 ${sectors} snapshot-origin ${originLoop.path}`);
  const baseDev = await env.attach(base);
  const mnt = env.dir("origin");
  await env.mount(baseDev.link, mnt);

  const before = makeTree(`${kind.name}-before`, opts.files ?? 24, opts.maxFileBytes ?? 1 * MiB);
  if (opts.fioBytes) before.set("fio.dat", patternBytes(`${kind.name}-fio`, opts.fioBytes));
  writeTree(mnt, before);
  await sh("sync", "-f", mnt);
  // A frozen filesystem is consistent on disk (its journal flushed): what the snapshot captures.
  await env.freeze(mnt);
  await env.ok("suspend", base);
  await env.ok("create", snap, "--table", snapshotTable({ sectors, originLoop, cowLoop }, opts.chunk ?? 8));
  await env.ok("resume", base);
  // Nothing copied yet: only the header and the first metadata area, a chunk each (thawing
  // writes the superblock, so check before).
  const fresh = 2 * (opts.chunk ?? 8);
  expect(await env.ok("status", snap)).toBe(`0 ${sectors} snapshot ${fresh}/${opts.cowBytes / SECTOR} ${fresh}\n`);
  await env.thaw(mnt);

  let after = before;
  const fio = opts.fioBytes ? fioOverwrite(path.join(mnt, "fio.dat"), opts.fioBytes) : null;
  for (let round = 0; round < (opts.changes ?? 2); round++) {
    after = changeTree(mnt, after, `${kind.name}-after${round}`);
    await sh("sync", "-f", mnt);
  }
  if (fio) {
    await fio;
    after = new Map(after).set("fio.dat", fs.readFileSync(path.join(mnt, "fio.dat")));
  }
  return { fs: kind, originFile, cowFile, originLoop, cowLoop, sectors, base, snap, baseDev, mnt, before, after };
}

/**
 * Overwrite every 4 KiB block of the existing file `file` once, in random order, with direct
 * writes (32 in flight), then read each back and check its crc32c. Fails unless fio reports no
 * error and wrote and verified all `bytes`.
 */
export async function fioOverwrite(file: string, bytes: number, opts: { iodepth?: number } = {}): Promise<void> {
  const r = await tool("fio", [
    "--name=overwrite",
    `--filename=${file}`,
    `--size=${bytes}`,
    "--rw=randwrite",
    "--bs=4k",
    "--direct=1",
    "--ioengine=libaio",
    `--iodepth=${opts.iodepth ?? 32}`,
    "--overwrite=1",
    "--verify=crc32c",
    "--verify_fatal=1",
    "--randrepeat=1",
    "--output-format=json",
  ], { timeoutMs: 120_000 });
  expect(r.code, `fio over ${file}:\n${r.stderr}${r.stdout}`).toBe(0);
  const job = (JSON.parse(r.stdout.slice(r.stdout.indexOf("{"))) as { jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[] }).jobs[0]!;
  expect({ error: job.error, written: job.write.io_bytes, verified: job.read.io_bytes }).toEqual({ error: 0, written: bytes, verified: bytes });
}

/** `<allocated>/<total> <metadata>` of a snapshot (or snapshot-merge) status line, as numbers. */
export function snapshotUsage(status: string): { allocated: number; total: number; metadata: number } {
  const m = / snapshot(?:-merge)? (\d+)\/(\d+) (\d+)\n?$/.exec(status);
  if (!m) throw new Error(`not a snapshot usage status: ${JSON.stringify(status)}`);
  return { allocated: Number(m[1]), total: Number(m[2]), metadata: Number(m[3]) };
}

/**
 * Expect the filesystem on the attached snapshot `dev` to check clean, replaying its log first
 * (mount read-write at `mnt`, unmount) where the filesystem needs that (`replayLogBeforeCheck`).
 */
export async function expectCleanSnapshot(env: RootEnv, kind: FsKind, dev: string, mnt: string): Promise<void> {
  if (kind.replayLogBeforeCheck) {
    await env.mount(dev, mnt, kind.snapshotMountOptions(false));
    await env.umount(mnt);
  }
  await expectClean(kind, dev);
}

/** Expect `kind`'s read-only check of `dev` to pass. */
export async function expectClean(kind: FsKind, dev: string): Promise<void> {
  const r = await kind.check(dev);
  expect(r.code, `${kind.name} check of ${dev}:\n${r.stdout}${r.stderr}`).toBe(0);
}
