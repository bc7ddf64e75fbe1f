/**
 * examples/plugin-template as a plugin author uses it: udm packed with `npm pack` and installed
 * into a copy of the template (which then carries its own copy of udm), built with tsc, its own
 * tests run against udm/testing, and loaded into a udmd. Then, packed in turn, installed next to
 * udm in an app and loaded by package name: one copy of udm, shared through the peer dependency.
 *
 * Offline: npm is run with --offline. udm's runtime dependencies are copied from udm's own
 * node_modules into each project first (npm keeps packages that satisfy the ranges and fetches
 * nothing), and the template's build tools (typescript, vitest, @types/node) are linked from it.
 */
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { type RunningDaemon, startDaemon, tempDir, udmsetup } from "../support/daemon.js";
import { WireClient } from "../support/nbd-client.js";
import { copyRuntimeDependencies } from "../support/udm-copy.js";

const root = path.resolve(__dirname, "../..");
const TEMPLATE = path.join(root, "examples/plugin-template");
const TOOLS = ["typescript", "vitest", "@types/node"];

const exec = promisify(execFile);
const npm = (cwd: string, ...args: string[]) =>
  exec("npm", [...args, "--offline", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"], { cwd });

let work: string;
let plugin: string;
let udmTarball: string;

beforeAll(async () => {
  expect(fs.existsSync(path.join(root, "dist/index.js")), "dist/ missing: run `npm run build`").toBe(true);
  work = tempDir("udm-template-");
  // What `npm pack` puts in the tarball is dist/ as built: --ignore-scripts skips the prepare rebuild.
  const { stdout } = await npm(root, "pack", "--pack-destination", work);
  udmTarball = path.join(work, stdout.trim().split("\n").at(-1)!);
  plugin = path.join(work, "plugin");
  fs.cpSync(TEMPLATE, plugin, {
    recursive: true,
    filter: (src) => !/[/\\](node_modules|dist|vendor)$/.test(src),
  });
  fs.mkdirSync(path.join(plugin, "vendor"));
  fs.copyFileSync(udmTarball, path.join(plugin, "vendor/udm.tgz"));
  // The build tools come from udm's node_modules (linked below), not from the registry.
  const manifest = JSON.parse(fs.readFileSync(path.join(plugin, "package.json"), "utf8")) as {
    devDependencies: Record<string, string>;
  };
  for (const tool of TOOLS) delete manifest.devDependencies[tool];
  fs.writeFileSync(path.join(plugin, "package.json"), JSON.stringify(manifest, null, 2));
  copyRuntimeDependencies(plugin);
  await npm(plugin, "install");
  for (const tool of TOOLS) {
    fs.mkdirSync(path.dirname(path.join(plugin, "node_modules", tool)), { recursive: true });
    fs.symlinkSync(path.join(root, "node_modules", tool), path.join(plugin, "node_modules", tool));
  }
  await exec(process.execPath, [path.join(plugin, "node_modules/typescript/bin/tsc"), "-p", "tsconfig.json"], {
    cwd: plugin,
  });
}, 180_000);

afterAll(() => {
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

/** The counting target in `daemon`: create over a file, write and read over NBD, then its status. */
async function exercise(daemon: RunningDaemon): Promise<void> {
  const run = (...args: string[]) => udmsetup(daemon.dir, args);
  expect((await run("targets")).stdout.split("\n")[0]).toBe("counting         v0.1.0");
  const disk = path.join(work, `disk-${path.basename(daemon.dir)}.img`);
  fs.writeFileSync(disk, Buffer.alloc(1 << 20));
  expect(await run("create", "c", "--table", `0 1024 counting ${disk} 1024`)).toMatchObject({ code: 0, stderr: "" });
  const client = await WireClient.connect(runPaths(daemon.dir).nbd, "c");
  const data = Buffer.alloc(4096, 0x5a);
  expect((await client.write(8 * 512, data)).error).toBe(0);
  expect((await client.read(8 * 512, 4096)).data).toEqual(data);
  await client.disconnect();
  expect(fs.readFileSync(disk).subarray((1024 + 8) * 512, (1024 + 16) * 512)).toEqual(data);
  expect((await run("status", "c")).stdout).toBe("0 1024 counting reads 1 writes 1\n");
  expect((await run("remove", "c")).code).toBe(0);
}

describe("examples/plugin-template", () => {
  it("builds with tsc, and its own tests pass against udm/testing", async () => {
    expect(fs.existsSync(path.join(plugin, "dist/counting.js"))).toBe(true);
    const vitest = path.join(plugin, "node_modules/vitest/vitest.mjs");
    const { stdout } = await exec(process.execPath, [vitest, "run", "--reporter=verbose"], {
      cwd: plugin,
      env: { ...process.env, NO_COLOR: "1", FORCE_COLOR: "0" },
    });
    expect(stdout).toMatch(/Tests\s+3 passed/);
  }, 60_000);

  it("loads into udmd while carrying its own copy of udm", async () => {
    const own = path.join(plugin, "node_modules/udm");
    expect(fs.lstatSync(own).isSymbolicLink()).toBe(false);
    expect(fs.realpathSync(path.join(own, "dist/index.js"))).not.toBe(path.join(root, "dist/index.js"));
    const daemon = await startDaemon(tempDir(), ["--plugin", path.join(plugin, "dist/index.js")]);
    try {
      await exercise(daemon);
    } finally {
      await daemon.stop();
      fs.rmSync(daemon.dir, { recursive: true, force: true });
    }
  }, 60_000);

  it("installs next to udm in an app and loads by package name, with no copy of its own", async () => {
    const { stdout } = await npm(plugin, "pack", "--pack-destination", work);
    const pluginTarball = path.join(work, stdout.trim().split("\n").at(-1)!);
    const app = path.join(work, "app");
    fs.mkdirSync(app);
    fs.writeFileSync(path.join(app, "package.json"), JSON.stringify({ name: "app", private: true }));
    copyRuntimeDependencies(app);
    await npm(app, "install", udmTarball, pluginTarball);
    expect(fs.existsSync(path.join(app, "node_modules/udm-plugin-template/dist/index.js"))).toBe(true);
    expect(fs.existsSync(path.join(app, "node_modules/udm-plugin-template/node_modules/udm"))).toBe(false);
    const daemon = await startDaemon(tempDir(), ["--plugin", "udm-plugin-template"], {
      udmd: path.join(app, "node_modules/udm/dist/dmsetup/bin/udmd.js"),
      cwd: app,
    });
    try {
      await exercise(daemon);
    } finally {
      await daemon.stop();
      fs.rmSync(daemon.dir, { recursive: true, force: true });
    }
  }, 120_000);
});
