/**
 * A device's disk geometry (`dmsetup setgeometry`, DM_DEV_SET_GEOMETRY): what HDIO_GETGEO would
 * answer for it. The kernel keeps it in the mapped_device; udm keeps it here, beside the devices,
 * with the kernel's checks and messages (dm-ioctl.c dev_set_geometry, dm.c dm_set_geometry).
 */
import type { MappedDevice } from "../../core/mapped-device.js";
import { DmError } from "../../core/errors.js";

/** struct hd_geometry: heads and sectors are bytes, cylinders 16 bits, start an unsigned long. */
export interface Geometry {
  cylinders: number;
  heads: number;
  sectors: number;
  /** A decimal string: an unsigned long may exceed what a JSON number holds exactly. */
  start: string;
}

const ULONG_WRAP = 1n << 64n;

/**
 * Parse "CYL HEAD SECT START" as the kernel's `sscanf("%lu %lu %lu %lu%c")` does: blanks before
 * each number, digits only (an unsigned conversion stops at a sign), anything after the fourth
 * number fails; values wrap at 2^64 as simple_strntoull's do.
 */
export function parseGeometry(text: string): Geometry {
  const values: bigint[] = [];
  let i = 0;
  const isSpace = (c: string | undefined) => c !== undefined && " \t\n\v\f\r".includes(c);
  while (values.length < 4) {
    while (isSpace(text[i])) i++;
    const start = i;
    while (i < text.length && text[i]! >= "0" && text[i]! <= "9") i++;
    if (i === start) break;
    values.push(BigInt(text.slice(start, i)) % ULONG_WRAP);
  }
  if (values.length !== 4 || i < text.length) throw new DmError("EINVAL", "Unable to interpret geometry settings.");
  const [cylinders, heads, sectors, start] = values as [bigint, bigint, bigint, bigint];
  if (cylinders > 65535n || heads > 255n || sectors > 255n)
    throw new DmError("EINVAL", "Geometry exceeds range limits.");
  if (start > cylinders * heads * sectors) throw new DmError("EINVAL", "Start sector is beyond the geometry limits.");
  return { cylinders: Number(cylinders), heads: Number(heads), sectors: Number(sectors), start: start.toString() };
}

const NONE: Geometry = { cylinders: 0, heads: 0, sectors: 0, start: "0" };

/**
 * Geometries by device object, so that they follow a rename and go with the device. As in the
 * kernel (__bind), a table of another size wipes the geometry when it becomes live.
 */
export class GeometryStore {
  private readonly byDevice = new WeakMap<MappedDevice, { geometry: Geometry; sizeSectors: number }>();

  set(md: MappedDevice, geometry: Geometry): void {
    this.byDevice.set(md, { geometry, sizeSectors: md.sizeSectors });
  }

  /** All zero until set, as a new mapped_device's. */
  get(md: MappedDevice): Geometry {
    return this.byDevice.get(md)?.geometry ?? NONE;
  }

  /** After a resume: a live table of another size than the one the geometry was set on wipes it. */
  resumed(md: MappedDevice): void {
    const entry = this.byDevice.get(md);
    if (entry && entry.sizeSectors !== md.sizeSectors) this.byDevice.delete(md);
  }
}
