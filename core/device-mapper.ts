/**
 * `DeviceMapper`: the library entry point and the equivalent of the kernel's dm-ioctl layer. It
 * owns the mapped devices (names, UUIDs, minors), the target registry and the shared backing
 * devices, and offers the control operations dmsetup uses plus Promise-based I/O.
 */
import "reflect-metadata";
import { container as rootContainer, type DependencyContainer } from "tsyringe";
import { splitArgs } from "./args.js";
import { Bio, type BioOp, BioFlags, submitAndWait, SECTOR_SHIFT } from "./bio.js";
import type { BlockDevice, IoOptions } from "./devices/block-device.js";
import {
  type BackingDevices,
  SharedDevices,
  type StackableDevice,
  systemBackingDevices,
} from "./devices/shared-devices.js";
import { DmError } from "./errors.js";
import { type Logger, MemoryLogger } from "./logger.js";
import { DM_MAJOR, MappedDevice, type SuspendOptions } from "./mapped-device.js";
import { type LoadedPlugin, TargetRegistry } from "./registry.js";
import { type Clock, Services, systemClock } from "./services.js";
import { formatTableLine, parseTableText, type TargetSpec } from "./table-text.js";
import type { Table } from "./table.js";
import type { TargetClass, TargetTypeInfo } from "./target.js";

export interface DeviceMapperOptions {
  /** Where backing devices come from (default: files and kernel block devices). */
  backing?: BackingDevices;
  logger?: Logger;
  clock?: Clock;
  /** Target classes to register at start (built-ins), oldest first. */
  targets?: TargetClass[];
  /** Extra services to register in the container, e.g. work queues and the copier. */
  services?: (container: DependencyContainer) => void;
  /** How file and kernel block devices are opened and do their I/O: O_DIRECT, inline reads, the write plug, exclusive claims. */
  io?: IoOptions;
}

export interface DeviceInfo {
  name: string;
  uuid: string;
  major: number;
  minor: number;
  suspended: boolean;
  readOnly: boolean;
  livePresent: boolean;
  inactivePresent: boolean;
  openCount: number;
  /** Marked by `remove --deferred` while open: goes when the last opener closes it. */
  deferredRemove?: boolean;
  eventNr: number;
  /** Targets in the live table (or the inactive one when asked for). */
  targetCount: number;
  sizeSectors: number;
}

export interface TableLine {
  start: number;
  length: number;
  type: string;
  params: string;
}

export type TableInput = string | readonly TargetSpec[];

export class DeviceMapper {
  readonly registry: TargetRegistry;
  readonly container: DependencyContainer;
  readonly logger: Logger;
  private readonly devices: SharedDevices;
  private readonly byName = new Map<string, MappedDevice>();

  constructor(opts: DeviceMapperOptions = {}) {
    this.logger = opts.logger ?? new MemoryLogger(false);
    this.container = rootContainer.createChildContainer();
    this.container.register(Services.Logger, { useValue: this.logger });
    this.container.register(Services.Clock, { useValue: opts.clock ?? systemClock });
    opts.services?.(this.container);
    this.registry = new TargetRegistry(this.container);
    this.container.register(TargetRegistry, { useValue: this.registry });
    for (const cls of opts.targets ?? []) this.registry.register(cls);
    this.devices = new SharedDevices(opts.backing ?? systemBackingDevices, (spec) => this.resolveMapped(spec), opts.io);
  }

  // ---- device lookup ----

  private resolveMapped(spec: string): StackableDevice | undefined {
    const byPath = /^\/dev\/mapper\/(.+)$/.exec(spec);
    if (byPath) return this.byName.get(byPath[1]!);
    const byNum = /^(\d+):(\d+)$/.exec(spec);
    if (byNum && Number(byNum[1]) === DM_MAJOR) {
      return [...this.byName.values()].find((md) => md.minor === Number(byNum[2]));
    }
    return undefined;
  }

