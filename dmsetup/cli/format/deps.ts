/** `dmsetup deps`. */
import type { DepRef, DevNameFormat } from "./dep-tree.js";

export interface DepsOptions {
  /** The device name when the command runs on several devices. */
  prefix?: string;
  format?: DevNameFormat;
  /** Names for devices whose DepRef carries none (non-dm devices' kernel names). */
  names?: (major: number, minor: number, kind: "blkdevname" | "devname") => string | undefined;
}

/**
 * `dmsetup deps`: `N dependencies\t: (maj, min) ...` — literally `1 dependencies`. With -o
 * blkdevname/devname an unresolvable device falls back to `(maj, min)`, as in dmsetup. udm
 * extension: a backing file prints as `(PATH)`.
 */
export function formatDeps(deps: readonly DepRef[], opts: DepsOptions = {}): string {
  const format = opts.format ?? "devno";
  const item = (d: DepRef) => {
    if ("path" in d) return ` (${d.path})`;
    const blk = () =>
      d.blkdevname ?? (d.name !== undefined ? `dm-${d.minor}` : opts.names?.(d.major, d.minor, "blkdevname"));
    // devname: the mapped name of a mapped device, else the kernel name.
    const name =
      format === "blkdevname"
        ? blk()
        : format === "devname"
          ? (d.name ?? opts.names?.(d.major, d.minor, "devname") ?? blk())
          : undefined;
    return name !== undefined ? ` (${name})` : ` (${d.major}, ${d.minor})`;
  };
  const head = opts.prefix === undefined ? "" : `${opts.prefix}: `;
  return `${head}${deps.length} dependencies\t:${deps.map(item).join("")}\n`;
}
