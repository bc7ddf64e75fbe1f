/**
 * One udmd per run directory, held by flock(2) (dmsetup/daemon/instance-lock.ts): a restart right
 * after kill -9 works even while the dead daemon is a zombie, a stale pid file naming a live
 * process blocks nothing, and udmsetup's autostart says why a daemon it started did not come up.
 * Both sides refuse a run directory another user could have prepared (dmsetup/daemon/run-dir.ts).
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { tryLockExclusive } from "../../core/sys/file.js";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { UDMD, startDaemon, tempDir, udmsetup } from "../support/daemon.js";
import { skipOrFail } from "../support/requirements.js";

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

describe("a run directory someone else prepared", () => {
  const asRoot = process.geteuid?.() === 0;
  if (skipOrFail("run directory ownership checks", asRoot ? null : "needs root to give a directory to another user"))
    return;

  /** udmsetup ls against `dir` (no autostart): what the client says. */
  const clientSays = async (dir: string) => (await udmsetup(dir, ["ls"])).stderr;

  it("is refused by udmsetup and udmd when another user owns it, and udmd does not chmod it", async () => {
    const dir = runDir();
    fs.chmodSync(dir, 0o755);
    fs.chownSync(dir, 4242, 4242);
    // The squatter's fake control socket: nobody may talk to it.
    const fake = net.createServer((s) => s.end('{"id":1,"ok":true,"result":[]}\n')).listen(runPaths(dir).control);
    cleanups.push(() => new Promise((r) => fake.close(r)));
    expect(await clientSays(dir)).toBe(
      `cannot reach udmd: run directory ${dir} is owned by uid 4242, not by this user (uid 0) or root; refusing to use it\nCommand failed.\n`,
    );
    await expect(startDaemon(dir)).rejects.toThrow(`udmd: cannot start: run directory ${dir} is owned by uid 4242`);
    expect(fs.statSync(dir).mode & 0o777).toBe(0o755);
  });

  it("is refused when it is a symbolic link, or writable by others (udmd makes its own 0700)", async () => {
    const real = runDir();
    const link = `${real}-link`;
    fs.symlinkSync(real, link);
    cleanups.push(() => fs.rmSync(link, { force: true }));
    expect(await clientSays(link)).toBe(
      `cannot reach udmd: run directory ${link} is a symbolic link; refusing to use it\nCommand failed.\n`,
    );
    await expect(startDaemon(link)).rejects.toThrow("is a symbolic link");

    fs.chmodSync(real, 0o777);
    expect(await clientSays(real)).toBe(
      `cannot reach udmd: run directory ${real} has mode 0777: others may create files in it; refusing to use it\nCommand failed.\n`,
    );
    const daemon = await startDaemon(real);
    cleanups.push(() => daemon.stop());
    expect(fs.statSync(real).mode & 0o777).toBe(0o700);
    expect((await udmsetup(real, ["ls"])).stdout).toBe("No devices found\n");
  });
});
