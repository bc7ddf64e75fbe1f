/**
 * The CLI as a new user meets it (issue 18 items 8-12), through the real binaries: `udmsetup
 * daemon stop` and udmd's options passed through `udmsetup daemon`; nothing started for what fails
 * or needs no daemon; `-o help` as dmsetup prints it; per-command help and the environment in
 * `--help`; JSON errors with `--json`; udmd's log format; the demo's banner; and npm's first run
 * (no EBADENGINE warning, package-lock.json left as it is, tsc only when a source changed, npx's
 * first call).
 */
import { type ChildProcess, execFile, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { tryLockExclusive } from "../../core/sys/file.js";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { type CliResult, startDaemon, tempDir, UDMD, UDMSETUP, udmsetup, useDaemon } from "../support/daemon.js";
import { missingTools } from "../support/requirements.js";
import { which } from "../support/tools.js";

const root = path.resolve(__dirname, "../..");
const fixture = (name: string) => path.resolve(__dirname, "../fixtures/plugins", name);

const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** A run directory of the test's own, removed afterwards (after any udmd in it is stopped). */
function runDir(): string {
  const dir = tempDir("udm-first-run-");
  cleanups.push(() => {
    stopQuietly(dir);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

/** SIGTERM to a udmd a failed test left in `dir` (only a udmd: a test writes its own pid there). */
function stopQuietly(dir: string): void {
  try {
    const pid = Number(fs.readFileSync(runPaths(dir).pid, "utf8"));
    if (fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("udmd")) process.kill(pid, "SIGTERM");
  } catch {
    // none left
  }
}

/** udmsetup as users run it: autostart on, `dir` as the run directory. */
function run(dir: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [UDMSETUP, "--run-dir", dir, ...args],
      { env: { ...process.env, LANG: "C", ...env } },
      (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

/** The process runs and has not exited (a zombie, not yet reaped by its parent, has exited). */
function alive(pid: number): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/stat`, "utf8").replace(/^.*\) /s, "")[0] !== "Z";
  } catch {
    return false;
  }
}

async function until(what: string, check: () => boolean | Promise<boolean>, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function exited(proc: ChildProcess): Promise<number | null> {
  return proc.exitCode !== null
    ? Promise.resolve(proc.exitCode)
    : new Promise((r) => proc.once("exit", (code) => r(code)));
}

const pidOf = (dir: string) => Number(fs.readFileSync(runPaths(dir).pid, "utf8"));

describe("udmsetup daemon stop", () => {
  it("stops the run directory's udmd as SIGTERM does and returns once it has exited", async () => {
    const dir = runDir();
    expect(await run(dir, ["daemon"])).toEqual({ code: 0, stdout: "", stderr: "" });
    const pid = pidOf(dir);
    expect((await udmsetup(dir, ["create", "vol", "--table", "0 8 zero"])).code).toBe(0);

    expect(await udmsetup(dir, ["daemon", "stop"])).toEqual({ code: 0, stdout: "", stderr: "" });
    expect(alive(pid)).toBe(false);
    // A clean stop: devices removed, sockets, pid, lock and device record gone; the log stays.
    expect(fs.readdirSync(dir)).toEqual(["udmd.log"]);
    const log = fs.readFileSync(runPaths(dir).log, "utf8");
    expect(log).toMatch(/"msg":"device removed","component":"udmd","device":"vol"/);
    expect(log).toContain('"msg":"udmd stopped"');

    expect(await udmsetup(dir, ["daemon", "stop"])).toEqual({
      code: 1,
      stdout: "",
      stderr: `no udmd is running on ${dir}\nCommand failed.\n`,
    });
    expect(await udmsetup(dir, ["--json", "daemon", "stop"])).toEqual({
      code: 1,
      stdout: "",
      stderr: `${JSON.stringify({ error: `no udmd is running on ${dir}`, errno: "ESRCH" })}\n`,
    });
  });

  it("stops a udmd it did not start, which exits 0; `daemon` on a running one says so", async () => {
    const dir = runDir();
    const daemon = await startDaemon(dir);
    expect((await run(dir, ["daemon"])).stderr).toBe(
      `udmd is already running on ${dir} (pid ${daemon.proc.pid})\nCommand failed.\n`,
    );
    expect((await udmsetup(dir, ["daemon", "stop", "--run-dir", dir])).code).toBe(0);
    expect(alive(daemon.proc.pid!)).toBe(false);
    expect(await exited(daemon.proc)).toBe(0);
  });

  it("signals no process that holds the lock without being a udmd", async () => {
    const dir = runDir();
    const paths = runPaths(dir);
    const fd = fs.openSync(paths.lock, "w", 0o600);
    cleanups.push(() => fs.closeSync(fd));
    expect(tryLockExclusive(fd)).toBe(true);
    fs.writeFileSync(paths.pid, `${process.pid}\n`); // this test runner: it must not get SIGTERM
    expect(await udmsetup(dir, ["daemon", "stop"])).toEqual({
      code: 1,
      stdout: "",
      stderr: `no udmd is running on ${dir}\nCommand failed.\n`,
    });
  });
});

describe("udmsetup daemon passes udmd's options through", () => {
  it("--foreground --plugin FILE --log-format text: udmd here, with the plugin, text logs, until stopped", async () => {
    const dir = runDir();
    const plugin = fixture("io-stats.mjs");
    const fg = spawn(
      process.execPath,
      [UDMSETUP, "--run-dir", dir, "daemon", "--foreground", "--plugin", plugin, "--log-format", "text"],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    let stderr = "";
    fg.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    cleanups.push(() => fg.kill("SIGKILL"));
    await until("udmd to answer", async () => (await udmsetup(dir, ["plugin", "list"])).code === 0);
    expect((await udmsetup(dir, ["plugin", "list"])).stdout).toBe(`${plugin}: io-stats-js\n`);
    expect((await udmsetup(dir, ["daemon", "stop"])).code).toBe(0);
    expect(await exited(fg)).toBe(0);
    expect(stderr).toMatch(
      /^\d\d:\d\d:\d\d\.\d{3} info {2}plugin loaded plugin=\/\S+io-stats\.mjs targets=\["io-stats-js"\]$/m,
    );
    expect(stderr).toMatch(/^\d\d:\d\d:\d\d\.\d{3} info {2}udmd stopped$/m);
    expect(stderr).not.toContain("{");
  });

  it("in the background: udmd's options reach it, and a bad one is refused before anything starts", async () => {
    const dir = runDir();
    expect(await run(dir, ["daemon", "--plugin", fixture("io-stats.mjs"), "--log-level", "warn"])).toEqual({
      code: 0,
      stdout: "",
      stderr: "",
    });
    expect((await udmsetup(dir, ["targets"])).stdout.split("\n")[0]).toBe("io-stats-js      v0.1.0");
    expect(fs.readFileSync(runPaths(dir).log, "utf8")).not.toContain('"level":"info"');
    expect((await udmsetup(dir, ["daemon", "stop"])).code).toBe(0);

    const fresh = runDir();
    const typo = await run(fresh, ["daemon", "--plugins", "x.js"]);
    expect(typo.code).toBe(1);
    expect(typo.stderr).toMatch(/^udmd: Unknown option '--plugins'.*\nCommand failed\.\n$/s);
    expect(fs.readdirSync(fresh)).toEqual([]);
    // A value only udmd can judge: udmd says why it stopped.
    const bad = await run(fresh, ["daemon", "--log-format", "xml"]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toBe(
      "udmd exited with status 2 before it answered: udmd: --log-format: expected text or json\nCommand failed.\n",
    );
  });

  it("daemon --help lists udmd's options and starts nothing", async () => {
    const dir = runDir();
    const r = await run(dir, ["daemon", "--help"]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Usage: udmsetup daemon \[--foreground\] \[UDMD_OPTION\.\.\.\]\n/);
    expect(r.stdout).toContain("  --plugin MODULE ");
    expect(r.stdout).toContain("  --log-format text|json ");
    expect(fs.readdirSync(dir)).toEqual([]);
  });
});

describe("nothing is started for a command that fails or needs no daemon", () => {
  it.each([
    [["bogus"], 1],
    [["--bogus", "ls"], 1],
    [["ls", "-Z"], 1],
    [["ls", "--table"], 1],
    [["ls", "extra"], 1],
    [["version", "extra"], 1],
    [["remove_all", "x"], 1],
    [["plugin"], 1],
    [["plugin", "bogus"], 1],
    [["plugin", "load"], 1],
    [["daemon", "bogus"], 1],
    [["daemon", "stop", "now"], 1],
    [["help"], 0],
    [["help", "info"], 0],
    [["help", "bogus"], 1],
    [["info", "--help"], 0],
    [["--help"], 0],
    [["info", "-c", "-o", "help"], 0],
    [["info", "-c", "-O", "help"], 0],
    [["info", "-c", "-o", "name,nosuch"], 1],
    [["--json", "bogus"], 1],
  ])("%j exits %i", async (args, code) => {
    const dir = runDir();
    fs.rmdirSync(dir); // a daemon would create it
    expect((await run(dir, args)).code).toBe(code);
    expect(fs.existsSync(dir)).toBe(false);
  });
});

const dmsetupMissing = missingTools("dmsetup comparison", ["dmsetup"]);

function dmsetup(args: string[]): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile("dmsetup", args, { env: { ...process.env, LANG: "C" }, cwd: "/" }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

/** dmsetup's output less what udm does not have: the dm-stats field sections and the driver's complaints. */
function withoutStatsAndDriver(text: string): string {
  const cut = text.indexOf("/dev/mapper/control: open failed");
  return (cut < 0 ? text : text.slice(0, cut)).replace(
    /Mapped Device Statistics (Region Information )?Fields\n-+\n( {2}.*\n)* \n/g,
    "",
  );
}

describe.skipIf(dmsetupMissing.length > 0)("as dmsetup prints it", () => {
  it.each([
    [["info", "-c", "-o", "help"]],
    [["info", "-c", "-o", "name,?"]],
    [["info", "-c", "-O", "help"]],
    [["info", "-c", "-o", "HELP", "-O", "-name"]],
  ])("%j lists the fields on stderr (the driver-less part), and nothing else", async (args) => {
    const dir = runDir();
    const [ours, theirs] = await Promise.all([run(dir, args), dmsetup(args)]);
    expect(theirs.stderr).toContain("Mapped Device Name Fields\n");
    expect(ours).toEqual({ code: 0, stdout: "", stderr: withoutStatsAndDriver(theirs.stderr) });
  });

  it.each([
    [["splitname", "-o", "help", "vg-lv"]],
    [["splitname", "-o", "vg_name,help", "-O", "lv_name", "vg-lv"]],
    [["info", "-c", "-o", "nosuch"]],
    [["info", "-c", "-o", "help,nosuch"]],
    [["info", "-c", "-o", "+nosuch"]],
    [["info", "-c", "-O", "-nosuch"]],
    [["splitname", "-o", "nosuch", "vg-lv"]],
  ])("%j: the same stdout, stderr and status", async (args) => {
    const dir = runDir();
    const [ours, theirs] = await Promise.all([run(dir, args), dmsetup(args)]);
    expect(ours).toEqual({ ...theirs, stderr: withoutStatsAndDriver(theirs.stderr) });
  });

  it.each([
    [["--bogus", "ls"]],
    [["ls", "-Z"]],
    [["ls", "-vZ"]],
    [["ls", "--table"]],
    [["info", "-o"]],
    [["--noheadings=x", "ls"]],
  ])("%j: getopt's words (udmsetup for dmsetup), Couldn't process command line., exit 1", async (args) => {
    const dir = runDir();
    const [ours, theirs] = await Promise.all([run(dir, args), dmsetup(args)]);
    expect(ours).toEqual({ ...theirs, stderr: theirs.stderr.replace(/^dmsetup:/, "udmsetup:") });
    expect(ours.code).toBe(1);
  });

  it.each([
    [["ls", "extra"]],
    [["remove_all", "a"]],
    [["rename"]],
    [["message", "a"]],
    [["splitname"]],
    [["help", "a", "b"]],
  ])("%j: Incorrect number of arguments., exit 1", async (args) => {
    const dir = runDir();
    const [ours, theirs] = await Promise.all([run(dir, args), dmsetup(args)]);
    const first = (r: CliResult) => ({ code: r.code, stdout: r.stdout, line: r.stderr.split("\n")[0] });
    expect(first(ours)).toEqual(first(theirs));
    expect(first(ours).line).toBe("Incorrect number of arguments.");
  });
});

describe("help", () => {
  it("--help names the environment, the --json commands and gives examples", async () => {
    const r = await run(runDir(), ["--help"]);
    expect(r.code).toBe(0);
    for (const name of [
      "UDM_RUN_DIR",
      "UDM_DEV_DIR",
      "UDM_AUTO_ATTACH",
      "UDM_NO_AUTOSTART",
      "DM_DEFAULT_NAME_MANGLING_MODE",
    ])
      expect(r.stdout).toMatch(new RegExp(`^  ${name}\\b`, "m"));
    expect(r.stdout).toContain("\nEnvironment:\n");
    expect(r.stdout).toContain("\nExamples:\n  udmsetup create vol --table ");
    expect(r.stdout).toContain(
      "--json: ls, info, table, status, targets, deps and plugin print JSON; with --json, every",
    );
    expect(r.stdout).toContain("  daemon stop ");
  });

  it("help CMD and CMD --help print the command's own help; help NOSUCH fails", async () => {
    const dir = runDir();
    const help = await run(dir, ["help", "info"]);
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/^Usage: udmsetup info \[-S SELECTION\] \[NAME\.\.\.\]\n {7}udmsetup info -c /);
    expect(help.stdout).toContain("-o help lists them");
    expect(await run(dir, ["info", "--help"])).toEqual(help);
    expect(await run(dir, ["-h", "info"])).toEqual(help);
    expect(await run(dir, ["help", "nosuch"])).toEqual({ code: 1, stdout: "", stderr: "Unknown command: nosuch.\n" });
  });
});

describe("against a udmd", () => {
  const env = useDaemon("udm-json-errors-", { per: "file" });

  it("--json: a failure is one JSON line on stderr with the text's message and the errno; the same status", async () => {
    const missing = path.join(env.files, "nosuch.img");
    const cases: [string[], string, string][] = [
      [["info", "nosuch"], "Device does not exist.", "ENXIO"],
      [
        ["create", "x", "--table", `0 8 linear ${missing} 0`],
        `linear: Device lookup failed: ${missing}: no such file or block device\n` +
          "device-mapper: reload ioctl on x  failed: No such file or directory",
        "ENOENT",
      ],
      [
        ["message", "nosuch", "0", "hi"],
        "nosuch: no such device\ndevice-mapper: message ioctl on nosuch  failed: No such device or address",
        "ENXIO",
      ],
      [["ls", "-Z"], "udmsetup: invalid option -- 'Z'", "EINVAL"],
    ];
    for (const [args, error, errno] of cases) {
      const text = await udmsetup(env.dir, args);
      const json = await udmsetup(env.dir, ["--json", ...args]);
      expect(text.stderr, args.join(" ")).toContain(`${error}\n`);
      expect(json, args.join(" ")).toEqual({
        code: text.code,
        stdout: "",
        stderr: `${JSON.stringify({ error, errno })}\n`,
      });
      expect(json.code).toBe(1);
    }
    // Success: JSON on stdout, nothing on stderr.
    expect(await udmsetup(env.dir, ["--json", "ls"])).toEqual({ code: 0, stdout: "[]\n", stderr: "" });
  });

  it("info -c -o SECTION_all is that section's fields", async () => {
    expect((await udmsetup(env.dir, ["create", "v", "--table", "0 8 zero"])).code).toBe(0);
    const all = await udmsetup(env.dir, ["info", "-c", "-o", "info_all", "v"]);
    const listed = await udmsetup(env.dir, [
      "info",
      "-c",
      "-o",
      "blkdevname,attr,tables_loaded,suspended,readonly,devno,major,minor,open,segments,events",
      "v",
    ]);
    expect(all.code).toBe(0);
    expect(all).toEqual(listed);
    expect((await udmsetup(env.dir, ["remove", "v"])).code).toBe(0);
  });
});

describe("udmd's log lines", () => {
  it("are JSON when stderr is not a terminal, text with --log-format text", async () => {
    const dir = runDir();
    const json = await startDaemon(dir);
    await json.stop();
    for (const line of json.stderr().trim().split("\n")) expect(() => JSON.parse(line) as unknown, line).not.toThrow();

    const text = spawn(process.execPath, [UDMD, "--run-dir", dir, "--log-format", "text"], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    cleanups.push(() => text.kill("SIGKILL"));
    let err = "";
    text.stderr!.on("data", (d: Buffer) => (err += d.toString()));
    await until("udmd started", () => err.includes(" udmd started "));
    expect((await udmsetup(dir, ["daemon", "stop"])).code).toBe(0);
    expect(await exited(text)).toBe(0);
    const lines = err.trim().split("\n");
    expect(lines.length).toBeGreaterThan(3);
    for (const line of lines) expect(line).toMatch(/^\d\d:\d\d:\d\d\.\d{3} (debug|info |warn |error) \S/);
    expect(err).toMatch(/ info {2}udmd started runDir=\S+ pid=\d+ nbd=\S+ tls=off /);
  });

  const noScript = which("script") ? null : "script (util-linux) not installed";
  it.skipIf(noScript !== null)("are text by default on a terminal", async () => {
    const dir = runDir();
    const tty = spawn("script", ["-qec", `"${process.execPath}" "${UDMD}" --run-dir "${dir}"`, "/dev/null"], {
      stdio: ["pipe", "pipe", "pipe"],
    });
    let out = "";
    tty.stdout!.on("data", (d: Buffer) => (out += d.toString()));
    cleanups.push(() => tty.kill("SIGKILL"));
    await until("udmd started", () => out.includes("udmd started"));
    expect((await udmsetup(dir, ["daemon", "stop"])).code).toBe(0);
    await exited(tty);
    expect(out).toMatch(/^\d\d:\d\d:\d\d\.\d{3} info {2}udmd started runDir=\S+ pid=\d+ /m);
    expect(out).not.toContain('{"time"');
  });
});

describe("npm start's demo", () => {
  it("says where its files are, that they stay, and how to stop; its logs stay off stdout", async () => {
    const dir = runDir();
    const state = tempDir("udm-demo-state-");
    cleanups.push(() => fs.rmSync(state, { recursive: true, force: true }));
    const start = () => {
      const proc = spawn(process.execPath, [UDMD, "--run-dir", dir, "--demo", "--state-dir", state], {
        stdio: ["ignore", "pipe", "pipe"],
      });
      cleanups.push(() => proc.kill("SIGKILL"));
      const out = { stdout: "", stderr: "" };
      proc.stdout!.on("data", (d: Buffer) => (out.stdout += d.toString()));
      proc.stderr!.on("data", (d: Buffer) => (out.stderr += d.toString()));
      return { proc, out };
    };
    const demo = start();
    await until("the banner", () => demo.out.stdout.includes("The devices go away"));
    const banner = demo.out.stdout;
    expect(banner).toContain(`udm demo: udmd is running on ${dir} (pid ${demo.proc.pid}).\n`);
    expect(banner).toContain(`\nTheir files, in ${state}:\n`);
    expect(banner).toMatch(/\n {2}origin\.img {2}1 GiB {4}demo-origin's data \(\d+ KiB on disk now\)\n/);
    expect(banner).toMatch(/\n {2}cow\.img {5}256 MiB {2}demo-snap's copy-on-write store \(\d+ KiB on disk now\)\n/);
    expect(banner).toContain("They stay after the demo, and the next npm start\nuses them again");
    expect(banner).toContain(
      `To stop: Ctrl-C here, or in another shell:\n  UDM_RUN_DIR=${dir} npx udmsetup daemon stop\n`,
    );
    expect(banner).not.toContain('"level"'); // log lines go to stderr

    // A second npm start says how to stop the first.
    const second = start();
    expect(await exited(second.proc)).toBe(1);
    expect(second.out.stderr).toBe(
      `udmd: udmd is already running on ${dir} (pid ${demo.proc.pid})\n` +
        `udmd: stop it with: UDM_RUN_DIR=${dir} npx udmsetup daemon stop\n`,
    );

    expect((await udmsetup(dir, ["daemon", "stop"])).code).toBe(0);
    expect(await exited(demo.proc)).toBe(0);
    expect(fs.statSync(path.join(state, "origin.img")).size).toBe(1024 ** 3);
    expect(fs.statSync(path.join(state, "cow.img")).size).toBe(256 * 1024 ** 2);
  });
});

/** The machine's PATH without node_modules/.bin: npm and Node as a new user has them. */
const machinePath = (process.env.PATH ?? "")
  .split(":")
  .filter((d) => !d.includes("node_modules"))
  .join(":");
const npm = spawnSync("sh", ["-c", "command -v npm"], { env: { ...process.env, PATH: machinePath } }).status === 0;

describe.skipIf(!npm)("npm's first run", () => {
  it("npm install warns about no engine and leaves package-lock.json as it is", () => {
    const dir = tempDir("udm-lock-");
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    for (const f of ["package.json", "package-lock.json"]) fs.copyFileSync(path.join(root, f), path.join(dir, f));
    const r = spawnSync("npm", ["install", "--package-lock-only", "--ignore-scripts", "--offline", "--no-audit"], {
      cwd: dir,
      encoding: "utf8",
      env: { ...process.env, PATH: machinePath },
    });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).not.toContain("EBADENGINE");
    expect(fs.readFileSync(path.join(dir, "package-lock.json"), "utf8")).toBe(
      fs.readFileSync(path.join(root, "package-lock.json"), "utf8"),
    );
  });

  it("npm start, npm test, npm run build and prepare build through scripts/build.mjs, not tsc itself", () => {
    const scripts = (
      JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8")) as { scripts: Record<string, string> }
    ).scripts;
    for (const name of ["start", "test", "build", "prepare"]) {
      expect(scripts[name], name).toContain("node scripts/build.mjs");
      expect(scripts[name], name).not.toMatch(/\btsc\b/);
    }
  });

  it("scripts/build.mjs runs tsc only when a source, the config or the outputs changed", () => {
    const dir = tempDir("udm-build-");
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    fs.mkdirSync(path.join(dir, "src"));
    fs.writeFileSync(
      path.join(dir, "tsconfig.build.json"),
      JSON.stringify({
        compilerOptions: {
          outDir: "dist",
          rootDir: ".",
          module: "NodeNext",
          target: "ES2023",
          strict: true,
          types: [],
        },
        include: ["src"],
      }),
    );
    fs.writeFileSync(path.join(dir, "src", "a.ts"), "export const a: number = 1;\n");
    const build = () => {
      const r = spawnSync(process.execPath, [path.join(root, "scripts/build.mjs")], { cwd: dir, encoding: "utf8" });
      return { status: r.status, tsc: r.stdout.includes("build: tsc -p tsconfig.build.json"), out: r.stdout };
    };
    const a = path.join(dir, "dist/src/a.js");
    expect(build()).toMatchObject({ status: 0, tsc: true });
    const built = fs.statSync(a).mtimeMs;
    expect(build()).toEqual({
      status: 0,
      tsc: false,
      out: "build: dist/ is up to date (npm run build -- --force rebuilds)\n",
    });
    expect(fs.statSync(a).mtimeMs).toBe(built);

    const later = new Date(Date.now() + 2000);
    fs.utimesSync(path.join(dir, "src", "a.ts"), later, later); // edited
    fs.writeFileSync(path.join(dir, "src", "b.ts"), "export const b = 2;\n"); // and one added
    expect(build()).toMatchObject({ status: 0, tsc: true });
    expect(fs.existsSync(path.join(dir, "dist/src/b.js"))).toBe(true);
    fs.rmSync(path.join(dir, "dist/src/b.js")); // an output gone
    expect(build()).toMatchObject({ status: 0, tsc: true });

    fs.writeFileSync(path.join(dir, "src", "b.ts"), "export const b: string = 2;\n"); // a type error
    expect(build()).toMatchObject({ status: 2, tsc: true });
    // A failed build is never up to date.
    expect(fs.existsSync(path.join(dir, "node_modules/.cache/udm-build.json"))).toBe(false);
  }, 180_000);

  it("npx udmsetup's first call (a fresh npx cache) prints no warning and builds nothing", { timeout: 120_000 }, () => {
    // npx installs the checkout into its cache on the first call, which runs `prepare`: with dist/
    // up to date, that must not run tsc (it took 28 s here) nor warn about engines (it did, twice).
    expect(spawnSync(process.execPath, ["scripts/build.mjs"], { cwd: root }).status).toBe(0);
    const record = path.join(root, "node_modules/.cache/udm-build.json");
    const built = fs.statSync(record).mtimeMs;
    const cache = tempDir("udm-npx-cache-");
    cleanups.push(() => fs.rmSync(cache, { recursive: true, force: true }));
    const r = spawnSync("npx", ["udmsetup", "help", "version"], {
      cwd: root,
      encoding: "utf8",
      env: { ...process.env, PATH: machinePath, npm_config_cache: cache, npm_config_update_notifier: "false" },
    });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^Usage: udmsetup version\n/);
    expect(fs.statSync(record).mtimeMs).toBe(built);
  });
});
