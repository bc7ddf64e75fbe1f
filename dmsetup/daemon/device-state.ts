/**
 * Devices that outlive their daemon. The kernel keeps its mapped devices until reboot; udmd comes
 * close: it records every device (name, uuid, minor, tables, suspended state, whether attached)
 * in its run directory whenever one changes, and a new daemon on that run directory re-creates
 * them, lower devices first, under the same minors (so tables naming `253:MINOR` still mean the
 * same devices). Snapshots reactivate from their COW stores as on any load; a merge carries on.
 */
import fs from "node:fs";
import path from "node:path";
import type { DeviceMapper } from "../../core/device-mapper.js";
import type { Logger } from "../../core/logger.js";

const STATE_VERSION = 1;

/** One table as `dmsetup table` prints it, whether it is read-only, and when it was loaded. */
export interface SavedTable {
  text: string;
  readOnly: boolean;
  /** Load order among all tables: restored in this order where dependencies allow. */
  seq: number;
}

export interface SavedDevice {
  name: string;
  uuid: string;
  minor: number;
  suspended: boolean;
  live: SavedTable | null;
  inactive: SavedTable | null;
  /** Mapped devices this one's tables stack on: restored first. */
  lowers: string[];
  attached: boolean;
}

export interface SavedState {
  version: number;
  devices: SavedDevice[];
}

/** What the device mapper holds now, in minor order. */
export function captureState(dm: DeviceMapper, isAttached: (name: string) => boolean): SavedState {
  const devices = dm.list().map((name): SavedDevice => {
    const md = dm.device(name);
    const saved = (inactive: boolean): SavedTable | null => {
      const table = inactive ? md.inactive : md.live;
      return table ? { text: dm.tableText(name, { inactive }), readOnly: table.readOnly, seq: table.loadSeq } : null;
    };
    return {
      name,
      uuid: md.uuid,
      minor: md.minor,
      suspended: md.suspended,
      live: saved(false),
      inactive: saved(true),
      lowers: md.lowerDevices().map((d) => d.name),
      attached: isAttached(name),
    };
  });
  devices.sort((a, b) => a.minor - b.minor);
  return { version: STATE_VERSION, devices };
}

/** The state file: replaced atomically (write, fsync, rename, fsync the directory). */
export class StateFile {
  constructor(readonly file: string) {}

  save(state: SavedState): void {
    const tmp = `${this.file}.tmp`;
    const fd = fs.openSync(tmp, "w", 0o600);
    try {
      fs.writeSync(fd, JSON.stringify(state) + "\n");
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, this.file);
    const dir = fs.openSync(path.dirname(this.file), "r");
    try {
      fs.fsyncSync(dir);
    } finally {
      fs.closeSync(dir);
    }
  }

  /** The saved state, or null when there is none. A file that cannot be read is an error. */
  load(): SavedState | null {
    let text: string;
    try {
      text = fs.readFileSync(this.file, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw err;
    }
    const state = JSON.parse(text) as SavedState;
    if (state.version !== STATE_VERSION || !Array.isArray(state.devices)) {
      throw new Error(`${this.file}: not a udmd device state of version ${STATE_VERSION}`);
    }
    return state;
  }

  remove(): void {
    fs.rmSync(this.file, { force: true });
  }
}

export interface RestoreResult {
  restored: string[];
  failed: { name: string; reason: string }[];
}

/**
 * Re-create the saved devices, each after the devices it stacks on and otherwise in the order their
 * tables were loaded: a snapshot-merge table loaded after the other snapshots of its origin is
 * resumed after they are active again, or its first batch would overwrite chunks they have not
 * preserved (dm-snap.c: snapshot_merge_next_chunks waits for the other snapshots only if they
 * exist). A device that cannot come back (its backing file is gone, its table no longer loads)
 * is reported, with every device stacked on it; the others come up. `attach` re-attaches those
 * that were attached.
 */
export async function restoreDevices(
  dm: DeviceMapper,
  state: SavedState,
  logger: Logger,
  attach: (name: string) => Promise<void>,
): Promise<RestoreResult> {
  const result: RestoreResult = { restored: [], failed: [] };
  const pending = [...state.devices];
  const done = new Set<string>();
  const failed = new Set<string>();
  const loadedAt = (d: SavedDevice) => d.live?.seq ?? d.inactive?.seq ?? 0;
  while (pending.length > 0) {
    let i = -1;
    pending.forEach((d, at) => {
      const ready = d.lowers.every((l) => done.has(l) || failed.has(l));
      if (ready && (i < 0 || loadedAt(d) < loadedAt(pending[i]!))) i = at;
    });
    // A cycle in a saved state cannot come from a daemon (loads refuse cycles): fail the rest.
    const dev = pending.splice(i < 0 ? 0 : i, 1)[0]!;
    const missing = dev.lowers.find((l) => failed.has(l) || !state.devices.some((d) => d.name === l));
    const reason =
      missing !== undefined ? `it is stacked on ${missing}, which was not restored` : await restoreOne(dm, dev);
    if (reason === null) {
      done.add(dev.name);
      result.restored.push(dev.name);
      if (dev.attached) {
        await attach(dev.name).catch((err: Error) =>
          logger.error("restored device could not be attached again", { device: dev.name, error: err.message }),
        );
      }
    } else {
      failed.add(dev.name);
      result.failed.push({ name: dev.name, reason });
      logger.error("device could not be restored", { device: dev.name, reason });
    }
  }
  // Once all are back, every active device is suspended and resumed again, as when a snapshot is
  // taken (docs/snapshot.md): targets that look at their neighbours at resume see all of them
  // (snapshot-origin's split boundary, dm-snap.c: origin_resume).
  for (const dev of state.devices) {
    if (!done.has(dev.name) || dev.suspended || !dev.live) continue;
    try {
      await dm.suspend(dev.name);
      await dm.resume(dev.name);
    } catch (err) {
      logger.error("restored device could not be resumed again", { device: dev.name, error: (err as Error).message });
    }
  }
  return result;
}

/** Null when `dev` is back as it was; otherwise why not (what it was brought to is removed). */
async function restoreOne(dm: DeviceMapper, dev: SavedDevice): Promise<string | null> {
  try {
    await dm.create(dev.name, { uuid: dev.uuid || undefined, minor: dev.minor });
  } catch (err) {
    return (err as Error).message;
  }
  try {
    if (dev.live) {
      await dm.load(dev.name, dev.live.text, { readOnly: dev.live.readOnly });
      await dm.resume(dev.name);
      if (dev.suspended) await dm.suspend(dev.name);
    }
    if (dev.inactive) await dm.load(dev.name, dev.inactive.text, { readOnly: dev.inactive.readOnly });
    return null;
  } catch (err) {
    await dm.remove(dev.name, { force: true }).catch(() => undefined);
    return (err as Error).message;
  }
}
