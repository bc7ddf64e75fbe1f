/**
 * Finding and importing a plugin module: a file path or a package name, resolved from a base
 * folder (the caller's working directory, or a config file's folder). A TypeScript file that Node
 * cannot run (it only strips types: no decorators, parameter properties or enums) fails with the
 * file, the line and the build step to take, instead of Node's bare SyntaxError.
 */
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { DmError } from "./errors.js";

export interface ImportedPlugin {
  module: Record<string, unknown>;
  /** The module's file when it is one (else the specifier import() resolved by itself). */
  file: string;
}

/** A file path (absolute or ./, ../ relative) rather than a package name. */
export function isPathSpecifier(spec: string): boolean {
  return path.isAbsolute(spec) || spec.startsWith("./") || spec.startsWith("../");
}

/** Paths become file URLs, package names the file URL they resolve to from `baseDir`, if they do. */
export function resolvePluginSpecifier(spec: string, baseDir: string): string {
  if (spec.startsWith("file:")) return spec;
  if (isPathSpecifier(spec)) return pathToFileURL(path.resolve(baseDir, spec)).href;
  try {
    return pathToFileURL(createRequire(path.join(baseDir, "noop.js")).resolve(spec)).href;
  } catch {
    return spec; // let import() resolve it (ESM-only packages) and report its own error
  }
}

export async function importPlugin(spec: string, baseDir: string): Promise<ImportedPlugin> {
  if (spec.trim() === "") throw new DmError("EINVAL", "plugin: empty module name");
  const specifier = resolvePluginSpecifier(spec, baseDir);
  const file = specifier.startsWith("file:") ? fileURLToPath(specifier) : specifier;
  if (specifier.startsWith("file:") && !fs.existsSync(file)) {
    throw new DmError("ENOENT", `plugin ${spec}: cannot load: ${file}: no such file`);
  }
  try {
    return { module: (await import(specifier)) as Record<string, unknown>, file };
  } catch (err) {
    const typeScript = typeScriptFailure(err, file);
    const reason = typeScript ?? (err as Error).message;
    throw new DmError("ENOENT", `plugin ${spec}: cannot load${typeScript ? "" : ":"} ${reason}`, { cause: err });
  }
}

const TS_FILE = /\.[cm]?ts$/;

/**
 * When a TypeScript file (the plugin or a module it imports) is what Node could not run: where,
 * why, and what to do. Node's strip-only mode reports ERR_UNSUPPORTED_TYPESCRIPT_SYNTAX with the
 * file and line in the stack; syntax it leaves in place (a decorator) fails in V8 as a plain
 * SyntaxError that says neither, so the first decorator of the plugin's source is named instead.
 */
function typeScriptFailure(err: unknown, pluginFile: string): string | null {
  const code = (err as { code?: unknown }).code;
  const syntax = err instanceof SyntaxError || code === "ERR_UNSUPPORTED_TYPESCRIPT_SYNTAX";
  if (!syntax && code !== "ERR_UNKNOWN_FILE_EXTENSION") return null;
  const where = /^(?:file:\/\/)?(\/[^\n]*?):(\d+)\s*$/m.exec((err as Error).stack ?? "");
  const file = where ? decodeURIComponent(where[1]!) : pluginFile;
  if (!TS_FILE.test(file)) return null;
  let what = `${file}${where ? `:${where[2]}` : ""}: ${(err as Error).message}`;
  const decorator = where || code ? undefined : firstDecoratorLine(file);
  if (decorator !== undefined) what = `${file}:${decorator}: decorators are not supported in strip-only mode`;
  return (
    `${what}. Node runs TypeScript only by stripping types (no decorators, parameter properties or ` +
    'enums): build the plugin with tsc and load the .js it emits (docs/writing-targets.md, "TypeScript sources")'
  );
}

function firstDecoratorLine(file: string): number | undefined {
  let source: string;
  try {
    source = fs.readFileSync(file, "utf8");
  } catch {
    return undefined;
  }
  const index = source.split("\n").findIndex((line) => /^\s*@[A-Za-z_$]/.test(line));
  return index < 0 ? undefined : index + 1;
}
