/**
 * Signals while udmd starts. A SIGTERM that reaches udmd while it starts stops it cleanly once it
 * has started: exit status 0, its sockets removed. Before the fix the handlers went in after
 * start() returned, so such a signal met Node's default action and killed udmd (exit status null,
 * signal SIGTERM) — a client that read "udmd started" and sent SIGTERM at once could hit that gap
 * (a CI run did). A second signal while the start still runs ends udmd at once (128 + its
 * number), and with --run a signal is reported as a shell reports it, not as CMD's success.
 *
 * The start is held deterministically: the device state names a remote NBD backing served by
 * this test, which accepts the connection and answers nothing until the test closes it; udmd is
 * then inside start(), restoring that device.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { tempDir, UDMD } from "../support/daemon.js";

interface HeldStart {
  dir: string;
  /** Resolves once udmd is inside start(), connected to the held remote. */
  reached: Promise<void>;
  /** Close the held connections: the restore fails and start() goes on. */
  release(): void;
  kill(signal: NodeJS.Signals): void;
  /** Resolves once udmd has logged that it took a signal while starting. */
  signalTaken(): Promise<void>;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr(): string;
}

describe("udmd and signals while it starts", () => {
  const cleanups: (() => void)[] = [];
  afterEach(() => {
    for (const c of cleanups.splice(0)) c();
  });

  /** udmd (with `args`) whose start restores a device over a remote that answers nothing. */
  async function heldStart(args: string[] = []): Promise<HeldStart> {
    const dir = tempDir("udm-signals-");
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const held: net.Socket[] = [];
    let connected!: () => void;
    const reached = new Promise<void>((r) => (connected = r));
    const remote = net.createServer((socket) => {
      held.push(socket);
      connected();
    });
    await new Promise<void>((r) => remote.listen(0, "127.0.0.1", r));
    cleanups.push(() => remote.close());
    const port = (remote.address() as net.AddressInfo).port;
    const table = `0 8 linear nbd://127.0.0.1:${port}/held 0`;
    const live = { text: table, readOnly: false, seq: 1 };
    const device = {
      name: "held",
      uuid: "",
      minor: 0,
      suspended: false,
      live,
      inactive: null,
      lowers: [],
      attached: false,
    };
    fs.writeFileSync(runPaths(dir).state, JSON.stringify({ version: 1, devices: [device] }) + "\n");

    const proc = spawn(process.execPath, [UDMD, "--run-dir", dir, "--log-format", "json", ...args], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    cleanups.push(() => void (proc.exitCode === null && proc.signalCode === null && proc.kill("SIGKILL")));
    let stderr = "";
    proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
      proc.once("exit", (code, signal) => r({ code, signal })),
    );
    // Or once udmd has exited (killed before it could say so: the test then fails on the exit).
    const signalTaken = () =>
      new Promise<void>((resolve) => {
        void exit.then(() => resolve());
        const check = () => stderr.includes("signal while starting") && (proc.stderr!.off("data", check), resolve());
        proc.stderr!.on("data", check);
        check();
      });
    return {
      dir,
      reached,
      signalTaken,
      release: () => held.forEach((s) => s.destroy()),
      kill: (signal) => proc.kill(signal),
      exit,
      stderr: () => stderr,
    };
  }

  it("stops cleanly on a SIGTERM that arrives while it restores devices at start", async () => {
    const udmd = await heldStart();
    await udmd.reached; // udmd is inside start(), waiting for the remote's greeting
    expect(udmd.stderr()).not.toContain('"udmd started"');
    udmd.kill("SIGTERM");
    // Without a handler, SIGTERM's default action ends udmd here; with one, it says so.
    await udmd.signalTaken();
    udmd.release();
    expect(await udmd.exit, udmd.stderr()).toEqual({ code: 0, signal: null });
    expect(udmd.stderr()).toContain('"udmd started"');
    expect(udmd.stderr()).toMatch(/"msg":"signal".*"signal":"SIGTERM"/);
    const paths = runPaths(udmd.dir);
    expect(fs.existsSync(paths.control)).toBe(false);
    expect(fs.existsSync(paths.nbd)).toBe(false);
  }, 60_000);

  it("a second signal while the start still runs ends udmd at once (128 + SIGINT)", async () => {
    const udmd = await heldStart();
    await udmd.reached;
    udmd.kill("SIGTERM");
    await udmd.signalTaken();
    udmd.kill("SIGINT");
    expect(await udmd.exit, udmd.stderr()).toEqual({ code: 130, signal: null });
    expect(udmd.stderr()).toContain("SIGINT again while starting: exiting without a clean stop");
    expect(udmd.stderr()).not.toContain('"udmd started"');
  }, 60_000);

  it("--run: a SIGTERM during the start stops udmd without running CMD, exit status 143", async () => {
    const marker = path.join(tempDir("udm-signals-run-"), "ran");
    cleanups.push(() => fs.rmSync(path.dirname(marker), { recursive: true, force: true }));
    const udmd = await heldStart(["--run", `touch ${marker}`]);
    await udmd.reached;
    udmd.kill("SIGTERM");
    await udmd.signalTaken();
    udmd.release();
    expect(await udmd.exit, udmd.stderr()).toEqual({ code: 143, signal: null });
    expect(fs.existsSync(marker)).toBe(false);
  }, 60_000);
});
