/**
 * A loaded table: targets covering [0, size), built and validated in the kernel's order with the
 * kernel's messages (dm-table.c: dm_table_add_target, dm_table_complete), and the sector → target
 * lookup the I/O path uses.
 */
import type { DependencyContainer } from "tsyringe";
import { splitArgs } from "./args.js";
import type { BlockDevice } from "./devices/block-device.js";
import { isStackable, type SharedDevices, type StackableDevice, TableDevices } from "./devices/shared-devices.js";
import { DmError } from "./errors.js";
import type { TargetRegistry } from "./registry.js";
import { Services } from "./services.js";
import { checkStacking } from "./stacking.js";
import { type Target, TargetFeatures, type TableContext, type TableOwner, isTargetError } from "./target.js";
import type { TargetSpec } from "./table-text.js";

export interface TableBuildOptions {
  deviceName: string;
  readOnly: boolean;
  registry: TargetRegistry;
  devices: SharedDevices;
  /** The mapped device itself: a table may not reference it, nor anything stacked on it. */
  self?: StackableDevice;
  /**
   * The immutable target type of the device's live table, if any (md->immutable_target_type):
   * the new table must have the same immutable type or contain a wildcard target.
   */
  immutableType?: string;
  /** The device the table belongs to (suspend state, internal suspend). */
  owner?: TableOwner;
}

/** What a table's queue limits amount to in udm (dm_calculate_queue_limits). */
export interface QueueLimits {
  /** Bytes: the largest logical block size of any device the table uses (512 without any). */
  logicalBlockSize: number;
}

const SECTOR_BYTES = 512;

export class Table implements TableContext {
  readonly targets: Target<unknown>[] = [];
  /** ends[i] = targets[i].begin + targets[i].len: binary-searched by `findTarget`. */
  private readonly ends: number[] = [];
  /** Feature bits of each target's type, in table order. */
  private readonly features: number[] = [];
  private eventFn: (() => void) | null = null;
  private destroyed = false;
  /** A SINGLETON target was added: nothing may follow it (t->singleton). */
  private singleton = false;
  private immutable: string | undefined;

  /** Tables built in this process so far: gives each its place in load order. */
  private static built = 0;
  /** When this table was loaded, relative to every other (a restarted daemon reloads in this order). */
  readonly loadSeq = ++Table.built;

  private constructor(
    readonly deviceName: string,
    readonly readOnly: boolean,
    readonly specs: readonly TargetSpec[],
    private readonly lookup: TableDevices,
    private readonly owner: TableOwner | undefined,
  ) {}

  get suspended(): boolean {
    return this.owner?.suspended ?? true;
  }

  get noflushSuspending(): boolean {
    return this.owner?.noflushSuspending ?? false;
  }

  internalSuspend(opts?: { noflush?: boolean }): Promise<void> {
    return this.owner ? this.owner.internalSuspend(opts) : Promise.resolve();
  }

  internalResume(): void {
    this.owner?.internalResume();
  }

  /**
   * DM_TABLE_LOAD's table work: add every line in order (dm_table_add_target), then the load's
   * immutable-type check. Device areas and block alignment are not checked here: that is part of
   * computing queue limits, which the mapped device does at its first load and at every swap
   * (`calculateQueueLimits`).
   */
  static async build(specs: readonly TargetSpec[], opts: TableBuildOptions): Promise<Table> {
    if (specs.length === 0) throw new DmError("EINVAL", "no targets specified");
    const lookup = new TableDevices(opts.devices, opts.readOnly, opts.self);
    const table = new Table(opts.deviceName, opts.readOnly, specs, lookup, opts.owner);
    const scope = opts.registry.container.createChildContainer();
    scope.register(Services.DeviceLookup, { useValue: lookup });
    try {
      for (const spec of specs) await table.addTarget(spec, opts, scope);
      if (opts.self) checkStacking(opts.self, lookup.deps.filter(isStackable));
      // table_load: once the table is complete, a device bound to an immutable type only takes a
      // table of that type or one with a wildcard target.
      if (opts.immutableType && opts.immutableType !== table.immutableTargetType && !table.hasWildcardTarget) {
        throw new DmError("EINVAL", `can't replace immutable target type ${opts.immutableType}`);
      }
    } catch (err) {
      await table.destroy();
      throw err;
    }
    return table;
  }

