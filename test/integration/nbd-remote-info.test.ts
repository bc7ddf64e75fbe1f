/**
 * `udmsetup info` on a device whose table names a remote device (an nbdkit export): udm's
 * "Remote ..." lines after dmsetup's, and `--json info`'s `remote` field, follow the connection
 * while nbdkit is killed (-9) and started again: connected, reconnecting with its attempt count and
 * a read waiting, failed once the I/O timeout has passed, connected again. `status` and `deps`
 * keep dmsetup's formats throughout.
 *
 * The states follow real time (reconnect backoff, the I/O timeout), so `info` is read until it
 * shows the next one, with a deadline; nothing waits a fixed time.
 */
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { useDaemon } from "../support/daemon.js";
import { WireClient } from "../support/nbd-client.js";
import { startNbdkit, stopNbdServers } from "../support/nbd-servers.js";
import { missingTools } from "../support/requirements.js";
import { cli } from "../support/udmd-tools.js";

const missing = missingTools("udmsetup info of remote devices", ["nbdkit"]);
const env = useDaemon("udm-nbd-info-");
const ok = (...args: string[]) => cli(env.dir, ...args);
const clients: WireClient[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  await env.daemon.stop(); // first: its shutdown flush would wait for a server already gone
  stopNbdServers();
});

/** `info NAME` once it matches `re` (read again and again until then; fails after `ms`). */
async function infoWhen(name: string, re: RegExp, ms = 20_000): Promise<{ text: string; match: RegExpExecArray }> {
  const deadline = Date.now() + ms;
  for (;;) {
    const text = await ok("info", name);
    const match = re.exec(text);
    if (match) return { text, match };
    if (Date.now() > deadline) throw new Error(`udmsetup info ${name} never matched ${re}; last:\n${text}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe.skipIf(missing.length > 0)("udmsetup info of a device over an nbdkit export", () => {
  it("shows connected, reconnecting (attempt N, a read queued), failed, connected again across a kill -9", async () => {
    const nbdkit = await startNbdkit(env.files, "mem", ["memory", "16M"]);
    const uri = `${nbdkit.uri()}&x-udm-timeout=4&x-udm-connections=2`;
    await ok("create", "r", "--table", `0 32768 linear ${uri} 0`);
    const head = await ok("info", "r");
    expect(head).toBe(
      [
        "Name:              r",
        "State:             ACTIVE",
        "Read Ahead:        256",
        "Tables present:    LIVE",
        "Open count:        0",
        "Event number:      0",
        "Major, minor:      253, 0",
        "Number of targets: 1",
        `Remote device:     ${uri}`,
        `Remote server:     unix socket ${nbdkit.sock}`,
        "Remote state:      connected (2 of 2 connections up, structured replies)",
        "Remote I/O:        0 in flight, 0 queued, 0 bytes unflushed, 0 reconnects",
        "",
        "",
      ].join("\n"),
    );
    const json = JSON.parse(await ok("--json", "info", "r")) as { remote: unknown[] };
    expect(json.remote).toEqual([
      {
        uri,
        state: "connected",
        server: `unix socket ${nbdkit.sock}`,
        connections: 2,
        connected: 2,
        attempt: 0,
        reconnects: 0,
        inFlight: 0,
        queued: 0,
        unflushedBytes: 0,
        replies: "structured",
        lastError: null,
      },
    ]);
    const status = await ok("status", "r");
    const deps = await ok("deps", "r");
    expect(deps).toBe(`1 dependencies\t: (${uri})\n`);

    const c = await WireClient.connect(path.join(env.dir, "nbd.sock"), "r");
    clients.push(c);
    await nbdkit.kill("SIGKILL");
    const first = await infoWhen("r", /Remote state: {6}reconnecting \(attempt (\d+), 0 of 2 connections up/);
    expect(first.text).toMatch(/^Remote last error: \S/m);
    // A read arriving now waits for a connection (for up to x-udm-timeout): it shows as queued.
    const waiting = c.read(0, 4096);
    await infoWhen("r", /^Remote I\/O: {8}0 in flight, 1 queued, 0 bytes unflushed, 0 reconnects$/m);
    // The attempts count up while nbdkit is away (backoff 50 ms doubling to 2 s), failed or not.
    const attempt = Number(first.match[1]);
    const next = await infoWhen("r", new RegExp(`(?:reconnecting|failed) \\(attempt (?!${attempt}\\b)(\\d+),`));
    expect(Number(next.match[1])).toBeGreaterThan(attempt);
    // No connection for longer than x-udm-timeout: failed, and the read with it.
    await infoWhen("r", /^Remote state: {6}failed \(attempt \d+, 0 of 2 connections up/m);
    expect((await waiting).error).toBe(5); // EIO
    expect(await ok("status", "r")).toBe(status); // the target's line, unchanged
    expect(await ok("deps", "r")).toBe(deps);

    await nbdkit.restart();
    const back = await infoWhen("r", /^Remote state: {6}connected \(2 of 2 connections up/m);
    expect(back.text).toMatch(/^Remote I\/O: {8}0 in flight, 0 queued, 0 bytes unflushed, 1 reconnect$/m);
    const after = JSON.parse(await ok("--json", "info", "r")) as { remote: Record<string, unknown>[] };
    expect(after.remote[0]).toMatchObject({ state: "connected", connected: 2, attempt: 0, reconnects: 1 });
    expect((await c.read(0, 4096)).error).toBe(0);
  });

  it("a device without remote devices prints exactly dmsetup's lines and no remote field", async () => {
    await ok("create", "z", "--table", "0 8 zero");
    const text = await ok("info", "z");
    expect(text).not.toMatch(/Remote/);
    expect(text.endsWith("Number of targets: 1\n\n")).toBe(true);
    expect(JSON.parse(await ok("--json", "info", "z"))).not.toHaveProperty("remote");
  });
});
