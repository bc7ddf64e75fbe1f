/**
 * nbdkit's lifecycle conventions on udmd (issue 18 item 14): captive mode (`--run CMD` with
 * `--device NAME=FILE`: start, create, run CMD with $uri/$socket, tear down, exit with CMD's
 * status) and `--exit-with-parent`. Runs the built udmd; CMD uses nbdinfo (libnbd-bin) as an NBD
 * client no one here wrote.
 */
import { execFile, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { tempDir, UDMD, UDMSETUP } from "../support/daemon.js";
import { missingToolsReason, skipOrFail } from "../support/requirements.js";

const skipReason = missingToolsReason(["nbdinfo"]);
skipOrFail("udmd captive mode tests", skipReason);

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function udmd(args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [UDMD, ...args], { timeout: 60_000 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? null) : 0;
      resolve({ code: typeof code === "number" ? code : null, stdout, stderr });
    });
  });
}

/** Resolves once `pid` no longer exists, or rejects after `timeoutMs`. */
async function exited(pid: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    if (Date.now() > deadline) throw new Error(`process ${pid} still runs after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.skipIf(skipReason !== null)("udmd --run and --exit-with-parent", () => {
  let runDir: string;
  let files: string;
  beforeEach(() => {
    runDir = tempDir("udm-captive-run-");
    files = tempDir("udm-captive-files-");
  });
  afterEach(() => {
    for (const d of [runDir, files]) fs.rmSync(d, { recursive: true, force: true });
  });

  it("creates the devices, runs CMD with $uri and $socket, removes everything and exits with CMD's status", async () => {
    const img = path.join(files, "disk.img");
    fs.writeFileSync(img, Buffer.alloc(1024 * 1024));
    const table = path.join(files, "vol.table");
    fs.writeFileSync(table, `0 2048 linear ${img} 0\n`);
    fs.writeFileSync(path.join(files, "zero.table"), "0 8 zero\n");
    const out = path.join(files, "out");
    const cmd =
      `nbdinfo --size "$uri" > ${out} && echo "$socket" >> ${out} && echo "$uri_z" >> ${out} && ` +
      `"${process.execPath}" "${UDMSETUP}" ls >> ${out} && exit 7`;
    const r = await udmd([
      "--run-dir",
      runDir,
      "--run",
      cmd,
      "--device",
      `vol=${table}`,
      "--device",
      `z=${path.join(files, "zero.table")}`,
    ]);
    expect(r.code, r.stderr).toBe(7);
    const [size, socket, uriZ, ...ls] = fs.readFileSync(out, "utf8").trimEnd().split("\n");
    expect(size).toBe(String(1024 * 1024));
    expect(socket).toBe(path.join(runDir, "nbd.sock"));
    expect(uriZ).toBe(`nbd+unix:///z?socket=${path.join(runDir, "nbd.sock")}`);
    expect(ls.map((l) => l.split("\t")[0])).toEqual(["vol", "z"]);
    // Torn down: the run directory holds nothing of the daemon, and no device state survives.
    expect(fs.readdirSync(runDir)).toEqual([]);
  });

  it("a device whose table cannot be read fails the run before CMD, leaving nothing", async () => {
    const marker = path.join(files, "ran");
    const r = await udmd([
      "--run-dir",
      runDir,
      "--run",
      `touch ${marker}`,
      "--device",
      `bad=${path.join(files, "missing.table")}`,
    ]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("udmd: --run: --device bad:");
    expect(r.stderr).toContain("missing.table");
    expect(fs.existsSync(marker)).toBe(false);
    expect(fs.readdirSync(runDir)).toEqual([]);
  });

  it("refuses --device without --run", async () => {
    expect(await udmd(["--run-dir", runDir, "--device", "a=b"])).toMatchObject({
      code: 2,
      stderr: "udmd: --device needs --run\n",
    });
  });

  it("--exit-with-parent: udmd stops cleanly when the process that started it dies", async () => {
    // sh starts udmd in the background and prints its pid; then sh is killed.
    const sh = spawn(
      "/bin/sh",
      ["-c", `"${process.execPath}" "${UDMD}" --run-dir "${runDir}" --exit-with-parent & echo $!; wait`],
      { stdio: ["ignore", "pipe", "ignore"] },
    );
    const pid = Number(
      await new Promise<string>((resolve) => sh.stdout!.once("data", (d: Buffer) => resolve(d.toString().trim()))),
    );
    const control = path.join(runDir, "control");
    const deadline = Date.now() + 30_000;
    while (!fs.existsSync(control)) {
      if (Date.now() > deadline) throw new Error("udmd did not start");
      await new Promise((r) => setTimeout(r, 50));
    }
    sh.kill("SIGKILL");
    await exited(pid, 30_000);
    // A clean stop (SIGTERM from the kernel, not a crash): the run directory was emptied.
    expect(fs.readdirSync(runDir)).toEqual([]);
  });
});
