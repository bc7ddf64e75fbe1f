/**
 * udmd's --config file: JSON holding some of the flags' settings. Paths in it (plugin files, TLS
 * credentials) are relative to the file's folder, so a config works whatever directory udmd is
 * started in (a service manager starts it in /); plugin package names are looked up from there.
 */
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { LogLevel } from "../../core/logger.js";
import { isPathSpecifier, resolvePluginSpecifier } from "../../core/plugins.js";

export interface DaemonConfig {
  plugins?: string[];
  logLevel?: LogLevel;
  nbdListen?: string;
  tls?: string;
  tlsCertificates?: string;
  tlsPsk?: string;
}

/** Read and check `file`; throws an Error whose message says what is wrong. */
export function readConfig(file: string): DaemonConfig {
  const config = JSON.parse(fs.readFileSync(file, "utf8")) as DaemonConfig;
  if (config === null || typeof config !== "object" || Array.isArray(config)) throw new Error("expected a JSON object");
  if (config.plugins !== undefined && !isStringArray(config.plugins)) {
    throw new Error('"plugins": expected an array of module names or paths');
  }
  for (const key of ["tlsCertificates", "tlsPsk"] as const) {
    if (config[key] !== undefined && typeof config[key] !== "string") throw new Error(`"${key}": expected a path`);
  }
  const dir = path.dirname(path.resolve(file));
  const relative = (p: string | undefined) => (p === undefined ? undefined : path.resolve(dir, p));
  return {
    ...config,
    plugins: config.plugins?.map((spec) => pluginFrom(spec, dir)),
    tlsCertificates: relative(config.tlsCertificates),
    tlsPsk: relative(config.tlsPsk),
  };
}

/** A plugin path made absolute against `dir`; a package name resolved from `dir` if it is there. */
function pluginFrom(spec: string, dir: string): string {
  if (isPathSpecifier(spec)) return path.resolve(dir, spec);
  const resolved = resolvePluginSpecifier(spec, dir);
  return resolved.startsWith("file:") ? fileURLToPath(resolved) : spec;
}

function isStringArray(value: unknown): value is string[] {
  return Array.isArray(value) && value.every((v) => typeof v === "string");
}
