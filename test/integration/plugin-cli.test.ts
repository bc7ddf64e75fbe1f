/**
 * Plugins from the command line and from udmd's config file: `udmsetup plugin load|list` (paths
 * relative to udmsetup's working directory), and paths in a --config file relative to the file's
 * folder, whatever directory udmd starts in.
 */
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { type RunningDaemon, UDMSETUP, startDaemon, tempDir, udmsetup, useDaemon } from "../support/daemon.js";
import { writePskFiles } from "../support/tls-credentials.js";

const root = path.resolve(__dirname, "../..");
const fixture = (name: string) => path.resolve(__dirname, "../fixtures/plugins", name);

describe("udmsetup plugin", () => {
  const env = useDaemon("udm-plugin-cli-", { args: ["--plugin", fixture("io-stats.mjs")] });
  const run = (...args: string[]) => udmsetup(env.dir, args);
  /** udmsetup run from `cwd`. */
  const runIn = (cwd: string, ...args: string[]) =>
    new Promise<{ code: number; stdout: string; stderr: string }>((resolve) =>
      execFile(
        process.execPath,
        [UDMSETUP, "--run-dir", env.dir, "--no-autostart", ...args],
        { cwd },
        (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      ),
    );

  it("loads a plugin by a path relative to where udmsetup runs, and lists every plugin with its targets", async () => {
    const dir = path.join(env.files, "plugins");
    fs.mkdirSync(dir);
    fs.mkdirSync(path.join(env.files, "node_modules"));
    fs.symlinkSync(root, path.join(env.files, "node_modules/udm")); // what the plugin imports
    const source = fs.readFileSync(fixture("io-stats.mjs"), "utf8").replaceAll('"io-stats-js"', '"io-stats-two"');
    fs.writeFileSync(path.join(dir, "two.mjs"), source);
    const two = path.join(dir, "two.mjs");
    expect(await runIn(env.files, "plugin", "load", "./plugins/two.mjs")).toEqual({
      code: 0,
      stdout: `${two}: io-stats-two\n`,
      stderr: "",
    });
    expect((await run("targets")).stdout.split("\n")[0]).toBe("io-stats-two     v0.1.0");
    expect((await run("plugin", "list")).stdout).toBe(
      `${fixture("io-stats.mjs")}: io-stats-js\n${two}: io-stats-two\n`,
    );
    expect(JSON.parse((await run("--json", "plugin", "list")).stdout)).toEqual([
      { module: fixture("io-stats.mjs"), file: fixture("io-stats.mjs"), targets: ["io-stats-js"] },
      { module: "./plugins/two.mjs", file: two, targets: ["io-stats-two"] },
    ]);
  });

  it("reports a plugin that cannot be loaded, and a wrong use, and changes nothing", async () => {
    const missing = await runIn(env.files, "plugin", "load", "./nope.mjs");
    expect(missing.code).toBe(1);
    expect(missing.stderr).toBe(
      `plugin ./nope.mjs: cannot load: ${env.files}/nope.mjs: no such file\nCommand failed.\n`,
    );
    const twice = await run("plugin", "load", fixture("io-stats.mjs"));
    expect(twice.stderr).toMatch(/'io-stats-js' target already registered\nCommand failed\.\n$/);
    const usage = await run("plugin", "unload", "x");
    expect(usage.code).toBe(1);
    expect(usage.stderr).toContain("Usage: udmsetup plugin load MODULE | plugin list");
    expect((await run("plugin", "list")).stdout).toBe(`${fixture("io-stats.mjs")}: io-stats-js\n`);
  });
});

describe("udmd --config", () => {
  let daemon: RunningDaemon | undefined;
  let dirs: string[] = [];
  afterEach(async () => {
    await daemon?.stop();
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
    daemon = undefined;
    dirs = [];
  });

  it("resolves plugin and credential paths against the config file's folder, not the working directory", async () => {
    const base = tempDir("udm-config-");
    const elsewhere = tempDir("udm-cwd-");
    const runDir = tempDir();
    dirs = [base, elsewhere, runDir];
    fs.mkdirSync(path.join(base, "etc"));
    fs.mkdirSync(path.join(base, "plugins"));
    fs.copyFileSync(fixture("io-stats.mjs"), path.join(base, "plugins/io-stats.mjs"));
    fs.mkdirSync(path.join(base, "node_modules"));
    fs.symlinkSync(root, path.join(base, "node_modules/udm")); // what the plugin imports
    writePskFiles(path.join(base, "etc"), "udm");
    const config = path.join(base, "etc/udmd.json");
    const settings = { plugins: ["../plugins/io-stats.mjs"], tls: "on", tlsPsk: "psk.keys" };
    fs.writeFileSync(config, JSON.stringify(settings));
    daemon = await startDaemon(runDir, ["--config", config], { cwd: elsewhere });
    expect((await udmsetup(runDir, ["targets"])).stdout.split("\n")[0]).toBe("io-stats-js      v0.1.0");
  });

  it("names the config file and the problem when it is not what udmd expects", async () => {
    const base = tempDir("udm-config-");
    dirs = [base];
    const config = path.join(base, "udmd.json");
    fs.writeFileSync(config, JSON.stringify({ plugins: "io-stats.mjs" }));
    await expect(startDaemon(tempDir(), ["--config", config])).rejects.toThrow(
      `udmd: config ${config}: "plugins": expected an array of module names or paths`,
    );
  });
});
