/**
 * What keeps udmd's TCP NBD listener from being abused (docs/security.md): no plaintext listener
 * off loopback, a handshake timeout, connection limits per client address and in total with a
 * log line when one is hit, and descriptors kept for the control socket however many NBD
 * connections are attempted: root's `udmsetup ls` must keep working under the flood.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { type RunningDaemon, UDMD, startDaemon, tempDir, udmsetup } from "../support/daemon.js";
import { writePskFiles } from "../support/tls-credentials.js";
import { nbdTcpPort } from "../support/udmd-tools.js";

const cleanups: (() => void | Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function scratch(prefix?: string): string {
  const dir = tempDir(prefix);
  cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function daemon(args: string[], dir = scratch()): Promise<RunningDaemon> {
  const d = await startDaemon(dir, args);
  cleanups.push(() => d.stop());
  return d;
}

/** udmd started by a shell that first sets RLIMIT_NOFILE (soft and hard) to `nofile`. */
async function daemonWithFileLimit(nofile: number, args: string[]): Promise<RunningDaemon> {
  const dir = scratch();
  const proc = spawn(
    "sh",
    ["-c", `ulimit -n ${nofile} && exec "$0" "$@"`, process.execPath, UDMD, "--run-dir", dir, ...args],
    {
      stdio: ["ignore", "ignore", "pipe"],
    },
  );
  let err = "";
  proc.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  await new Promise<void>((resolve, reject) => {
    proc.stderr.on("data", () => err.includes('"udmd started"') && resolve());
    void exited.then((code) => reject(new Error(`udmd exited with ${code}: ${err}`)));
  });
  const d: RunningDaemon = {
    dir,
    proc,
    stderr: () => err,
    stop: async (signal = "SIGTERM") => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
  cleanups.push(() => d.stop());
  return d;
}

/** The daemon's JSON log lines with message `msg`. */
function logged(d: RunningDaemon, msg: string): Record<string, unknown>[] {
  return d
    .stderr()
    .split("\n")
    .filter((line) => line.includes(`"msg":"${msg}"`))
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

interface Probe {
  socket: net.Socket;
  /** Resolves true when the NBD greeting arrived, false when the server closed first. */
  greeted: Promise<boolean>;
  closed: Promise<void>;
}

/** Connect to `port` (or a unix socket path) from `localAddress`; see whether the server greets or hangs up. */
function probe(target: number | string, localAddress = "127.0.0.1"): Probe {
  const socket =
    typeof target === "number" ? net.connect({ port: target, host: "127.0.0.1", localAddress }) : net.connect(target);
  cleanups.push(() => void socket.destroy());
  let got = 0;
  const closed = new Promise<void>((r) => socket.once("close", () => r()));
  const greeted = new Promise<boolean>((resolve) => {
    socket.on("data", (d: Buffer) => (got += d.length) >= 18 && resolve(true));
    socket.once("close", () => resolve(got >= 18));
  });
  socket.on("error", () => undefined);
  return { socket, greeted, closed };
}

async function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>(
    (_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no result in ${ms} ms`)), ms)),
  );
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

describe("--nbd-listen off loopback", () => {
  it("is refused without --tls=require, naming the address and the flag", async () => {
    const psk = writePskFiles(scratch(), "admin").file;
    for (const args of [
      ["--nbd-listen", "0.0.0.0:0"],
      ["--nbd-listen", "[::]:0"],
      ["--nbd-listen", "0.0.0.0:0", "--tls=on", "--tls-psk", psk],
    ]) {
      const failed = await startDaemon(scratch(), args).then(
        (d) => (cleanups.push(() => d.stop()), null),
        (err: Error) => err.message,
      );
      expect(failed).toMatch(/udmd exited with 1/);
      expect(failed).toContain(`--nbd-listen ${args[1]}: `);
      expect(failed).toMatch(/is not a loopback address; serving NBD there needs --tls=require/);
    }
    const secured = await daemon(["--nbd-listen", "0.0.0.0:0", "--tls=require", "--tls-psk", psk]);
    expect(logged(secured, "nbd server listening").some((r) => r.host === "0.0.0.0" && r.tls === "require")).toBe(true);
    const local = await daemon(["--nbd-listen", "localhost:0"]);
    expect(logged(local, "udmd started")[0]!.tls).toBe("off");
  });

  it("checks the TLS flags before starting", async () => {
    const cases: [string[], RegExp][] = [
      [["--tls=require"], /--tls=require needs --tls-certificates DIR or --tls-psk FILE/],
      [["--tls-psk", "/nonexistent"], /--tls-psk needs --tls=on or --tls=require/],
      [["--tls=maybe"], /--tls: expected off, on or require, got 'maybe'/],
      [["--tls=on", "--tls-psk", "/nonexistent/keys"], /cannot start: TLS PSK file \/nonexistent\/keys: ENOENT/],
      [["--nbd-handshake-timeout", "soon"], /--nbd-handshake-timeout: expected seconds/],
      [["--nbd-max-connections", "0"], /--nbd-max-connections: expected a whole number from 1/],
    ];
    for (const [args, message] of cases) {
      await expect(startDaemon(scratch(), args)).rejects.toThrow(message);
    }
  });
});

describe("handshake timeout", () => {
  it("closes a connection that has not finished its handshake, plain or stalled in TLS, and logs it", async () => {
    const psk = writePskFiles(scratch(), "admin").file;
    const d = await daemon([
      "--nbd-listen",
      "127.0.0.1:0",
      "--nbd-handshake-timeout",
      "0.5",
      "--tls=on",
      "--tls-psk",
      psk,
    ]);
    const port = nbdTcpPort(d);
    const idle = probe(port);
    expect(await idle.greeted).toBe(true);
    const started = Date.now();
    // After STARTTLS is acknowledged the client sends no ClientHello: the TLS handshake stalls.
    const stalled = probe(port);
    expect(await stalled.greeted).toBe(true);
    stalled.socket.write(
      Buffer.concat([Buffer.from([0, 0, 0, 3]), Buffer.from("IHAVEOPT"), Buffer.from([0, 0, 0, 5, 0, 0, 0, 0])]),
    );
    await within(5000, "the idle connection to close", idle.closed);
    await within(5000, "the stalled TLS connection to close", stalled.closed);
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
    const lines = logged(d, "nbd handshake timed out, closing connection");
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatchObject({ remote: "127.0.0.1", timeoutSeconds: 0.5 });
    // A client that finishes in time is unaffected.
    const unix = probe(`${d.dir}/nbd.sock`);
    expect(await unix.greeted).toBe(true);
  });
});

describe("connection limits", () => {
  it("refuses connections over the per-client and total limits at once and logs it; control answers", async () => {
    const d = await daemon([
      "--nbd-listen",
      "127.0.0.1:0",
      "--nbd-max-client-connections",
      "2",
      "--nbd-max-connections",
      "3",
      "--nbd-handshake-timeout",
      "60",
    ]);
    expect(logged(d, "udmd started")[0]).toMatchObject({ nbdMaxConnections: 3, nbdMaxClientConnections: 2 });
    const port = nbdTcpPort(d);
    const a = [probe(port), probe(port)];
    for (const p of a) expect(await p.greeted).toBe(true);
    const a3 = probe(port);
    expect(await a3.greeted).toBe(false);
    const b = probe(port, "127.0.0.2");
    expect(await b.greeted).toBe(true);
    const c = probe(port, "127.0.0.3");
    expect(await c.greeted).toBe(false);
    const unix = probe(`${d.dir}/nbd.sock`);
    expect(await unix.greeted).toBe(false);
    const refusals = logged(d, "nbd connection refused: limit reached");
    expect(refusals).toContainEqual(expect.objectContaining({ limit: "per-client", max: 2, client: "127.0.0.1" }));
    expect(refusals).toContainEqual(expect.objectContaining({ limit: "total", max: 3, client: "127.0.0.3" }));
    expect(await udmsetup(d.dir, ["ls"])).toEqual({ code: 0, stdout: "No devices found\n", stderr: "" });
    // A closed connection makes room again.
    a[0]!.socket.destroy();
    await a[0]!.closed;
    await expect.poll(async () => probe(port).greeted, { timeout: 5000 }).toBe(true);
  });

  it("keeps descriptors free: udmsetup ls works while NBD clients hammer a low RLIMIT_NOFILE", async () => {
    // 256 descriptors: at most 64 NBD connections (half stays free, two per connection), even
    // when more are asked for.
    const d = await daemonWithFileLimit(256, [
      "--nbd-listen",
      "127.0.0.1:0",
      "--nbd-max-connections",
      "5000",
      "--nbd-max-client-connections",
      "5000",
      "--nbd-handshake-timeout",
      "60",
    ]);
    expect(logged(d, "udmd started")[0]).toMatchObject({ nbdMaxConnections: 64 });
    expect(logged(d, "nbd: connection limit lowered to keep descriptors for the rest of the process")[0]).toMatchObject(
      {
        asked: 5000,
        limit: 64,
        nofile: 256,
      },
    );
    const port = nbdTcpPort(d);
    const held: Probe[] = [];
    let hammering = true;
    const hammer = (async () => {
      for (let round = 0; hammering && round < 20; round++) {
        const wave = Array.from({ length: 50 }, (_, i) => probe(port, `127.0.${round + 1}.${i + 1}`));
        held.push(...wave);
        await Promise.all(wave.map((p) => p.greeted));
      }
    })();
    const answers: { code: number; stdout: string }[] = [];
    for (let i = 0; i < 5; i++) {
      const r = await within(10_000, "udmsetup ls under the flood", udmsetup(d.dir, ["ls"]));
      answers.push({ code: r.code, stdout: r.stdout });
    }
    hammering = false;
    await hammer;
    expect(answers).toEqual(Array(5).fill({ code: 0, stdout: "No devices found\n" }));
    const greeted = (await Promise.all(held.map((p) => p.greeted))).filter(Boolean).length;
    expect(held.length).toBeGreaterThan(64);
    expect(greeted).toBe(64);
    expect(logged(d, "nbd connection refused: limit reached")[0]).toMatchObject({ limit: "total", max: 64 });
    expect(await udmsetup(d.dir, ["ls"])).toMatchObject({ code: 0, stdout: "No devices found\n" });
  });
});
