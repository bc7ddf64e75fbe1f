import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";

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

describe("docs/examples/library.ts", () => {
  it("runs and prints what docs/library.md shows", async () => {
    const { example } = await import("../../docs/examples/library.js");
    const lines = (await example()).map((l) => l.replace(/\/\S*\/udm-example-[^/]+/g, "<dir>"));
    const doc = read("docs/library.md");
    const shown = /prints:\n\n```\n([\s\S]*?)```/.exec(doc)![1]!.trimEnd().split("\n");
    expect(lines).toEqual(shown);
  });
});
