import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";
import { Services, Target, MapResult, target, targetInfoOf, type Bio } from "../../index.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";
import { tempDir } from "../support/daemon.js";
import { installUdmCopy } from "../support/udm-copy.js";

const fixture = (name: string) => path.resolve(__dirname, "../fixtures/plugins", name);

describe("target registry", () => {
  it("lists targets newest first with their versions, like dmsetup targets", () => {
    const { dm } = testMapper();
    expect(dm.targets().map((t) => `${t.name} v${t.version.join(".")}`)).toEqual([
      "thin v1.23.0",
      "thin-pool v1.23.0",
      "log-writes v1.1.0",
      "dust v1.0.0",
      "delay v1.5.0",
      "flakey v1.5.0",
      "snapshot-merge v1.5.0",
      "snapshot v1.16.0",
      "snapshot-origin v1.9.0",
      "linear v1.5.0",
      "striped v1.6.0",
      "zero v1.2.0",
      "error v1.7.0",
    ]);
  });

  it("refuses a duplicate name with a clear error and registers nothing of that batch", () => {
    const { dm } = testMapper();
    @target({ name: "fresh", version: [1, 0, 0] })
    class Fresh extends Target {
      ctr(): void {}
      map(): MapResult {
        return MapResult.KILL;
      }
    }
    @target({ name: "linear", version: [9, 9, 9] })
    class Impostor extends Target {
      ctr(): void {}
      map(): MapResult {
        return MapResult.KILL;
      }
    }
    expect(() => dm.registry.register(Fresh, Impostor)).toThrow("'linear' target already registered");
    expect(dm.registry.get("fresh")).toBeUndefined();
    expect(dm.registry.get("linear")!.info.version).toEqual([1, 5, 0]);
  });

  it("refuses classes that were not declared with @target", () => {
    const { dm } = testMapper();
    class Plain extends Target {
      ctr(): void {}
      map(_b: Bio): MapResult {
        return MapResult.KILL;
      }
    }
    expect(() => dm.registry.register(Plain)).toThrow(/is not a target/);
    expect(targetInfoOf(Plain)).toBeUndefined();
  });

  it("injects core services into targets through explicit tokens", async () => {
    const { dm } = testMapper();
    const seen: unknown[] = [];
    @target({
      name: "probe",
      version: [1, 0, 0],
      inject: [Services.Logger, Services.WorkQueues, Services.Copier, Services.DeviceLookup, Services.Clock],
    })
    class Probe extends Target {
      constructor(...services: unknown[]) {
        super();
        seen.push(...services);
      }
      ctr(): void {}
      map(b: Bio): MapResult {
        b.complete("ok");
        return MapResult.SUBMITTED;
      }
    }
    dm.registry.register(Probe);
    await dm.create("p", { table: "0 8 probe" });
    expect(seen).toHaveLength(5);
    expect(seen.every((s) => s !== undefined && s !== null)).toBe(true);
    expect(seen[1]).toHaveProperty("create");
    expect(seen[2]).toHaveProperty("client");
    expect(seen[3]).toHaveProperty("get");
  });
});

