import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { createDeviceMapper } from "../../index.js";

const root = path.resolve(__dirname, "../..");
const read = (p: string) => fs.readFileSync(path.join(root, p), "utf8");

describe("docs stay true to the code", () => {
  it("writing-targets.md shows the example plugins exactly as the tests load them", () => {
    const doc = read("docs/writing-targets.md");
    const ts = read("test/fixtures/plugins/io-stats.ts").replace('"../../../index.js"', '"udm"');
    expect(doc).toContain("```ts\n" + ts + "```");
    expect(doc).toContain("```js\n" + read("test/fixtures/plugins/io-stats.mjs") + "```");
  });
});

describe("writing-targets.md on plugins", () => {
  const doc = read("docs/writing-targets.md");
  const blocks = (lang: string) =>
    [...doc.matchAll(new RegExp("```" + lang + "\\n([\\s\\S]*?)```", "g"))].map((m) => m[1]!);
  /** Every line of `block` is a line of `file` (the doc shows an excerpt of it). */
  const excerptOf = (block: string, file: string) => {
    const lines = new Set(
      read(file)
        .split("\n")
        .map((l) => l.trim()),
    );
    return block.split("\n").filter((l) => l.trim() !== "" && !lines.has(l.trim()));
  };

  it("shows the tsconfig of each decorator style as the tests build plugins with it", () => {
    const json = blocks("json");
    expect(json).toContain(read("examples/plugin-template/tsconfig.json"));
    expect(json).toContain(read("test/fixtures/plugins/tsconfig.experimental-decorators.json"));
  });

  it("quotes the template's target and test as they are", () => {
    const ts = blocks("ts");
    const standard = ts.find((b) => b.includes("inject: [Services.DeviceLookup]") && b.includes("counting"))!;
    expect(excerptOf(standard, "examples/plugin-template/src/counting.ts")).toEqual([]);
    const kit = ts.find((b) => b.includes("runTargetCrashCheck"))!;
    expect(excerptOf(kit, "examples/plugin-template/test/counting.test.ts")).toEqual([]);
  });

  it("lists every bio operation and every status a submitter can see", () => {
    const bio = read("core/bio.ts");
    const union = (type: string) =>
      [...new RegExp(`export type ${type} = ([^;]+);`).exec(bio)![1]!.matchAll(/"([^"]+)"/g)].map((m) => m[1]!);
    const rows = (header: string) => {
      const table = doc.slice(doc.indexOf(header)).split("\n\n")[0]!;
      return table
        .split("\n")
        .slice(2)
        .map((row) => /^\| `([^`]+)`/.exec(row)![1]!);
    };
    expect(rows("| `clone.op` |")).toEqual(union("BioOp"));
    expect(rows("| `status` |")).toEqual(union("BioStatus").filter((s) => s !== "DM_REQUEUE"));
  });
});

describe("docs/examples/library.ts", () => {
  it("runs and prints what docs/library.md shows", async () => {
    const { example } = await import("../../docs/examples/library.js");
    const lines = (await example()).map((l) => l.replace(/\/\S*\/udm-example-[^/]+/g, "<dir>"));
    const doc = read("docs/library.md");
    const shown = /prints:\n\n```\n([\s\S]*?)```/.exec(doc)![1]!.trimEnd().split("\n");
    expect(lines).toEqual(shown);
  });
});

describe("examples marked runnable in README.md and docs/", () => {
  /** Every ```ts runnable block, with where it is. */
  const runnable = ["README.md", ...fs.readdirSync(path.join(root, "docs")).map((f) => `docs/${f}`)]
    .filter((f) => f.endsWith(".md"))
    .flatMap((file) =>
      [...read(file).matchAll(/```ts runnable\n([\s\S]*?)```/g)].map((m, i) => ({
        where: `${file} #${i + 1}`,
        code: m[1]!,
      })),
    );

  it("the README's library example is one of them", () => {
    expect(runnable.map((r) => r.where)).toContain("README.md #1");
  });

  it("the README's error for a missing file is udm's, naming the path", async () => {
    const said = /`(linear: Device lookup failed: (\/\S+): [^`]+)`/.exec(read("README.md"))!;
    expect(fs.existsSync(said[2]!)).toBe(false);
    const dm = createDeviceMapper();
    await expect(dm.create("data", { table: `0 2048 linear ${said[2]} 0` })).rejects.toThrow(
      expect.objectContaining({ message: said[1], errno: "ENOENT" }),
    );
  });

  /**
   * Run as a user would with udm installed (`udm` is the built package, dist/), in a fresh
   * temporary directory as TMPDIR; what each console.log prints is what its comment says (`…`
   * stands for any text, the temporary directory is shown as /tmp).
   */
  it.each(runnable.map((r) => [r.where, r.code]))("%s runs and prints what its comments say", async (_where, code) => {
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "udm-doc-example-"));
    try {
      const file = path.join(tmp, "example.mts");
      fs.writeFileSync(file, code.replace(/from "udm"/g, `from ${JSON.stringify(path.join(root, "dist/index.js"))}`));
      const r = spawnSync(process.execPath, [file], { encoding: "utf8", env: { ...process.env, TMPDIR: tmp } });
      expect(r.stderr).toBe("");
      expect(r.status).toBe(0);
      const printed = r.stdout
        .split("\n")
        .filter((l) => l !== "")
        .map((l) => l.replaceAll(tmp, "/tmp"));
      const expected = [...code.matchAll(/^console\.log\(.*\); \/\/ (.*)$/gm)].map((m) => m[1]!);
      expect(printed).toHaveLength(expected.length);
      printed.forEach((line, i) => {
        const pattern = expected[i]!.split("…").map((p) => p.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
        expect(line).toMatch(new RegExp(`^${pattern.join(".*")}$`));
      });
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});