  /** The mapped device called `name`; ENXIO if there is none. */
  device(name: string): MappedDevice {
    const md = this.byName.get(name);
    if (!md) throw new DmError("ENXIO", `${name}: no such device`);
    return md;
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }

  // ---- control operations (one per dm ioctl) ----

  /**
   * DM_DEV_CREATE, then (with a table) load + resume as `dmsetup create` does; if either fails
   * the new device is removed again, so a failed create leaves nothing behind.
   */
  async create(
    name: string,
    opts: { uuid?: string; readOnly?: boolean; table?: TableInput; minor?: number } = {},
  ): Promise<MappedDevice> {
    checkName(name);
    // DM_PERSISTENT_DEV_FLAG: the caller asks for a minor (a restarted daemon restoring devices
    // under the numbers their tables use); dm_create refuses one in use.
    if (opts.minor !== undefined) {
      if (!Number.isSafeInteger(opts.minor) || opts.minor < 0 || opts.minor >= 1 << 20) {
        throw new DmError("EINVAL", `Invalid minor number ${opts.minor}.`);
      }
      if ([...this.byName.values()].some((md) => md.minor === opts.minor)) {
        throw new DmError("EBUSY", `Minor ${opts.minor} is already in use.`);
      }
    }
    const uuid = opts.uuid ?? "";
    if (Buffer.byteLength(uuid) > 128)
      throw new DmError("EINVAL", "Invalid new mapped device name or uuid string supplied.");
    if (this.byName.has(name)) throw new DmError("EBUSY", `Device ${name} already exists.`);
    if (uuid && [...this.byName.values()].some((md) => md.uuid === uuid)) {
      throw new DmError("EBUSY", `A device with uuid ${uuid} already exists.`);
    }
    const md = new MappedDevice(name, uuid, opts.minor ?? this.nextMinor(), {
      lastClosed: (closed) => this.removeDeferred(closed),
      registry: this.registry,
      devices: this.devices,
      logger: this.logger,
    });
    this.byName.set(name, md);
    if (opts.table !== undefined) {
      try {
        await md.load(toSpecs(opts.table), { readOnly: opts.readOnly });
        await md.resume();
      } catch (err) {
        this.byName.delete(name);
        await md.remove().catch(() => undefined);
        throw err;
      }
    }
    this.logger.info("device created", { device: name, minor: md.minor });
    return md;
  }

  private nextMinor(): number {
    const used = new Set([...this.byName.values()].map((md) => md.minor));
    let minor = 0;
    while (used.has(minor)) minor++;
    return minor;
  }

  // Every operation that can fail is async: a missing device or bad table text rejects the
  // returned promise rather than throwing synchronously.

  async load(name: string, table: TableInput, opts: { readOnly?: boolean } = {}): Promise<void> {
    return this.device(name).load(toSpecs(table), opts);
  }

  async clear(name: string): Promise<void> {
    return this.device(name).clear();
  }

  async suspend(name: string, opts: SuspendOptions = {}): Promise<void> {
    return this.device(name).suspend(opts);
  }

  async resume(name: string, opts: SuspendOptions = {}): Promise<void> {
    return this.device(name).resume(opts);
  }

