/**
 * An NBD export as a file, through nbdfuse (Debian: libnbd-bin) running as a child of the daemon:
 * `nbdfuse -P DIR/nbdfuse.pid DIR/mnt/NAME URI` makes DIR/mnt/NAME a file whose reads and writes
 * are NBD requests. Ready when the pid file appears; undone with `fusermount3 -u DIR/mnt`, after
 * which nbdfuse exits and is reaped.
 */
import { type ChildProcess, execFile, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

export interface FuseFile {
  /** The file standing for the export. */
  file: string;
  pid: number;
  /**
   * Unmount and reap nbdfuse. `lazy` (forced detach) detaches the mount even while the file is
   * still open, and kills nbdfuse if it does not exit in time.
   */
  unmount(opts?: { lazy?: boolean }): Promise<void>;
}

export interface NbdfuseOptions {
  readOnly?: boolean;
  /** How long to wait for nbdfuse to be ready (default 10 s). */
  timeoutMs?: number;
  /** Told when nbdfuse exits before unmount() (its stderr included). */
  onUnexpectedExit?: (message: string) => void;
}

const live = new Map<ChildProcess, string>(); // nbdfuse → its mountpoint
let exitHookInstalled = false;

/**
 * Safety net for a daemon exiting without detaching: kill nbdfuse (aborting the FUSE connection,
 * so nothing waits on a server that is going away) and lazily unmount.
 */
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const [child, mnt] of live) {
      child.kill("SIGKILL");
      spawnSync("fusermount3", ["-u", "-z", mnt], { stdio: "ignore" });
    }
  });
}

/**
 * Mount export `uri` as `dir/mnt/name`. `dir` is created, and removed again by unmount(); what a
 * crashed daemon left there (a dead mount, a pid file) is cleared first.
 */
export async function mountNbdfuse(
  dir: string,
  name: string,
  uri: string,
  opts: NbdfuseOptions = {},
): Promise<FuseFile> {
  const mnt = path.join(dir, "mnt");
  const pidFile = path.join(dir, "nbdfuse.pid");
  await clearNbdfuseLeftovers(dir);
  fs.mkdirSync(mnt, { recursive: true, mode: 0o700 });
  installExitHook();

  const args = [...(opts.readOnly ? ["-r"] : []), "-P", pidFile, path.join(mnt, name), uri];
  const child = spawn("nbdfuse", args, { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4096)));
  child.on("error", () => undefined); // spawn failure: reported by waitForFile
  // "exit", not "close": a grandchild could keep the stderr pipe open.
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const stderrDone = new Promise<void>((resolve) => child.stderr!.once("close", () => resolve()));
  live.set(child, mnt);
  /** Wait for nbdfuse to exit, killing it after `graceMs`. */
  const reap = async (graceMs: number) => {
    const timer = setTimeout(() => child.kill("SIGKILL"), graceMs);
    await exited;
    clearTimeout(timer);
  };
  let unmounting = false;
  void exited.then(() => {
    live.delete(child);
    if (!unmounting) opts.onUnexpectedExit?.(`nbdfuse for ${name} exited (${describeExit(child)}): ${stderr.trim()}`);
  });

  try {
    await waitForFile(pidFile, opts.timeoutMs ?? 10_000, child);
  } catch (err) {
    unmounting = true;
    child.kill("SIGTERM");
    await reap(2_000);
    await fusermount(mnt, true).catch(() => undefined); // in case it mounted before failing
    removeDir(dir);
    await Promise.race([stderrDone, sleep(200)]);
    throw new Error(`nbdfuse ${uri}: ${(err as Error).message}${stderr.trim() ? `: ${stderr.trim()}` : ""}`);
  }

  return {
    file: path.join(mnt, name),
    pid: child.pid!,
    unmount: async ({ lazy = false } = {}) => {
      unmounting = true;
      if (child.exitCode === null && child.signalCode === null) {
        // The loop device may take a moment to let go of the file after LOOP_CLR_FD.
        for (let attempt = 0; ; attempt++) {
          try {
            await fusermount(mnt, false);
            break;
          } catch (err) {
            if (attempt < 20) await sleep(50);
            else if (lazy) {
              await fusermount(mnt, true);
              break;
            } else throw err;
          }
        }
      } else {
        await fusermount(mnt, true).catch(() => undefined); // died: clear the dead mount
      }
      await reap(lazy ? 2_000 : 10_000);
      removeDir(dir);
    },
  };
}

/** What a killed daemon's mountNbdfuse left in `dir` (a dead FUSE mount, the pid file), cleared. */
export async function clearNbdfuseLeftovers(dir: string): Promise<void> {
  if (!fs.existsSync(dir)) return;
  await fusermount(path.join(dir, "mnt"), true).catch(() => undefined);
  removeDir(dir);
}

/** Remove `dir`, its pid file and its (unmounted, so empty) mountpoint: never recursively. */
function removeDir(dir: string): void {
  fs.rmSync(path.join(dir, "nbdfuse.pid"), { force: true });
  for (const d of [path.join(dir, "mnt"), dir]) {
    try {
      fs.rmdirSync(d);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
  }
}

function describeExit(child: ChildProcess): string {
  return child.signalCode ? `signal ${child.signalCode}` : `status ${child.exitCode}`;
}

/** Resolve once `file` exists; reject if `child` exits first or after `timeoutMs`. */
function waitForFile(file: string, timeoutMs: number, child: ChildProcess): Promise<void> {
  return new Promise((resolve, reject) => {
    const watcher = fs.watch(path.dirname(file));
    let done = false;
    const finish = (err?: Error) => {
      if (done) return;
      done = true;
      watcher.close();
      clearTimeout(timer);
      child.off("error", finish).off("exit", onExit);
      if (err) reject(err);
      else resolve();
    };
    const onExit = () => finish(new Error(`exited (${describeExit(child)}) before it was ready`));
    const timer = setTimeout(() => finish(new Error(`not ready after ${timeoutMs} ms`)), timeoutMs);
    watcher.on("change", () => fs.existsSync(file) && finish());
    watcher.on("error", finish);
    child.once("error", finish).once("exit", onExit); // "error": nbdfuse not installed (ENOENT)
    if (fs.existsSync(file)) finish(); // written before the watch started
  });
}

function fusermount(mnt: string, lazy: boolean): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile("fusermount3", ["-u", ...(lazy ? ["-z"] : []), mnt], (err, _out, stderr) =>
      err ? reject(new Error(`fusermount3 -u ${mnt}: ${stderr.trim() || err.message}`)) : resolve(),
    );
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
