/**
 * The two ways to declare a target's services, each compiled by tsc with the tsconfig
 * docs/writing-targets.md shows for it, then loaded and run: `@inject` on constructor parameters
 * (experimentalDecorators: test/fixtures/plugins/io-stats.ts) and standard decorators with the
 * tokens in `@target({ inject })` (examples/plugin-template). Parameter decorators without
 * experimentalDecorators fail in tsc with TS1206, as the docs say.
 */
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tempDir } from "../support/daemon.js";

const exec = promisify(execFile);
const root = path.resolve(__dirname, "../..");
const TSC = path.join(root, "node_modules/typescript/bin/tsc");
const EXPERIMENTAL = path.join(root, "test/fixtures/plugins/tsconfig.experimental-decorators.json");
const STANDARD = path.join(root, "examples/plugin-template/tsconfig.json");

let work: string;
/** The three builds, started together (tsc takes seconds each). */
let builds: Record<"experimental" | "standard" | "refused", Promise<{ code: number; output: string }>>;

/** A plugin project in `work/<name>`: one source file and a tsconfig; tsc's exit code and output. */
async function build(name: string, source: string, tsconfig: string): Promise<{ code: number; output: string }> {
  const dir = path.join(work, name);
  fs.mkdirSync(path.join(dir, "src"), { recursive: true });
  fs.writeFileSync(path.join(dir, "src/plugin.ts"), source);
  fs.copyFileSync(tsconfig, path.join(dir, "tsconfig.json"));
  try {
    const { stdout } = await exec(process.execPath, [TSC, "-p", dir]);
    return { code: 0, output: stdout };
  } catch (err) {
    return { code: (err as { code: number }).code, output: (err as { stdout: string }).stdout };
  }
}

/**
 * In a fresh Node process, import a built plugin before anything else (the import order that used
 * to crash with "tsyringe requires a reflect polyfill"), then load it into the compiled package's
 * mapper and run one write and read through `table`.
 */
async function run(plugin: string, table: string): Promise<unknown> {
  const script = `
    await import(${JSON.stringify(plugin)});
    const { createDeviceMapper, MemoryDevice, readBio, submitAndWait } = await import(${JSON.stringify(path.join(root, "dist/index.js"))});
    const mem = new MemoryDevice(4096, { tableName: "m" });
    const dm = createDeviceMapper({ backing: { identify: async (s) => s, open: async () => mem } });
    const targets = await dm.loadPlugin(${JSON.stringify(plugin)});
    await dm.create("x", { table: ${JSON.stringify(table)} });
    const h = dm.open("x");
    await h.write(8, Buffer.alloc(4096, 9));
    const below = (await submitAndWait(mem, readBio(1032, Buffer.alloc(4096)))).data; // at the table's offset
    const ok = (await h.read(8, 8)).every((b) => b === 9) && below.every((b) => b === 9);
    console.log(JSON.stringify({ targets, ok, status: dm.status("x")[0].params }));
  `;
  const { stdout } = await exec(process.execPath, ["--input-type=module", "-e", script]);
  return JSON.parse(stdout);
}

beforeAll(() => {
  expect(fs.existsSync(path.join(root, "dist/index.js")), "dist/ missing: run `npm run build`").toBe(true);
  work = tempDir("udm-decorators-");
  fs.mkdirSync(path.join(work, "node_modules/@types"), { recursive: true });
  fs.symlinkSync(root, path.join(work, "node_modules/udm"));
  fs.symlinkSync(path.join(root, "node_modules/@types/node"), path.join(work, "node_modules/@types/node"));
  builds = {
    experimental: build("experimental", ioStats(), EXPERIMENTAL),
    standard: build("standard", counting(), STANDARD),
    refused: build("refused", ioStats(), STANDARD),
  };
});

afterAll(() => {
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

const ioStats = () =>
  fs.readFileSync(path.join(root, "test/fixtures/plugins/io-stats.ts"), "utf8").replace('"../../../index.js"', '"udm"');
const counting = () => fs.readFileSync(path.join(root, "examples/plugin-template/src/counting.ts"), "utf8");

describe("decorators in a TypeScript plugin", () => {
  it("@inject parameter decorators: built with experimentalDecorators, loaded and run", async () => {
    expect(await builds.experimental).toEqual({ code: 0, output: "" });
    expect(await run(path.join(work, "experimental/dist/plugin.js"), "0 2048 io-stats m 1024")).toEqual({
      targets: ["io-stats"],
      ok: true,
      status: "read 1/8/0 write 1/8/0 flush 0/0/0",
    });
  }, 60_000);

  it("standard decorators with @target({ inject }): built without the flag, loaded and run", async () => {
    expect(await builds.standard).toEqual({ code: 0, output: "" });
    expect(await run(path.join(work, "standard/dist/plugin.js"), "0 2048 counting m 1024")).toEqual({
      targets: ["counting"],
      ok: true,
      status: "reads 1 writes 1",
    });
  }, 60_000);

  it("@inject parameter decorators without experimentalDecorators: tsc refuses them (TS1206)", async () => {
    const { code, output } = await builds.refused;
    expect(code).not.toBe(0);
    expect(output).toMatch(/src\/plugin\.ts\(\d+,\d+\): error TS1206: Decorators are not valid here\./);
  }, 60_000);
});
