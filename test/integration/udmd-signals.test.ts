/**
 * A SIGTERM that reaches udmd while it starts stops it cleanly once it has started: exit status 0,
 * its sockets removed, the run directory unlocked. Before the fix the handlers went in after
 * start() returned, so such a signal met Node's default action and killed udmd (exit status null,
 * signal SIGTERM) — a client that read "udmd started" and sent SIGTERM at once could hit that gap
 * (a CI run did). Here the start is held deterministically: the device state names a remote NBD
 * backing served by this test, which accepts the connection and answers nothing until the signal
 * has been sent; udmd is then inside start(), restoring that device.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { tempDir, UDMD } from "../support/daemon.js";

describe("udmd and signals", () => {
  const cleanups: (() => void)[] = [];
  afterEach(() => {
    for (const c of cleanups.splice(0)) c();
  });

  it("stops cleanly on a SIGTERM that arrives while it restores devices at start", async () => {
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
    const paths = runPaths(dir);
    fs.mkdirSync(dir, { recursive: true });
    const table = `0 8 linear nbd://127.0.0.1:${port}/held 0`;
    fs.writeFileSync(
      paths.state,
      JSON.stringify({
        version: 1,
        devices: [
          {
            name: "held",
            uuid: "",
            minor: 0,
            suspended: false,
            live: { text: table, readOnly: false, seq: 1 },
            inactive: null,
            lowers: [],
            attached: false,
          },
        ],
      }) + "\n",
    );

    const proc = spawn(process.execPath, [UDMD, "--run-dir", dir, "--log-format", "json"], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    cleanups.push(() => proc.exitCode === null && proc.signalCode === null && proc.kill("SIGKILL"));
    let stderr = "";
    proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
      proc.once("exit", (code, signal) => r({ code, signal })),
    );

    await reached; // udmd is inside start(), waiting for the remote's greeting
    expect(stderr).not.toContain('"udmd started"');
    proc.kill("SIGTERM");
    // The kernel delivers the signal before udmd next runs its own code, so before it could see
    // the remote close: without a handler by then, SIGTERM's default action ends it here.
    for (const s of held) s.destroy();

    const { code, signal } = await exit;
    expect({ code, signal }, stderr).toEqual({ code: 0, signal: null });
    expect(stderr).toContain('"udmd started"');
    expect(stderr).toMatch(/"msg":"signal".*"signal":"SIGTERM"/);
    expect(fs.existsSync(paths.control)).toBe(false);
    expect(fs.existsSync(paths.nbd)).toBe(false);
  }, 60_000);
});
