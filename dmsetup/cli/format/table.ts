/** One-line-per-item commands: `table`, `status`, `targets`, `version`. */
import type { TableLine } from "../../../core/device-mapper.js";
import { padEnd } from "./text.js";

/**
 * `dmsetup table|status`: `"%llu %llu %s " + params` per target — one space after the type even
 * when params are empty. `prefix` is the device name when the command runs on several devices.
 * A device with no table still gets its line: just the prefix and the newline, as dmsetup prints
 * it; with --target (pass it here rather than filtering) such a device and other types print
 * nothing.
 */
export function formatTableLines(lines: readonly TableLine[], prefix?: string, opts: { target?: string } = {}): string {
  const head = prefix === undefined ? "" : `${prefix}: `;
  if (lines.length === 0) return opts.target === undefined ? `${head}\n` : "";
  return lines
    .filter((l) => opts.target === undefined || l.type === opts.target)
    .map((l) => `${head}${l.start} ${l.length} ${l.type} ${l.params}\n`)
    .join("");
}

/** `dmsetup targets` and `target-version`: `%-16s v%d.%d.%d`. */
export function formatTargets(list: readonly { name: string; version: readonly number[] }[]): string {
  return list
    .map((t) => `${padEnd(t.name, 16)} v${t.version[0] ?? 0}.${t.version[1] ?? 0}.${t.version[2] ?? 0}\n`)
    .join("");
}

/** `dmsetup version`. */
export function formatVersion(libraryVersion: string, driverVersion: string): string {
  return `Library version:   ${libraryVersion}\nDriver version:    ${driverVersion}\n`;
}