  /**
   * DM_DEV_REMOVE. Refused with EBUSY while the device is open (NBD clients, other tables)
   * unless forced; forcing first swaps in an `error` table so held I/O fails (dmsetup remove -f).
   * A device another device's table holds is never removed, forced or not (dm_lock_for_deletion):
   * the holder's table would go on naming it. Forced, it gets the `error` table and stays.
   */
  async remove(name: string, opts: { force?: boolean; deferred?: boolean } = {}): Promise<void> {
    const md = this.device(name);
    // DM_DEFERRED_REMOVE (dm_lock_for_deletion with mark_deferred): a busy device is marked and
    // goes when its last opener closes it; the request itself succeeds.
    if (opts.deferred && !opts.force && md.inUse) {
      md.deferredRemove = true;
      md.live?.event();
      this.logger.info("device marked for deferred removal", { device: name, openCount: md.openCount });
      return;
    }
    if (md.openCount > 0 && !opts.force) {
      throw new DmError("EBUSY", `${name}: device is open (open count ${md.openCount})`);
    }
    if (opts.force && md.live && this.registry.get("error")) {
      await md.load([{ start: 0, length: md.live.size, type: "error", params: "" }]);
      await md.resume({ noflush: true });
    }
    if (md.holders.length > 0) {
      const holders = md.holders.map((h) => h.name).join(", ");
      throw new DmError("EBUSY", `${name}: device is in use by ${holders}; remove or reload those first`);
    }
    this.byName.delete(name);
    await md.remove();
    this.logger.info("device removed", { device: name });
  }

  /** The last opener of a device marked for deferred removal has closed it (dm_deferred_remove). */
  private async removeDeferred(md: MappedDevice): Promise<void> {
    if (this.byName.get(md.name) !== md || !md.deferredRemove) return;
    try {
      await this.remove(md.name);
    } catch (err) {
      this.logger.error("deferred removal failed", { device: md.name, error: (err as Error).message });
    }
  }

  /**
   * DM_REMOVE_ALL: remove every device that is not open (forced: every device), rescanning after
   * each removal, devices no other device holds first (dm_hash_remove_all).
   */
  async removeAll(opts: { force?: boolean } = {}): Promise<number> {
    for (;;) {
      const next = [...this.byName.values()].find(
        (md) => md.holders.length === 0 && (opts.force || md.openCount === 0),
      );
      if (!next) break;
      await this.remove(next.name, opts);
    }
    return this.byName.size;
  }

  /**
   * DM_DEV_RENAME (dev_rename, dm_hash_rename): the new name is validated, then must be free,
   * then the old device must exist. Waiters are woken by an event on the live table, if any.
   */
  async rename(oldName: string, newName: string): Promise<void> {
    checkName(newName, "Invalid new mapped device name or uuid string supplied.");
    if (this.byName.has(newName)) {
      throw new DmError(
        "EBUSY",
        `Unable to change name on mapped device ${oldName} to one that already exists: ${newName}`,
      );
    }
    const md = this.byName.get(oldName);
    if (!md) throw new DmError("ENXIO", `Unable to rename non-existent device, ${oldName} to ${newName}`);
    this.byName.delete(oldName);
    md.name = newName;
    this.byName.set(newName, md);
    md.live?.event();
  }

  /** DM_DEV_RENAME with DM_UUID_FLAG: same order as rename; a UUID can only be set once. */
  async setUuid(name: string, uuid: string): Promise<void> {
    if (!uuid || Buffer.byteLength(uuid) > 128) {
      throw new DmError("EINVAL", "Invalid new mapped device name or uuid string supplied.");
    }
    if ([...this.byName.values()].some((d) => d.uuid === uuid)) {
      throw new DmError("EBUSY", `Unable to change uuid on mapped device ${name} to one that already exists: ${uuid}`);
    }
    const md = this.byName.get(name);
    if (!md) throw new DmError("ENXIO", `Unable to rename non-existent device, ${name} to uuid ${uuid}`);
    if (md.uuid) {
      throw new DmError(
        "EINVAL",
        `Unable to change uuid of mapped device ${name} to ${uuid} because uuid is already set to ${md.uuid}`,
      );
    }
    md.uuid = uuid;
    md.live?.event();
  }

  /** Names in ascending order, like DM_LIST_DEVICES. */
  list(): string[] {
    return [...this.byName.keys()].sort();
  }

