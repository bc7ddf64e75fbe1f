/**
 * `node --import ./bench/tsc-loader.mjs file.ts`: run TypeScript compiled by tsc's own emitter
 * (ts.transpileModule with the project's tsconfig), i.e. the JavaScript `npm run build` ships.
 *
 * The benchmark's engine processes use this instead of tsx because tsx compiles with esbuild's
 * keepNames, which wraps every named closure in a `__name(fn, "name")` call (an
 * Object.defineProperty per closure created): a per-request cost on udm's hot path that the
 * published package does not have. `--loader tsx` in bench/run.ts measures with tsx instead.
 */
import fs from "node:fs";
import { createRequire, registerHooks } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ts = createRequire(import.meta.url)("typescript");
const root = path.join(import.meta.dirname, "..");
const config = ts.readConfigFile(path.join(root, "tsconfig.json"), ts.sys.readFile).config;
const { options } = ts.parseJsonConfigFileContent(config, ts.sys, root);
const compilerOptions = {
  ...options,
  module: ts.ModuleKind.ESNext,
  sourceMap: false,
  inlineSourceMap: true,
  declaration: false,
};

registerHooks({
  resolve(specifier, context, nextResolve) {
    // TypeScript sources import each other as `./x.js`; serve `./x.ts` when only that exists.
    if (/^\.\.?\//.test(specifier) && specifier.endsWith(".js") && context.parentURL?.endsWith(".ts")) {
      const source = new URL(specifier.slice(0, -3) + ".ts", context.parentURL);
      if (fs.existsSync(fileURLToPath(source))) return { url: source.href, shortCircuit: true };
    }
    return nextResolve(specifier, context);
  },
  load(url, context, nextLoad) {
    if (!url.startsWith("file:") || !url.endsWith(".ts")) return nextLoad(url, context);
    const fileName = fileURLToPath(url);
    const { outputText } = ts.transpileModule(fs.readFileSync(fileName, "utf8"), { compilerOptions, fileName });
    return { format: "module", source: outputText, shortCircuit: true };
  },
});