  /** dm_table_add_target: the per-line checks in the kernel's order, then the constructor. */
  private async addTarget(spec: TargetSpec, opts: TableBuildOptions, scope: DependencyContainer): Promise<void> {
    if (this.singleton) {
      throw new DmError("EINVAL", `target type ${this.specs[0]!.type} must appear alone in table`);
    }
    if (spec.length === 0) throw new DmError("EINVAL", "zero-length target");
    // The kernel refuses ends past LLONG_MAX >> 9; sectors here are exact only up to 2^53.
    if (spec.start + spec.length > Number.MAX_SAFE_INTEGER) throw new DmError("EINVAL", "too large device");
    const entry = opts.registry.get(spec.type);
    if (!entry) throw new DmError("EINVAL", `${spec.type}: unknown target type`);
    const fail = (msg: string, errno = "EINVAL") => new DmError(errno, `${spec.type}: ${msg}`);
    const features = entry.info.features;
    if (features & TargetFeatures.SINGLETON) {
      if (this.targets.length > 0) throw fail("singleton target type must appear alone in table");
      this.singleton = true;
    }
    if (features & TargetFeatures.ALWAYS_WRITEABLE && opts.readOnly) {
      throw fail("target type may not be included in a read-only table");
    }
    if (this.immutable !== undefined) {
      if (spec.type !== this.immutable) throw fail("immutable target type cannot be mixed with other target types");
    } else if (features & TargetFeatures.IMMUTABLE) {
      if (this.targets.length > 0) throw fail("immutable target type cannot be mixed with other target types");
      this.immutable = spec.type;
    }
    const begin = this.size;
    if (spec.start !== begin) throw fail("Gap in table");
    // dm_split_args only fails ("couldn't split parameters") when it cannot allocate.
    const args = splitArgs(spec.params);

    const target = opts.registry.instantiate(spec.type, scope)!;
    target.begin = spec.start;
    target.len = spec.length;
    target.table = this;
    try {
      await target.ctr(args);
    } catch (err) {
      // A ctr that opened devices before failing leaves them to the table's releaseAll.
      if (isTargetError(err)) throw fail(err.message, err.errno);
      throw fail((err as Error).message ?? String(err));
    }
    if (target.maxIoLen > 0xffff_ffff) {
      await target.dtr?.();
      throw fail("Maximum size of target IO is too large");
    }
    this.targets.push(target);
    this.features.push(features);
    this.ends.push(spec.start + spec.length);
  }

  /** The type of this table's IMMUTABLE targets, if it has any (dm_table_get_immutable_target_type). */
  get immutableTargetType(): string | undefined {
    return this.immutable;
  }

  /** Whether any target's type is a WILDCARD (dm_table_get_wildcard_target). */
  get hasWildcardTarget(): boolean {
    return this.features.some((f) => (f & TargetFeatures.WILDCARD) !== 0);
  }

  /**
   * dm_table_has_no_data_devices: every target can list its devices and none lists any. Such a
   * table keeps the device's current limits when swapped in over a live table.
   */
  get hasNoDataDevices(): boolean {
    return this.targets.every((t) => {
      if (!t.iterateDevices) return false;
      let count = 0;
      t.iterateDevices(() => {
        count++;
        return false;
      });
      return count === 0;
    });
  }

  /**
   * dm_calculate_queue_limits: stack each target's device limits, check every device area against
   * its device (device_area_is_invalid), then that the table's lines keep the device's logical
   * block grid (validate_hardware_logical_block_alignment). Throws DmError(EINVAL) with the
   * kernel's message (without its `<md>: ` prefix); returns the table's limits.
   */
  calculateQueueLimits(): QueueLimits {
    let tableLbs = SECTOR_BYTES;
    const targetLbs: number[] = [];
    for (const target of this.targets) {
      let lbs = SECTOR_BYTES;
      if (target.iterateDevices) {
        // dm_set_device_limits: the target's limits are the stack of its devices' limits.
        target.iterateDevices((dev) => {
          lbs = Math.max(lbs, dev.logicalBlockSize);
          return false;
        });
        let problem: string | undefined;
        target.iterateDevices((dev, start, len) => {
          problem = deviceAreaProblem(dev, start, len, lbs);
          return problem !== undefined;
        });
        if (problem !== undefined) throw new DmError("EINVAL", problem);
      }
      targetLbs.push(lbs);
      tableLbs = Math.max(tableLbs, lbs);
    }
    this.validateLogicalBlockAlignment(tableLbs, targetLbs);
    return { logicalBlockSize: tableLbs };
  }

