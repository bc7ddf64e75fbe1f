/**
 * One daemon per run directory: a pid file created exclusively. A pid file whose process is gone
 * (a daemon killed with -9) is stale and is taken over, together with its leftover sockets.
 */
import fs from "node:fs";

export class AlreadyRunningError extends Error {
  constructor(readonly pid: number, dir: string) {
    super(`udmd is already running on ${dir} (pid ${pid})`);
    this.name = "AlreadyRunningError";
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Take the run directory or throw AlreadyRunningError. `stale` lists files to clear on takeover. */
export function acquireInstanceLock(pidFile: string, dir: string, stale: string[]): () => void {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = fs.openSync(pidFile, "wx", 0o600);
      fs.writeSync(fd, `${process.pid}\n`);
      fs.closeSync(fd);
      for (const f of stale) fs.rmSync(f, { force: true });
      return () => {
        try {
          if (Number(fs.readFileSync(pidFile, "utf8")) === process.pid) fs.rmSync(pidFile, { force: true });
        } catch {
          /* already gone */
        }
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      const pid = Number(fs.readFileSync(pidFile, "utf8").trim());
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && alive(pid)) throw new AlreadyRunningError(pid, dir);
      fs.rmSync(pidFile, { force: true }); // stale: its daemon is dead
    }
  }
  throw new Error(`cannot take ${pidFile}: another daemon is starting at the same time`);
}
