/** `dmsetup ls` (without --tree). */
import type { DevNameFormat } from "./dep-tree.js";

export interface LsEntry {
  name: string;
  major: number;
  minor: number;
  /** Target types in the live table, for `--target TYPE` filtering. */
  targetTypes?: readonly string[];
}

export interface LsOptions {
  /**
   * --target TYPE: the type to filter on (needs `targetTypes`), or `true` when `devices` is already
   * filtered. An already-filtered empty list prints nothing: dmsetup prints `No devices found`
   * only when there are no devices at all, which only the string form can tell.
   */
  target?: string | boolean;
  /** -o devno|blkdevname|devname (ignored with --target, as by dmsetup). */
  format?: DevNameFormat;
  /** Shorthand for format "blkdevname". */
  blkdevname?: boolean;
}

/** `dmsetup ls`: `name\t(253:0)`; with --target, `name\t(253, 0)` (it goes through `status`). */
export function formatLs(devices: readonly LsEntry[], opts: LsOptions = {}): string {
  const { target } = opts;
  if (target === true) return devices.map((d) => `${d.name}\t(${d.major}, ${d.minor})\n`).join("");
  if (devices.length === 0) return "No devices found\n";
  if (typeof target === "string") {
    return devices
      .filter((d) => d.targetTypes?.includes(target))
      .map((d) => `${d.name}\t(${d.major}, ${d.minor})\n`)
      .join("");
  }
  const format = opts.format ?? (opts.blkdevname ? "blkdevname" : "devno");
  // -o devname asks libdm for the mapped name of a mapped device: the name again.
  const dev = (d: LsEntry) =>
    format === "devno" ? `${d.major}:${d.minor}` : format === "blkdevname" ? `dm-${d.minor}` : d.name;
  return devices.map((d) => `${d.name}\t(${dev(d)})\n`).join("");
}
