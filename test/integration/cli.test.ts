/**
 * udmsetup against a real udmd: dmsetup's output formats byte for byte (docs/cli.md), its
 * error lines, and the daemon's lifecycle (single instance, stale run directory, peer credentials,
 * plugins).
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { beforeEach, describe, expect, it } from "vitest";
import { ControlClient } from "../../dmsetup/control/client.js";
import { WireClient } from "../support/nbd-client.js";
import { udmsetup, UDMD, useDaemon } from "../support/daemon.js";
import { skipOrFail } from "../support/requirements.js";

const env = useDaemon("udm-files-");

beforeEach(() => {
  for (const f of ["a.img", "b.img"]) {
    fs.writeFileSync(path.join(env.files, f), "");
    fs.truncateSync(path.join(env.files, f), 1024 * 1024);
  }
});

const run = (...args: string[]) => udmsetup(env.dir, args);

describe("udmsetup output formats", () => {
  it("create, ls, table, status, info, deps, targets, version", async () => {
    const a = path.join(env.files, "a.img");
    expect(await run("create", "lin", "--table", `0 1024 linear ${a} 0`)).toEqual({ code: 0, stdout: "", stderr: "" });
    expect((await run("create", "z", "-u", "UUID-Z", "--table", "0 16 zero")).code).toBe(0);
    expect((await run("ls")).stdout).toBe("lin\t(253:0)\nz\t(253:1)\n");
    expect((await run("ls", "--target", "zero")).stdout).toBe("z\t(253, 1)\n");
    expect((await run("table", "lin")).stdout).toBe(`0 1024 linear ${a} 0\n`);
    expect((await run("table")).stdout).toBe(`lin: 0 1024 linear ${a} 0\nz: 0 16 zero \n`);
    expect((await run("status", "lin")).stdout).toBe("0 1024 linear \n");
    expect((await run("info", "z")).stdout).toBe(
      [
        "Name:              z",
        "State:             ACTIVE",
        "Read Ahead:        256",
        "Tables present:    LIVE",
        "Open count:        0",
        "Event number:      0",
        "Major, minor:      253, 1",
        "Number of targets: 1",
        "UUID: UUID-Z",
        "",
        "",
      ].join("\n"),
    );
    expect((await run("info", "-c", "--noheadings")).stdout).toBe("lin:253:0:L--w:0:1:0:\nz:253:1:L--w:0:1:0:UUID-Z\n");
    expect((await run("deps", "lin")).stdout).toBe(`1 dependencies\t: (${a})\n`);
    expect((await run("targets")).stdout).toBe(
      "thin             v1.23.0\nthin-pool        v1.23.0\nlog-writes       v1.1.0\ndust             v1.0.0\ndelay            v1.5.0\nflakey           v1.5.0\nsnapshot-merge   v1.5.0\nsnapshot         v1.16.0\nsnapshot-origin  v1.9.0\nlinear           v1.5.0\nstriped          v1.6.0\nzero             v1.2.0\nerror            v1.7.0\n",
    );
    expect((await run("version")).stdout).toMatch(/^Library version: {3}.+\nDriver version: {4}4\.48\.0\n$/);
    expect(JSON.parse((await run("--json", "info", "lin")).stdout)).toMatchObject({
      name: "lin",
      minor: 0,
      livePresent: true,
    });
  });

  it("reads tables from a file and from stdin, skipping comments", async () => {
    const a = path.join(env.files, "a.img");
    const tableFile = path.join(env.files, "t.table");
    fs.writeFileSync(tableFile, `# a comment\n\n0 8 linear ${a} 0 # trailing comment\n8 8 zero\n`);
    expect((await run("create", "f", tableFile)).code).toBe(0);
    expect((await run("table", "f")).stdout).toBe(`0 8 linear ${a} 0\n8 8 zero \n`);
    const viaStdin = await udmsetup(env.dir, ["--no-autostart", "create", "s"], `0 4 zero\n`);
    expect(viaStdin.code).toBe(0);
    expect((await run("table", "s")).stdout).toBe("0 4 zero \n");
  });

  it("a failed create prints the kernel's reason and dmsetup's lines, and leaves nothing behind", async () => {
    const r = await run("create", "bad", "--table", "0 10 linear");
    expect(r).toEqual({
      code: 1,
      stdout: "",
      stderr:
        "linear: Invalid argument count\ndevice-mapper: reload ioctl on bad  failed: Invalid argument\nCommand failed.\n",
    });
    expect((await run("ls")).stdout).toBe("No devices found\n");
    const unknown = await run("create", "u", "--table", "0 10 nosuch");
    expect(unknown.stderr).toContain("nosuch: unknown target type\n");
    const small = await run("create", "s", "--table", `0 4096 linear ${path.join(env.files, "a.img")} 0`);
    expect(small.stderr).toContain(
      `${path.join(env.files, "a.img")} too small for target: start=0, len=4096, dev_size=2048\n`,
    );
    const gap = await run("create", "g", "--table", "0 8 zero\n10 8 zero");
    expect(gap.stderr).toContain("zero: Gap in table\n");
    expect((await run("ls")).stdout).toBe("No devices found\n");
    expect((await run("info", "nosuch")).stderr).toBe("Device does not exist.\nCommand failed.\n");
  });

  it("reload, suspend, resume, message errors, rename and wait", async () => {
    const a = path.join(env.files, "a.img");
    await run("create", "d", "--table", "0 8 zero");
    expect((await run("reload", "d", "--table", `0 16 linear ${a} 0`)).code).toBe(0);
    expect((await run("info", "-c", "--noheadings", "d")).stdout).toBe("d:253:0:LI-w:0:1:0:\n");
    await run("suspend", "d");
    expect((await run("info", "-c", "--noheadings", "-o", "name,attr,suspended", "d")).stdout).toBe(
      "d:LIsw:Suspended\n",
    );
    await run("resume", "d");
    expect((await run("table", "d")).stdout).toBe(`0 16 linear ${a} 0\n`);
    expect((await run("message", "d", "0", "hello")).stderr).toBe(
      "linear: Target type does not support messages\n".replace("linear: ", "") +
        "device-mapper: message ioctl on d  failed: Invalid argument\nCommand failed.\n",
    );
    expect((await run("message", "d", "x", "hello")).stderr).toBe("Invalid sector.\nCommand failed.\n");
    // One connection, so the wait is registered before the rename arrives.
    const client = await ControlClient.connect(path.join(env.dir, "control"));
    const waiting = client.request("wait", { name: "d", eventNr: 0 });
    await client.request("rename", { name: "d", newName: "e" });
    expect(await waiting).toMatchObject({ info: { name: "e", eventNr: 1 } });
    client.close();
    expect((await run("info", "-c", "--noheadings", "-o", "name,events")).stdout).toBe("e:1\n");
    expect(await run("wait", "e", "0")).toEqual({ code: 0, stdout: "", stderr: "" }); // 1 != 0: returns at once
  });

  it("an NBD client of a renamed device still counts: remove refuses until it leaves, --force ends it", async () => {
    await run("create", "d", "--table", "0 64 zero");
    const client = await WireClient.connect(path.join(env.dir, "nbd.sock"), "d");
    expect((await run("rename", "d", "e")).code).toBe(0);
    expect(await run("remove", "e")).toMatchObject({
      code: 1,
      stderr: expect.stringContaining("e: 1 NBD client(s) connected"),
    });
    expect((await client.read(0, 4096)).error).toBe(0); // still served, under its new name
    expect((await run("remove", "--force", "e")).code).toBe(0);
    await client.closedByServer();
    expect((await run("ls")).stdout).toBe("No devices found\n");
  });

  it("table --concise and create --concise round-trip", async () => {
    expect((await run("create", "--concise", "c1,,,rw,0 8 zero;c2,U2,,ro,0 4 error")).code).toBe(0);
    expect((await run("table", "--concise")).stdout).toBe("c1,,0,rw,0 8 zero ;c2,U2,1,ro,0 4 error \n");
  });
});

describe("udmd lifecycle", () => {
  it("refuses a second daemon on the same run directory, takes over after kill -9 and restores its devices", async () => {
    const second = spawn(process.execPath, [UDMD, "--run-dir", env.dir], { stdio: ["ignore", "ignore", "pipe"] });
    let err = "";
    second.stderr!.on("data", (d) => (err += d));
    const code = await new Promise((r) => second.once("exit", r));
    expect(code).toBe(1);
    expect(err).toBe(`udmd: udmd is already running on ${env.dir} (pid ${env.daemon.proc.pid})\n`);

    await run("create", "keep", "--table", "0 8 zero");
    await env.daemon.stop("SIGKILL");
    expect(fs.existsSync(path.join(env.dir, "control"))).toBe(true); // stale socket left behind
    await env.restart();
    expect((await run("ls")).stdout).toBe("keep\t(253:0)\n"); // restored from the run directory
    await env.daemon.stop("SIGKILL");
    await env.restart(["--no-restore"]);
    expect((await run("ls")).stdout).toBe("No devices found\n");
  });

  it("SIGTERM flushes and removes devices and cleans the run directory", async () => {
    await run("create", "x", "--table", "0 8 zero");
    expect(await env.daemon.stop("SIGTERM")).toBe(0);
    expect(fs.readdirSync(env.dir).filter((f) => f !== "udmd.log")).toEqual([]);
    expect(env.daemon.stderr()).toContain('"udmd stopped"');
  });

  const asOtherUserSkip = process.getuid?.() !== 0 ? "needs root to run a client as another user" : null;
  skipOrFail("the peer-credentials test", asOtherUserSkip);

  it.skipIf(asOtherUserSkip !== null)(
    "refuses control clients that are neither root nor the daemon's user",
    async () => {
      fs.chmodSync(env.dir, 0o711);
      fs.chmodSync(path.join(env.dir, "control"), 0o666);
      const r = await udmsetup(env.dir, ["ls"], undefined, {});
      expect(r.code).toBe(0);
      const asNobody = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
        const child = spawn(
          process.execPath,
          [path.resolve(__dirname, "../../dist/dmsetup/bin/udmsetup.js"), "--run-dir", env.dir, "--no-autostart", "ls"],
          {
            uid: 65534,
            gid: 65534,
          },
        );
        let stderr = "";
        child.stderr.on("data", (d) => (stderr += d));
        child.on("exit", (code) => resolve({ code, stderr }));
      });
      expect(asNobody.code).toBe(1);
      expect(asNobody.stderr).toContain("Permission denied: not the daemon's user or root");
    },
  );

  it("loads plugins at start and refuses to start when one fails", async () => {
    await env.daemon.stop();
    const plugin = path.resolve(__dirname, "../fixtures/plugins/io-stats.mjs");
    await env.restart(["--plugin", plugin]);
    expect((await run("targets")).stdout.split("\n")[0]).toBe("io-stats-js      v0.1.0");
    await env.daemon.stop();
    const failing = spawn(process.execPath, [UDMD, "--run-dir", env.dir, "--plugin", "./no/such/plugin.js"], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let err = "";
    failing.stderr!.on("data", (d) => (err += d));
    expect(await new Promise((r) => failing.once("exit", r))).toBe(1);
    expect(err).toMatch(/^udmd: cannot start: plugin \.\/no\/such\/plugin\.js: cannot load: /);
    expect(fs.existsSync(path.join(env.dir, "control"))).toBe(false);
  });
});
