/**
 * Opens the devices tables name and shares them: each underlying device is opened once and
 * reference counted across every table that uses it (dm_get_device / dm_put_device). A table opens
 * read-only when it is read-only; asking for read-write later upgrades (new tables get a read-write
 * handle; tables already holding the read-only one keep it until they are destroyed). Kernel block
 * devices are claimed exclusively, as dm_get_device claims them, unless `io.exclusive` is false.
 */
import fs from "node:fs/promises";
import type { BlockDevice, IoOptions, OpenMode, OpenOptions } from "./block-device.js";
import { isRemoteDevice, nbdBackingDevices } from "./nbd/index.js";
import { openBackingDevice } from "./open-device.js";
import { DmError } from "../errors.js";
import { Mutex } from "../mutex.js";
import type { DeviceLookup } from "../services.js";

/** A device that is another mapped device, stacked in-process. */
export interface StackableDevice extends BlockDevice {
  /** The device's name, for messages. */
  readonly name: string;
  /**
   * Count an opener (the open count; `remove` refuses while > 0). `holder` is the mapped device
   * whose table opens this one (the kernel's holders/ directory); other openers pass none.
   */
  open(holder?: StackableDevice): void;
  close(holder?: StackableDevice): Promise<void>;
  /** Mapped devices whose tables (live or inactive) hold this one. */
  readonly holders: readonly StackableDevice[];
  /** Mapped devices this one's tables (live and inactive) are stacked on. */
  lowerDevices(): StackableDevice[];
}

/** Whether a device a table opened is another mapped device. */
export function isStackable(device: BlockDevice): device is StackableDevice {
  return typeof (device as Partial<StackableDevice>).lowerDevices === "function";
}

/** Where backing devices come from: the file system by default, RAM disks in tests. */
export interface BackingDevices {
  /** A key equal for every spelling of one device (path, symlink, major:minor). */
  identify(spec: string): Promise<string>;
  open(spec: string, opts: OpenOptions): Promise<BlockDevice>;
}

/** Finds an in-process mapped device by `/dev/mapper/NAME` or `major:minor`. */
export type MappedDeviceResolver = (spec: string) => StackableDevice | undefined;

interface Entry {
  key: string;
  device: BlockDevice;
  mode: OpenMode;
  refs: number;
  /** Handles replaced by a mode upgrade, closed with the entry. */
  retired: BlockDevice[];
  stacked: boolean;
  /**
   * Stacked devices: references per opener (a table). The lower mapped device is opened once per
   * opener however many of its lines use it (dm_get_device shares one dm_dev per device within a
   * table), and closed when that opener drops its last reference.
   */
  owners: Map<object, { refs: number; holder: StackableDevice | undefined }>;
}

export class SharedDevices {
  private readonly entries = new Map<string, Entry>();
  private readonly byDevice = new Map<BlockDevice, Entry>();
  /** Serialises acquire/release so two tables opening one device concurrently share it. */
  private readonly lock = new Mutex();

  constructor(
    private readonly backing: BackingDevices,
    private readonly resolveMapped: MappedDeviceResolver = () => undefined,
    /** How devices are opened (passed to every `backing.open`). */
    private readonly io: IoOptions = {},
  ) {}

  /**
   * Take a reference on the device `spec` names. `owner` identifies the opener (a table): a stacked
   * mapped device counts one open per owner; without an owner every acquire counts as an open.
   * `holder` is the owner's own mapped device, recorded as a holder of a stacked device.
   */
  acquire(spec: string, mode: OpenMode, owner?: object, holder?: StackableDevice): Promise<BlockDevice> {
    return this.lock.run(() => this.acquireLocked(spec, mode, owner, holder));
  }

  private async acquireLocked(
    spec: string,
    mode: OpenMode,
    owner?: object,
    holder?: StackableDevice,
  ): Promise<BlockDevice> {
    const mapped = this.resolveMapped(spec);
    if (mapped) return this.acquireStacked(mapped, owner, holder);
    // NBD URIs name remote exports whatever the file-system backing is (docs/nbd.md, "Remote devices").
    const backing = isRemoteDevice(spec) ? nbdBackingDevices : this.backing;
    const key = await backing.identify(spec);
    const existing = this.entries.get(key);
    if (existing) {
      existing.refs++;
      if (mode === "rw" && existing.mode === "r") {
        try {
          if (existing.device.upgradeToReadWrite) {
            await existing.device.upgradeToReadWrite();
          } else {
            // Not claimed again: the retired handle keeps the claim until the entry closes.
            const upgraded = await backing.open(spec, { ...this.io, exclusive: false, mode: "rw" });
            existing.retired.push(existing.device);
            this.byDevice.set(upgraded, existing);
            existing.device = upgraded;
          }
          existing.mode = "rw";
        } catch (err) {
          existing.refs--;
          throw err;
        }
      }
      return existing.device;
    }
    const device = await backing.open(spec, { exclusive: true, ...this.io, mode });
    const entry: Entry = { key, device, mode, refs: 1, retired: [], stacked: false, owners: new Map() };
    this.entries.set(key, entry);
    this.byDevice.set(device, entry);
    return device;
  }

