/**
 * The systemd unit in docs/cli.md ("As a systemd service"), started the way systemd starts it:
 * the runtime directory made first with RuntimeDirectoryMode, the ExecStart command line (with
 * the built udmd in place of /usr/local/bin/udmd and a private directory in place of /run/udm),
 * then KillSignal, which must stop udmd cleanly (exit 0, run directory emptied) within
 * TimeoutStopSec.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { UDMD, udmsetup } from "../support/daemon.js";

const doc = fs.readFileSync(path.join(import.meta.dirname, "../../docs/cli.md"), "utf8");
const section = doc.slice(doc.indexOf("### As a systemd service"));
const unitText = /```ini\n([\s\S]*?)```/.exec(section)![1]!;

/** [Service] keys (the last value of each). */
function serviceKeys(text: string): Map<string, string> {
  const keys = new Map<string, string>();
  let inService = false;
  for (const line of text.split("\n")) {
    if (/^\[.*\]$/.test(line)) inService = line === "[Service]";
    const m = /^(\w+)=(.*)$/.exec(line);
    if (inService && m) keys.set(m[1]!, m[2]!);
  }
  return keys;
}

describe("the documented systemd unit", () => {
  const dirs: string[] = [];
  afterEach(() => {
    for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
  });

  it("starts udmd with ExecStart's arguments and stops it cleanly with KillSignal within TimeoutStopSec", async () => {
    const keys = serviceKeys(unitText);
    const [exe, ...args] = keys.get("ExecStart")!.split(/\s+/);
    expect(exe).toBe("/usr/local/bin/udmd");
    expect(keys.get("RuntimeDirectory")).toBe("udm");
    const parent = fs.mkdtempSync(path.join(os.tmpdir(), "udm-systemd-"));
    dirs.push(parent);
    const runDir = path.join(parent, "udm");
    const devDir = path.join(parent, "dev");
    fs.mkdirSync(runDir, { mode: Number.parseInt(keys.get("RuntimeDirectoryMode")!, 8) });
    const argv = args.map((a) => (a === "/run/udm" ? runDir : a === "/dev/udm" ? devDir : a));
    expect(argv).toContain(runDir);

    const proc = spawn(process.execPath, [UDMD, ...argv], { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    const exit = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
    await new Promise<void>((resolve, reject) => {
      proc.stderr!.on("data", () => stderr.includes('"udmd started"') && resolve());
      void exit.then((code) => reject(new Error(`udmd exited with ${code}: ${stderr}`)));
    });
    expect(await udmsetup(runDir, ["create", "v", "--table", "0 8 zero"])).toMatchObject({ code: 0 });

    const started = Date.now();
    proc.kill(keys.get("KillSignal") as NodeJS.Signals);
    expect(await exit).toBe(0);
    expect(Date.now() - started).toBeLessThan(Number(keys.get("TimeoutStopSec")) * 1000);
    expect(fs.readdirSync(runDir)).toEqual([]);
  }, 120_000);
});
