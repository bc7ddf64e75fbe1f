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
  pid: string;
  /** flock(2)ed by the running daemon (instance-lock.ts). */
  lock: string;
  log: string;
}

export function runPaths(dir = defaultRunDir()): RunPaths {
  return {
    dir,
    control: path.join(dir, "control"),
    nbd: path.join(dir, "nbd.sock"),
    pid: path.join(dir, "udmd.pid"),
    lock: path.join(dir, "udmd.lock"),
    log: path.join(dir, "udmd.log"),
  };
}

export function ensureRunDir(dir: string): void {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  fs.chmodSync(dir, 0o700);
}
