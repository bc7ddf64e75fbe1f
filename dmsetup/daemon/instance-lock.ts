/**
 * One daemon per run directory: an exclusive flock(2) on `udmd.lock`, held for the daemon's life.
 * The kernel releases it when the daemon dies, however it dies, so a restart right after kill -9
 * works (the dead daemon may still be a zombie; a pid check would take it for alive) and a stale
 * pid file naming a reused pid blocks nothing. The pid file only tells a second daemon whom to name.
 */
import fs from "node:fs";
import { tryLockExclusive } from "../../core/sys/file.js";

export class AlreadyRunningError extends Error {
  constructor(
    readonly pid: number | null,
    dir: string,
  ) {
    super(`udmd is already running on ${dir}${pid === null ? "" : ` (pid ${pid})`}`);
    this.name = "AlreadyRunningError";
  }
}

export interface InstanceLockPaths {
  dir: string;
  lock: string;
  pid: string;
}

function recordedPid(pidFile: string): number | null {
  try {
    const pid = Number(fs.readFileSync(pidFile, "utf8").trim());
    return Number.isInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

/**
 * Take the run directory or throw AlreadyRunningError. `stale` lists files a dead daemon may have
 * left (its sockets), removed once the lock is ours. Returns the release function, which removes
 * the pid and lock files.
 */
export function acquireInstanceLock(paths: InstanceLockPaths, stale: string[]): () => void {
  const fd = lockFile(paths);
  for (const f of stale) fs.rmSync(f, { force: true });
  fs.writeFileSync(paths.pid, `${process.pid}\n`, { mode: 0o600 });
  return () => {
    fs.rmSync(paths.pid, { force: true });
    // Unlink before unlocking: whoever opens the name next gets a new file, which lockFile checks.
    fs.rmSync(paths.lock, { force: true });
    fs.closeSync(fd);
  };
}

/**
 * Open and lock the lock file. A daemon that is stopping unlinks the file while still holding its
 * lock: a newcomer that locked such an unlinked file tries again with the name's new file.
 */
function lockFile(paths: InstanceLockPaths): number {
  for (;;) {
    const fd = fs.openSync(paths.lock, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    let keep = false;
    try {
      if (!tryLockExclusive(fd)) throw new AlreadyRunningError(recordedPid(paths.pid), paths.dir);
      const named = fs.statSync(paths.lock, { throwIfNoEntry: false });
      keep = named !== undefined && named.ino === fs.fstatSync(fd).ino;
    } finally {
      if (!keep) fs.closeSync(fd);
    }
    if (keep) return fd;
  }
}
