/**
 * One udmd per run directory, held by flock(2) (dmsetup/daemon/instance-lock.ts): a restart right
 * after kill -9 works even while the dead daemon is a zombie, a stale pid file naming a live
 * process blocks nothing, and udmsetup's autostart says why a daemon it started did not come up.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { tryLockExclusive } from "../../core/sys/file.js";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { UDMD, startDaemon, tempDir, udmsetup } from "../support/daemon.js";

const cleanups: (() => void | Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function runDir(): string {
  const dir = tempDir();
  cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** The state letter of /proc/PID/stat (R, S, Z...), or null once the process is gone. */
function processState(pid: number): string | null {
  try {
    return fs.readFileSync(`/proc/${pid}/stat`, "utf8").replace(/^.*\) /s, "")[0] ?? null;
  } catch {
    return null;
  }
}

async function until(what: string, check: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !check(); i++) await new Promise((r) => setTimeout(r, 10));
  if (!check()) throw new Error(`timed out waiting for ${what}`);
}

describe("udmd's instance lock", () => {
  it("starts when a stale pid file names a live process (a reused pid)", async () => {
    const dir = runDir();
    fs.writeFileSync(runPaths(dir).pid, `${process.pid}\n`); // alive: this test runner
    const daemon = await startDaemon(dir);
    cleanups.push(() => daemon.stop());
    expect(fs.readFileSync(runPaths(dir).pid, "utf8")).toBe(`${daemon.proc.pid}\n`);
  });

  it("restarts at once after kill -9 while the killed daemon is still a zombie", async () => {
    const dir = runDir();
    // udmd's parent is a shell that then becomes `sleep`, which never reaps it: killed, it stays a zombie.
    const parent = spawn("sh", ["-c", `"${process.execPath}" "${UDMD}" --run-dir "${dir}" & exec sleep 600`], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    cleanups.push(() => void parent.kill("SIGKILL"));
    let log = "";
    parent.stderr.on("data", (d: Buffer) => (log += d.toString()));
    await until("the first udmd to start", () => log.includes('"udmd started"'));
    const pid = Number(fs.readFileSync(runPaths(dir).pid, "utf8"));
    process.kill(pid, "SIGKILL");
    await until("the killed udmd to be a zombie", () => processState(pid) === "Z");

    const second = await startDaemon(dir);
    cleanups.push(() => second.stop());
    expect(processState(pid)).toBe("Z"); // still unreaped: a pid check would have refused
    expect((await udmsetup(dir, ["ls"])).stdout).toBe("No devices found\n");
  });

  it("autostart reports why the daemon it started exited, at once, not a connection error after 10 s", async () => {
    const dir = runDir();
    const paths = runPaths(dir);
    // Someone else holds the run directory but has no control socket (yet).
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const fd = fs.openSync(paths.lock, "w", 0o600);
    cleanups.push(() => fs.closeSync(fd));
    expect(tryLockExclusive(fd)).toBe(true);
    fs.writeFileSync(paths.pid, `${process.pid}\n`);

    const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, [path.resolve(UDMD, "../udmsetup.js"), "--run-dir", dir, "ls"], {
        stdio: ["ignore", "pipe", "pipe"],
      });
      let stderr = "";
      child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
      child.on("close", (code) => resolve({ code, stderr }));
    });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(
      `udmd exited with status 1 before it answered: udmd: udmd is already running on ${dir} (pid ${process.pid})`,
    );
    expect(r.stderr).not.toContain("ECONNREFUSED");
  });
});