describe("plugins", () => {
  it("loads a TypeScript plugin at run time; its target uses per-bio context and endIo", async () => {
    const { dm, backing } = testMapper();
    backing.memory("mem0", 2048);
    expect(await dm.loadPlugin(fixture("io-stats.ts"))).toEqual(["io-stats"]);
    expect(dm.targets()[0]).toMatchObject({ name: "io-stats", version: [0, 1, 0] });
    expect(dm.plugins()).toEqual([
      { module: fixture("io-stats.ts"), file: fixture("io-stats.ts"), targets: ["io-stats"] },
    ]);
    await dm.create("s", { table: "0 1024 io-stats mem0 1024" });
    const h = dm.open("s");
    await h.write(0, pattern(3, 8192));
    await h.write(16, pattern(4, 512));
    await h.read(0, 16);
    await h.flush();
    expect(dm.status("s")[0]!.params).toBe("read 1/16/0 write 2/17/0 flush 1/0/0");
    expect(dm.tableText("s")).toBe("0 1024 io-stats mem0 1024\n");
    await dm.message("s", 0, "reset");
    expect(dm.status("s")[0]!.params).toBe("read 0/0/0 write 0/0/0 flush 0/0/0");
    await expect(dm.message("s", 0, "bogus")).rejects.toThrow("io-stats: Unrecognised message: bogus");
    await h.close();
  });

  it("loads a plugin that carries its own copy of udm and of tsyringe, and runs its targets", async () => {
    // The plugin's @target and inject come from the copy; the mapper's registry must still build it.
    const dir = tempDir("udm-plugin-copy-");
    try {
      installUdmCopy(dir);
      const plugin = path.join(dir, "io-stats.mjs");
      fs.copyFileSync(fixture("io-stats.mjs"), plugin);
      const { dm, backing } = testMapper();
      backing.memory("m", 100);
      expect(await dm.loadPlugin(plugin)).toEqual(["io-stats-js"]);
      await dm.create("x", { table: "0 50 io-stats-js m 10" });
      const h = dm.open("x");
      await h.write(1, pattern(5, 1024));
      expect((await h.read(1, 2)).equals(pattern(5, 1024))).toBe(true);
      expect(dm.status("x")[0]!.params).toBe("reads 1 writes 1");
      await expect(dm.create("y", { table: "0 50 io-stats-js m" })).rejects.toThrow(
        "io-stats-js: Invalid argument count",
      );
      await h.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("keeps the errno of a TargetError thrown by a target built against another copy of udm", async () => {
    // Another copy's TargetError: same name and shape, a different class.
    class TargetError extends Error {
      constructor(
        message: string,
        readonly errno = "EINVAL",
      ) {
        super(message);
        this.name = "TargetError";
      }
    }
    @target({ name: "refuser", version: [1, 0, 0] })
    class Refuser extends Target {
      ctr(): void {
        throw new TargetError("no such thing", "ENODEV");
      }
      map(): MapResult {
        return MapResult.KILL;
      }
    }
    const { dm } = testMapper();
    dm.registry.register(Refuser);
    await expect(dm.create("r", { table: "0 8 refuser" })).rejects.toMatchObject({
      errno: "ENODEV",
      message: "refuser: no such thing",
    });
  });

  it("refuses to load the same plugin twice and keeps the first", async () => {
    const { dm } = testMapper();
    await dm.loadPlugin(fixture("io-stats.ts"));
    await expect(dm.loadPlugin(fixture("io-stats.ts"))).rejects.toThrow(/'io-stats' target already registered/);
    expect(dm.targets().filter((t) => t.name === "io-stats")).toHaveLength(1);
    expect(dm.plugins()).toHaveLength(1);
  });

  it("reports a plugin that cannot be loaded with its error", async () => {
    const { dm } = testMapper();
    await expect(dm.loadPlugin(fixture("does-not-exist.js"))).rejects.toThrow(
      /plugin .*does-not-exist\.js: cannot load/,
    );
    await expect(dm.loadPlugin("no-such-udm-plugin-package")).rejects.toThrow(
      /no-such-udm-plugin-package: cannot load/,
    );
  });

  it("loads a .ts plugin Node can strip; one it cannot fails naming the file, the line and the build step", async () => {
    // Plain Node (not the test runner's transform), as udmd loads plugins.
    const dir = tempDir("udm-ts-plugin-");
    try {
      fs.mkdirSync(path.join(dir, "node_modules"));
      fs.symlinkSync(path.resolve(__dirname, "../.."), path.join(dir, "node_modules/udm"));
      const target = 'import { MapResult, Target, target } from "udm";\n';
      const body = "ctr(_args: string[]): void {}\n  map(): MapResult { return MapResult.KILL; }";
      fs.writeFileSync(
        path.join(dir, "strippable.ts"),
        `${target}export class Plain extends Target {\n  ${body}\n}\n` +
          'target({ name: "plain-ts", version: [1, 0, 0] })(Plain);\n',
      );
      fs.writeFileSync(
        path.join(dir, "decorated.ts"),
        `${target}@target({ name: "decorated", version: [1, 0, 0] })\nexport class Decorated extends Target {\n  ${body}\n}\n`,
      );
      const dist = path.resolve(__dirname, "../../dist/index.js");
      const script = `
        import { createDeviceMapper } from ${JSON.stringify(dist)};
        const dm = createDeviceMapper();
        const out = [await dm.loadPlugin(${JSON.stringify(path.join(dir, "strippable.ts"))})];
        for (const p of [${JSON.stringify(path.join(dir, "decorated.ts"))}, ${JSON.stringify(fixture("io-stats.ts"))}]) {
          out.push(await dm.loadPlugin(p).catch((err) => err.message));
        }
        console.log(JSON.stringify(out));
      `;
      const { stdout } = await promisify(execFile)(process.execPath, ["--input-type=module", "-e", script]);
      const [loaded, decorated, parameterProperty] = JSON.parse(stdout) as [string[], string, string];
      expect(loaded).toEqual(["plain-ts"]);
      const advice =
        ". Node runs TypeScript only by stripping types (no decorators, parameter properties or enums): " +
        'build the plugin with tsc and load the .js it emits (docs/writing-targets.md, "TypeScript sources")';
      const decoratedFile = path.join(dir, "decorated.ts");
      expect(decorated).toBe(
        `plugin ${decoratedFile}: cannot load ${decoratedFile}:2: decorators are not supported in strip-only mode${advice}`,
      );
      // Node points at the first parameter property.
      const lines = fs.readFileSync(fixture("io-stats.ts"), "utf8").split("\n");
      const parameterLine = lines.findIndex((l) => l.includes("private readonly devices")) + 1;
      expect(parameterProperty).toBe(
        `plugin ${fixture("io-stats.ts")}: cannot load ${fixture("io-stats.ts")}:${parameterLine}: ` +
          `TypeScript parameter property is not supported in strip-only mode${advice}`,
      );
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("runs the compiled package (tsc output) with a plain JavaScript plugin loaded by package name", async () => {
    // `npm test` builds dist/ first; this checks the decorator path under tsc rather than the
    // test runner's transform, and that a JS plugin can import "udm".
    const dist = path.resolve(__dirname, "../../dist/index.js");
    expect(fs.existsSync(dist), "dist/ missing: run `npm run build` (npm test does)").toBe(true);
    const script = `
      import { createDeviceMapper, MemoryDevice } from ${JSON.stringify(dist)};
      const mem = new MemoryDevice(100, { tableName: "m" });
      const dm = createDeviceMapper({ backing: { identify: async (s) => s, open: async () => mem } });
      await dm.loadPlugin(${JSON.stringify(fixture("io-stats.mjs"))});
      await dm.create("x", { table: "0 50 io-stats-js m 10" });
      const h = dm.open("x");
      await h.write(1, Buffer.alloc(1024, 7));
      const back = await h.read(1, 2);
      console.log(JSON.stringify({ ok: back.every((b) => b === 7), status: dm.status("x")[0].params, table: dm.tableText("x"), first: dm.targets()[0].name }));
    `;
    const { stdout } = await promisify(execFile)(process.execPath, ["--input-type=module", "-e", script], {
      cwd: path.resolve(__dirname, "../.."),
    });
    expect(JSON.parse(stdout)).toEqual({
      ok: true,
      status: "reads 1 writes 1",
      table: "0 50 io-stats-js m 10\n",
      first: "io-stats-js",
    });
  });
});