  info(name: string, opts: { inactive?: boolean } = {}): DeviceInfo {
    const md = this.device(name);
    const table = opts.inactive ? md.inactive : md.live;
    return {
      name: md.name,
      uuid: md.uuid,
      major: DM_MAJOR,
      minor: md.minor,
      suspended: md.suspended,
      readOnly: md.readOnly,
      livePresent: md.live !== null,
      inactivePresent: md.inactive !== null,
      openCount: md.openCount,
      deferredRemove: md.deferredRemove,
      eventNr: md.eventNr,
      targetCount: table?.targets.length ?? 0,
      sizeSectors: md.sizeSectors,
    };
  }

  /** DM_TABLE_STATUS with STATUS_TABLE_FLAG: each target's constructor arguments, normalised. */
  table(name: string, opts: { inactive?: boolean } = {}): TableLine[] {
    return this.statusLines(name, "table", opts);
  }

  /** DM_TABLE_STATUS: each target's runtime status. */
  status(name: string, opts: { inactive?: boolean; noflush?: boolean } = {}): TableLine[] {
    return this.statusLines(name, "info", opts);
  }

  private statusLines(
    name: string,
    type: "info" | "table",
    opts: { inactive?: boolean; noflush?: boolean },
  ): TableLine[] {
    const md = this.device(name);
    const table: Table | null = opts.inactive ? md.inactive : md.live;
    if (!table) return [];
    return table.targets.map((t, i) => ({
      start: t.begin,
      length: t.len,
      type: table.specs[i]!.type,
      params: t.status?.(type, { noflush: opts.noflush }) ?? "",
    }));
  }

  /** `dmsetup table` text: one `<start> <length> <type> <params>` line per target. */
  tableText(name: string, opts: { inactive?: boolean } = {}): string {
    return this.table(name, opts)
      .map((l) => formatTableLine(l.start, l.length, l.type, l.params) + "\n")
      .join("");
  }

  /**
   * DM_TARGET_MSG, with the kernel's checks (dm-ioctl.c: target_message): the message is split like table
   * parameters (dm_split_args); words starting with `@` are for the core (message_for_md).
   */
  async message(name: string, sector: number, message: string): Promise<string | undefined> {
    const md = this.device(name);
    const args = splitArgs(message);
    if (args.length === 0) throw new DmError("EINVAL", "Empty message received.");
    if (args[0]!.startsWith("@")) {
      if (/^@cancel_deferred_remove$/i.test(args[0]!)) {
        if (args.length !== 1) throw new DmError("EINVAL", "Invalid arguments for @cancel_deferred_remove");
        // dm_cancel_deferred_remove: EBUSY only once removal has started (a removed device is no
        // longer found); otherwise it clears the deferred-remove mark.
        md.deferredRemove = false;
        return undefined;
      }
      throw new DmError("EINVAL", `Unsupported message sent to DM core: ${args[0]}`);
    }
    const table = md.live;
    if (!table) return undefined;
    const i = table.findTarget(sector);
    if (i < 0) throw new DmError("EINVAL", "Target message sector outside device.");
    const target = table.targets[i]!;
    if (!target.message) throw new DmError("EINVAL", "Target type does not support messages");
    try {
      return (await target.message(args)) ?? undefined;
    } catch (err) {
      throw new DmError(
        (err as { errno?: string }).errno ?? "EINVAL",
        `${table.specs[i]!.type}: ${(err as Error).message}`,
      );
    }
  }

  deps(name: string, opts: { inactive?: boolean } = {}): readonly BlockDevice[] {
    return this.device(name).deps(opts.inactive);
  }

  async waitEvent(name: string, eventNr: number): Promise<number> {
    return this.device(name).waitEvent(eventNr);
  }

  targets(): TargetTypeInfo[] {
    return this.registry.list();
  }

  loadPlugin(spec: string, baseDir?: string): Promise<string[]> {
    return this.registry.loadPlugin(spec, baseDir);
  }

  /** The plugins `loadPlugin` loaded, with the targets each added. */
  plugins(): LoadedPlugin[] {
    return this.registry.plugins();
  }

  /** Open a device for I/O from this process (counts as an opener while open). */
  open(name: string): DeviceHandle {
    const md = this.device(name);
    md.open();
    return new DeviceHandle(md);
  }