  private acquireStacked(device: StackableDevice, owner?: object, holder?: StackableDevice): BlockDevice {
    const key = `md:${device.tableName}`;
    let entry = this.entries.get(key);
    if (!entry) {
      entry = { key, device, mode: "rw", refs: 0, retired: [], stacked: true, owners: new Map() };
      this.entries.set(key, entry);
      this.byDevice.set(device, entry);
    }
    entry.refs++;
    const held = owner ? (entry.owners.get(owner)?.refs ?? 0) : 0;
    if (owner) entry.owners.set(owner, { refs: held + 1, holder });
    if (held === 0) device.open(holder);
    return device;
  }

  /** Drop a reference taken by `acquire` (with the same `owner`). */
  release(device: BlockDevice, owner?: object): Promise<void> {
    return this.lock.run(() => this.releaseLocked(device, owner));
  }

  private async releaseLocked(device: BlockDevice, owner?: object): Promise<void> {
    const entry = this.byDevice.get(device);
    if (!entry) throw new Error(`release of a device this manager did not open: ${device.tableName}`);
    entry.refs--;
    if (entry.stacked) {
      const held = owner ? entry.owners.get(owner) : undefined;
      if (held && held.refs > 1) held.refs--;
      else {
        if (owner) entry.owners.delete(owner);
        await (device as StackableDevice).close(held?.holder);
      }
    }
    if (entry.refs > 0) return;
    this.entries.delete(entry.key);
    for (const d of [entry.device, ...entry.retired]) this.byDevice.delete(d);
    if (!entry.stacked) {
      for (const d of [entry.device, ...entry.retired]) await d.close();
    }
  }

  /** Number of distinct devices currently open (tests check nothing leaks). */
  get openCount(): number {
    return this.entries.size;
  }
}

/** Identity of a device regardless of how it was named: block devices by number, files by realpath. */
export async function identifyBackingDevice(spec: string): Promise<string> {
  if (/^\d+:\d+$/.test(spec)) return `blk:${spec}`;
  let st;
  try {
    st = await fs.stat(spec);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // Worded as openBackingDevice words it: this is where a missing path is noticed first.
    const why = code === "ENOENT" || code === "ENOTDIR" ? "no such file or block device" : (err as Error).message;
    throw Object.assign(new Error(`${spec}: ${why}`), { code });
  }
  if (st.isBlockDevice()) {
    const rdev = st.rdev;
    const major = ((rdev >> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
    const minor = (rdev & 0xff) | ((rdev >> 12) & ~0xff);
    return `blk:${major}:${minor}`;
  }
  return `file:${await fs.realpath(spec)}`;
}

/**
 * The DeviceLookup a table hands its targets: remembers what the table opened (for `deps`, in
 * the kernel's order: most recently first-used first) and releases it all when the table dies.
 */
export class TableDevices implements DeviceLookup {
  /** One reference per `get`; devices listed once each in `deps`. */
  private readonly refs: BlockDevice[] = [];
  readonly deps: BlockDevice[] = [];

  constructor(
    private readonly manager: SharedDevices,
    private readonly readOnly: boolean,
    private readonly self?: StackableDevice,
  ) {}

  async get(path: string, mode: OpenMode = "rw"): Promise<BlockDevice> {
    const device = await this.manager.acquire(path, this.readOnly ? "r" : mode, this, this.self);
    if (this.self && device === this.self) {
      await this.manager.release(device, this);
      throw Object.assign(new Error("a table cannot reference its own device"), { code: "EINVAL" });
    }
    this.refs.push(device);
    if (!this.deps.includes(device)) this.deps.unshift(device);
    return device;
  }

  async put(device: BlockDevice): Promise<void> {
    const i = this.refs.lastIndexOf(device);
    if (i < 0) throw new DmError("EINVAL", `put of a device this table did not get: ${device.tableName}`);
    this.refs.splice(i, 1);
    if (!this.refs.includes(device)) this.deps.splice(this.deps.indexOf(device), 1);
    await this.manager.release(device, this);
  }

  async releaseAll(): Promise<void> {
    while (this.refs.length > 0) await this.manager.release(this.refs.pop()!, this);
    this.deps.length = 0;
  }
}

/** Files and kernel block devices, as named in tables. */
export const systemBackingDevices: BackingDevices = {
  identify: identifyBackingDevice,
  open: openBackingDevice,
};