  /**
   * validate_hardware_logical_block_alignment: a bio aligned to the device's logical block size
   * that runs over a line boundary must leave pieces each following line can take. `i` in the
   * message is the index where the walk stopped (the number of lines if it ran to the end).
   */
  private validateLogicalBlockAlignment(tableLbs: number, targetLbs: readonly number[]): void {
    const deviceLbsSects = tableLbs / SECTOR_BYTES;
    let nextTargetStart = 0;
    let remaining = 0;
    let i = 0;
    let ti: Target<unknown> | undefined;
    for (; i < this.targets.length; i++) {
      ti = this.targets[i]!;
      const tiLbsSects = targetLbs[i]! / SECTOR_BYTES;
      if (remaining < ti.len && remaining % tiLbsSects !== 0) break;
      nextTargetStart = (nextTargetStart + ti.len) % deviceLbsSects;
      remaining = nextTargetStart ? deviceLbsSects - nextTargetStart : 0;
    }
    if (remaining && ti) {
      throw new DmError(
        "EINVAL",
        `table line ${i} (start sect ${ti.begin} len ${ti.len}) not aligned to h/w logical block size ${tableLbs}`,
      );
    }
  }

  get size(): number {
    return this.ends.length === 0 ? 0 : this.ends[this.ends.length - 1]!;
  }

  /** Devices this table opened, most recently first-used first (DM_TABLE_DEPS order). */
  get deps(): readonly BlockDevice[] {
    return this.lookup.deps;
  }

  /** Index of the target holding `sector`, or -1 beyond the end. */
  findTarget(sector: number): number {
    const ends = this.ends;
    let lo = 0;
    let hi = ends.length - 1;
    if (hi < 0 || sector >= ends[hi]!) return -1;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (ends[mid]! > sector) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  /** Supported only if every target takes at least one duplicate of the op (dm-table.c: dm_table_supports_discards). */
  get supportsDiscard(): boolean {
    return this.targets.every((t) => t.numDiscardBios > 0);
  }
  get supportsWriteZeroes(): boolean {
    return this.targets.every((t) => t.numWriteZeroesBios > 0);
  }

  /** The table becomes live on `md`: target events now reach the device. */
  bind(onEvent: (() => void) | null): void {
    this.eventFn = onEvent;
  }

  event(): void {
    this.eventFn?.();
  }

  /** dtr every constructed target, then drop the table's device references. */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    this.eventFn = null;
    for (const target of this.targets) await target.dtr?.();
    await this.lookup.releaseAll();
  }

  /** The table's immutable target type, if any (kept for callers of the old registry-based form). */
  immutableType(_registry?: TargetRegistry): string | undefined {
    return this.immutableTargetType;
  }
}

/**
 * device_area_is_invalid: a device of size 0 (e.g. a mapped device without a table) is not
 * checked; otherwise the area must lie inside the device and, for a target whose devices have
 * logical blocks larger than a sector, start and length must be multiples of that block size.
 */
function deviceAreaProblem(dev: BlockDevice, start: number, len: number, targetLbs: number): string | undefined {
  const devSize = dev.sizeSectors;
  if (!devSize) return undefined;
  if (start >= devSize || start + len > devSize) {
    return `${dev.displayName} too small for target: start=${start}, len=${len}, dev_size=${devSize}`;
  }
  const lbsSects = targetLbs / SECTOR_BYTES;
  if (lbsSects <= 1) return undefined;
  if (start % lbsSects !== 0) {
    return `start=${start} not aligned to h/w logical block size ${targetLbs} of ${dev.displayName}`;
  }
  if (len % lbsSects !== 0) {
    return `len=${len} not aligned to h/w logical block size ${targetLbs} of ${dev.displayName}`;
  }
  return undefined;
}
