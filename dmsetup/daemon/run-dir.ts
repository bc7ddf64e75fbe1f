/**
 * Where a daemon lives: its run directory holds the control socket, the NBD socket, the pid file
 * and (when started by udmsetup) the log. One daemon per run directory.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

export function defaultRunDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.UDM_RUN_DIR) return path.resolve(env.UDM_RUN_DIR);
  const uid = process.getuid?.() ?? 0;
  if (uid === 0) return "/run/udm";
  if (env.XDG_RUNTIME_DIR) return path.join(env.XDG_RUNTIME_DIR, "udm");
  return path.join(os.tmpdir(), `udm-${uid}`);
}

export interface RunPaths {
  dir: string;
  control: string;
  nbd: string;
  /** The NBD socket attach's own clients use (nbdfuse, the kernel's nbd): their connections are not opens. */
  attachNbd: string;
  pid: string;
  /** flock(2)ed by the running daemon (instance-lock.ts). */
  lock: string;
  /** The devices, as a restarted daemon restores them (device-state.ts). */
  state: string;
  log: string;
}

export function runPaths(dir = defaultRunDir()): RunPaths {
  return {
    dir,
    control: path.join(dir, "control"),
    nbd: path.join(dir, "nbd.sock"),
    attachNbd: path.join(dir, "attach.sock"),
    pid: path.join(dir, "udmd.pid"),
    lock: path.join(dir, "udmd.lock"),
    state: path.join(dir, "devices.json"),
    log: path.join(dir, "udmd.log"),
  };
}

/**
 * Create the run directory if needed and check it can be trusted (the daemon's side); a directory
 * of our own with a looser mode is made 0700.
 */
export function ensureRunDir(dir: string): void {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = checkRunDir(dir, { fixMode: true });
  if (st && (st.mode & 0o777) !== 0o700) fs.chmodSync(dir, 0o700);
}

/**
 * A run directory someone else could have prepared is refused, as tmux and ssh-agent refuse
 * theirs: it must be a real directory (not a symlink), owned by this user or root, and, unless
 * `fixMode` (our own directory, which we may chmod), writable by no one else. Otherwise an attacker
 * who created `$TMPDIR/udm-$UID` first could answer on its control socket. Returns the directory's
 * status, or undefined when it does not exist.
 */
export function checkRunDir(dir: string, opts: { fixMode?: boolean } = {}): fs.Stats | undefined {
  const st = fs.lstatSync(dir, { throwIfNoEntry: false });
  if (!st) return undefined;
  const uid = process.geteuid?.() ?? 0;
  const refuse = (why: string) => {
    throw Object.assign(new Error(`run directory ${dir} ${why}; refusing to use it`), { code: "EACCES" });
  };
  if (st.isSymbolicLink()) refuse("is a symbolic link");
  if (!st.isDirectory()) refuse("is not a directory");
  if (st.uid !== uid && st.uid !== 0) refuse(`is owned by uid ${st.uid}, not by this user (uid ${uid}) or root`);
  const open = st.mode & 0o022;
  if (open !== 0 && !(opts.fixMode && st.uid === uid)) {
    refuse(`has mode ${(st.mode & 0o777).toString(8).padStart(4, "0")}: others may create files in it`);
  }
  return st;
}