  /**
   * Remove every device (tests, shutdown). I/O queued on a suspended device fails first, so that
   * nothing stacked above waits on it: removing that device would wait for its in-flight I/O.
   */
  async close(): Promise<void> {
    this.failQueuedIo();
    await this.removeAll({ force: true });
  }

  /**
   * Shutdown: every bio waiting for a resume, now or later, fails with EIO, so that no flush or
   * removal waits on a device that stays suspended.
   */
  failQueuedIo(): void {
    for (const md of this.byName.values()) md.failQueued();
  }
}

/** Promise-based I/O on one mapped device. Offsets and lengths in sectors. */
export class DeviceHandle {
  private closed = false;
  constructor(readonly device: MappedDevice) {}

  get sizeSectors(): number {
    return this.device.sizeSectors;
  }

  async read(sector: number, sectors: number, flags = 0): Promise<Buffer> {
    const buf = Buffer.alloc(sectors << SECTOR_SHIFT);
    await this.io("read", sector, sectors, buf, flags);
    return buf;
  }

  /** Read into `buf` (its length must be a multiple of 512). */
  readInto(sector: number, buf: Buffer, flags = 0): Promise<Bio> {
    return this.io("read", sector, buf.length >> SECTOR_SHIFT, buf, flags);
  }

  /** Resolves with the completed bio (no extra async step: this is the hot path of library I/O). */
  write(sector: number, data: Buffer, opts: { fua?: boolean; preflush?: boolean } = {}): Promise<Bio> {
    if (data.length % 512 !== 0)
      return Promise.reject(new DmError("EINVAL", "write length must be a multiple of 512 bytes"));
    const flags = (opts.fua ? BioFlags.FUA : 0) | (opts.preflush ? BioFlags.PREFLUSH : 0);
    return this.io("write", sector, data.length >> SECTOR_SHIFT, data, flags);
  }

  async flush(): Promise<void> {
    await this.io("flush", 0, 0, null, BioFlags.PREFLUSH);
  }

  async discard(sector: number, sectors: number): Promise<void> {
    await this.io("discard", sector, sectors, null, 0);
  }

  async writeZeroes(sector: number, sectors: number, opts: { noUnmap?: boolean } = {}): Promise<void> {
    await this.io("write-zeroes", sector, sectors, null, opts.noUnmap ? BioFlags.NOUNMAP : 0);
  }

  /** Submit a prepared bio and wait for it. */
  submit(bio: Bio): Promise<Bio> {
    return submitAndWait(this.device, bio);
  }

  private io(op: BioOp, sector: number, sectors: number, data: Buffer | null, flags: number): Promise<Bio> {
    if (this.closed) return Promise.reject(new DmError("EBADF", "device handle is closed"));
    return submitAndWait(this.device, new Bio(op, sector, sectors, data, flags, null));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.device.close();
  }
}

function toSpecs(table: TableInput): readonly TargetSpec[] {
  return typeof table === "string" ? parseTableText(table, "on command line") : table;
}

/** Name rules of DM_DEV_CREATE / DM_DEV_RENAME (dm-ioctl.c: check_name, invalid_str). */
function checkName(name: string, emptyMessage = "name not supplied when creating device"): void {
  if (!name) throw new DmError("EINVAL", emptyMessage);
  if (Buffer.byteLength(name) > 127)
    throw new DmError("EINVAL", "Invalid new mapped device name or uuid string supplied.");
  if (name.includes("/")) throw new DmError("EINVAL", "device name cannot contain '/'");
  // Kernel names are C strings: a NUL would silently cut the name (and no NBD client could name it).
  if (name.includes("\0")) throw new DmError("EINVAL", "device name cannot contain a NUL character");
  if (name === "control" || name === "." || name === "..") {
    throw new DmError("EINVAL", 'device name cannot be "control", ".", or ".."');
  }
}
