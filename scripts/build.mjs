// npm run build, npm start, npm test and prepare: `tsc -p tsconfig.build.json`, unless dist/ is
// up to date. "Up to date": the inputs (every TypeScript file the config includes, the config
// files, the TypeScript version) are those of the last successful build, by path, size and
// modification time, and each input's .js is in the output folder. The record of the last build is
// node_modules/.cache/udm-build.json. Plain JavaScript, so that it runs on any Node.
//
//   node scripts/build.mjs [--project tsconfig.build.json] [--force]
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);
const args = process.argv.slice(2);
const project = path.resolve(args.includes("--project") ? args[args.indexOf("--project") + 1] : "tsconfig.build.json");
const root = path.dirname(project);
const record = path.join(root, "node_modules", ".cache", "udm-build.json");
const EXTENSIONS = [".ts", ".tsx", ".mts", ".cts"];

/** The config and those it extends: their files, `include` and compiler options (nearest wins). */
function readConfig(file) {
  const config = JSON.parse(fs.readFileSync(file, "utf8"));
  const base = config.extends ? readConfig(path.resolve(path.dirname(file), config.extends)) : null;
  const dir = path.dirname(file);
  return {
    files: [...(base?.files ?? []), file],
    include: config.include ? config.include.map((p) => path.resolve(dir, p)) : (base?.include ?? [dir]),
    outDir: config.compilerOptions?.outDir ? path.resolve(dir, config.compilerOptions.outDir) : base?.outDir,
    rootDir: config.compilerOptions?.rootDir ? path.resolve(dir, config.compilerOptions.rootDir) : base?.rootDir,
  };
}

function sources(entry, outDir, out = []) {
  const st = fs.statSync(entry, { throwIfNoEntry: false });
  if (!st) return out;
  if (st.isFile()) {
    if (EXTENSIONS.some((e) => entry.endsWith(e))) out.push(entry);
  } else if (st.isDirectory() && path.basename(entry) !== "node_modules" && entry !== outDir) {
    for (const name of fs.readdirSync(entry).sort()) sources(path.join(entry, name), outDir, out);
  }
  return out;
}

const config = readConfig(project);
const outDir = config.outDir ?? root;
const rootDir = config.rootDir ?? root;
const inputs = config.include.flatMap((entry) => sources(entry, outDir));
const tsVersion = require("typescript/package.json").version;
const hash = createHash("sha256").update(`typescript ${tsVersion}\n`);
for (const file of [...config.files, ...inputs]) {
  const st = fs.statSync(file);
  hash.update(`${path.relative(root, file)} ${st.size} ${st.mtimeMs}\n`);
}
const signature = hash.digest("hex");

/** Where tsc writes `file`'s JavaScript. */
const output = (file) => path.join(outDir, path.relative(rootDir, file)).replace(/\.([mc]?)tsx?$/, ".$1js");
const previous = (() => {
  try {
    return JSON.parse(fs.readFileSync(record, "utf8")).signature;
  } catch {
    return undefined;
  }
})();
const outputsThere = inputs.filter((f) => !f.endsWith(".d.ts")).every((f) => fs.existsSync(output(f)));

if (!args.includes("--force") && previous === signature && outputsThere) {
  console.log(
    `build: ${path.relative(process.cwd(), outDir) || "."}/ is up to date (npm run build -- --force rebuilds)`,
  );
  process.exit(0);
}
console.log(`build: tsc -p ${path.relative(process.cwd(), project)}`);
fs.rmSync(record, { force: true });
const tsc = spawnSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", project], { stdio: "inherit" });
if (tsc.status !== 0) process.exit(tsc.status ?? 1);
fs.mkdirSync(path.dirname(record), { recursive: true });
fs.writeFileSync(record, `${JSON.stringify({ signature, inputs: inputs.length, typescript: tsVersion })}\n`);
