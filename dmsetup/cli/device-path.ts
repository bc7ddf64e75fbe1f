/**
 * A device named by a path (`/dev/mapper/pool`, `$UDM_DEV_DIR/pool`, `mapper/pool`), as dmsetup
 * accepts it wherever a device name goes (libdm-common.c: dm_task_set_name, which hands a name
 * with a `/` to _dm_task_set_name_from_path): the device whose node in the device directory is
 * the same block device, else whichever node there is. xfstests' thin tests message the pool as
 * /dev/mapper/NAME, for one.
 *
 * One difference: an udm device that is not attached has no node, so a path in the device
 * directory that names no file is taken as the device of that name (libdm would say "not found",
 * but there the node always exists).
 */
import fs from "node:fs/promises";
import path from "node:path";

/** libdm's "Device PATH not found" (dmsetup then says "Command failed."). */
export class DevicePathError extends Error {
  readonly errno = "ENXIO";
}

async function blockDevno(file: string): Promise<number | null> {
  try {
    const st = await fs.stat(file);
    return st.isBlockDevice() ? st.rdev : null;
  } catch {
    return null;
  }
}

/**
 * The device name that `devicePath` (a name with a `/`) stands for. `devDirs`: where device links
 * are looked for, udmd's device directory ($UDM_DEV_DIR) first, then dmsetup's /dev/mapper.
 */
export async function deviceNameFromPath(devicePath: string, devDirs: readonly string[]): Promise<string> {
  const base = path.basename(devicePath);
  const notFound = () => new DevicePathError(`Device ${devicePath} not found`);
  const dirs = [...new Set(devDirs.map((d) => path.resolve(d)))];
  const rdev = await blockDevno(devicePath);
  if (rdev === null) {
    const exists = await fs.stat(devicePath).then(
      () => true,
      () => false,
    );
    if (!exists) {
      if (base && dirs.includes(path.resolve(path.dirname(devicePath)))) return base;
      // libdm: exactly one `/`, not absolute: a path under /dev ("mapper/pool").
      const slashes = devicePath.split("/").length - 1;
      if (devicePath.length < 3 || devicePath.startsWith("/") || slashes !== 1) throw notFound();
      return deviceNameFromPath(path.join("/dev", devicePath), devDirs);
    }
    throw notFound(); // a file, a directory: no device
  }
  for (const dir of dirs) if (base && (await blockDevno(path.join(dir, base))) === rdev) return base;
  for (const dir of dirs) {
    const entries = await fs.readdir(dir).catch(() => [] as string[]);
    for (const entry of entries.sort()) {
      if ((await blockDevno(path.join(dir, entry))) === rdev) return entry;
    }
  }
  throw notFound();
}
