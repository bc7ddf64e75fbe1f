/**
 * A second copy of udm on disk, as a plugin that installed udm into its own node_modules has it:
 * `<dir>/node_modules/udm` holds the built package (dist/), next to its own copies of tsyringe,
 * tslib and reflect-metadata, so nothing of it is the module instance the tests run. koffi (native
 * code, no state udm relies on) is linked rather than copied.
 */
import fs from "node:fs";
import path from "node:path";

const root = path.resolve(__dirname, "../..");

/** udm's runtime dependencies as they sit in its node_modules (what `npm install udm` brings). */
export const UDM_RUNTIME_PACKAGES = ["tsyringe", "tslib", "reflect-metadata", "koffi", "@koromix"];

/** Copy udm's runtime dependencies from udm's own node_modules into `<dir>/node_modules`. */
export function copyRuntimeDependencies(dir: string, link: string[] = []): void {
  const modules = path.join(dir, "node_modules");
  fs.mkdirSync(modules, { recursive: true });
  for (const name of UDM_RUNTIME_PACKAGES) {
    const from = path.join(root, "node_modules", name);
    if (link.includes(name)) fs.symlinkSync(from, path.join(modules, name));
    else fs.cpSync(from, path.join(modules, name), { recursive: true });
  }
}

/** `<dir>/node_modules/udm`: a copy of the built package with copies of its dependencies. */
export function installUdmCopy(dir: string): string {
  const dist = path.join(root, "dist/index.js");
  if (!fs.existsSync(dist)) throw new Error("dist/ missing: run `npm run build` (npm test does)");
  const udm = path.join(dir, "node_modules/udm");
  fs.mkdirSync(udm, { recursive: true });
  fs.copyFileSync(path.join(root, "package.json"), path.join(udm, "package.json"));
  fs.cpSync(path.join(root, "dist"), path.join(udm, "dist"), { recursive: true });
  copyRuntimeDependencies(dir, ["koffi", "@koromix"]);
  return udm;
}
