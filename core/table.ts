/**
 * A loaded table: targets covering [0, size), built and validated in the kernel's order with the
 * kernel's messages (dm-reference §3.2), and the sector → target lookup the I/O path uses.
 */
import type { DependencyContainer } from "tsyringe";
import { splitArgs } from "./args.js";
import type { BlockDevice } from "./devices/block-device.js";
import { type DeviceManager, TableDevices } from "./device-manager.js";
import { DmError } from "./errors.js";
import type { TargetRegistry } from "./registry.js";
import { Services } from "./services.js";
import { type Target, TargetError, TargetFeatures, type TableContext } from "./target.js";
import type { TargetSpec } from "./table-text.js";

export interface TableBuildOptions {
  deviceName: string;
  readOnly: boolean;
  registry: TargetRegistry;
  devices: DeviceManager;
  /** The mapped device itself: a table may not reference it. */
  self?: BlockDevice;
  /** The type of an immutable target this device once had (only that type or a wildcard may follow). */
  immutableType?: string;
}

export class Table implements TableContext {
  readonly targets: Target<unknown>[] = [];
  /** ends[i] = targets[i].begin + targets[i].len: binary-searched by `findTarget`. */
  private readonly ends: number[] = [];
  private eventFn: (() => void) | null = null;
  private destroyed = false;

  private constructor(
    readonly deviceName: string,
    readonly readOnly: boolean,
    readonly specs: readonly TargetSpec[],
    private readonly lookup: TableDevices,
  ) {}

  static async build(specs: readonly TargetSpec[], opts: TableBuildOptions): Promise<Table> {
    if (specs.length === 0) throw new DmError("EINVAL", "no targets specified");
    const lookup = new TableDevices(opts.devices, opts.readOnly, opts.self);
    const table = new Table(opts.deviceName, opts.readOnly, specs, lookup);
    const scope = opts.registry.container.createChildContainer();
    scope.register(Services.DeviceLookup, { useValue: lookup });
    try {
      let singleton = false;
      for (const spec of specs) {
        if (await table.addTarget(spec, opts, scope, singleton)) singleton = true;
      }
      table.checkDeviceAreas();
    } catch (err) {
      await table.destroy();
      throw err;
    }
    return table;
  }

  /** Returns whether the target just added is a singleton. */
  private async addTarget(
    spec: TargetSpec,
    opts: TableBuildOptions,
    scope: DependencyContainer,
    afterSingleton: boolean,
  ): Promise<boolean> {
    if (afterSingleton) {
      throw new DmError("EINVAL", `target type ${this.specs[0]!.type} must appear alone in table`);
    }
    if (spec.length === 0) throw new DmError("EINVAL", "zero-length target");
    const entry = opts.registry.get(spec.type);
    if (!entry) throw new DmError("EINVAL", `${spec.type}: unknown target type`);
    const fail = (msg: string, errno = "EINVAL") => new DmError(errno, `${spec.type}: ${msg}`);
    const features = entry.info.features;
    const singleton = (features & (TargetFeatures.SINGLETON | TargetFeatures.IMMUTABLE)) !== 0;
    if (singleton && this.targets.length > 0) throw fail("singleton target type must appear alone in table");
    if (features & TargetFeatures.ALWAYS_WRITEABLE && opts.readOnly) {
      throw fail("target type may not be included in a read-only table");
    }
    if (opts.immutableType && spec.type !== opts.immutableType && !(features & TargetFeatures.WILDCARD)) {
      throw fail(`can't replace immutable target type ${opts.immutableType}`);
    }
    const begin = this.size;
    if (spec.start !== begin) throw fail("Gap in table");
    const args = splitArgs(spec.params);
    if (args === null) throw fail("couldn't split parameters");

    const target = opts.registry.instantiate(spec.type, scope)!;
    target.begin = spec.start;
    target.len = spec.length;
    target.table = this;
    try {
      await target.ctr(args);
    } catch (err) {
      // A ctr that opened devices before failing leaves them to the table's releaseAll.
      if (err instanceof TargetError) throw fail(err.message, err.errno);
      throw fail((err as Error).message ?? String(err));
    }
    if (target.maxIoLen > 0xffff_ffff) {
      await target.dtr?.();
      throw fail("Maximum size of target IO is too large");
    }
    this.targets.push(target);
    this.ends.push(spec.start + spec.length);
    return singleton;
  }

  /** Every device area a target uses must lie inside its device (dm-reference §2.9). */
  private checkDeviceAreas(): void {
    for (const target of this.targets) {
      let problem: string | undefined;
      target.iterateDevices?.((dev, start, len) => {
        const lbs = dev.logicalBlockSize >> 9;
        if (start + len > dev.sizeSectors) {
          problem = `${dev.displayName} too small for target: start=${start}, len=${len}, dev_size=${dev.sizeSectors}`;
        } else if (lbs > 1 && start % lbs !== 0) {
          problem = `${dev.displayName}: start=${start} not aligned to h/w logical block size ${dev.logicalBlockSize} of ${dev.displayName}`;
        } else if (lbs > 1 && len % lbs !== 0) {
          problem = `${dev.displayName}: len=${len} not aligned to h/w logical block size ${dev.logicalBlockSize} of ${dev.displayName}`;
        }
        return problem !== undefined;
      });
      if (problem) throw new DmError("EINVAL", problem);
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

  /** Supported only if every target takes at least one duplicate of the op (dm-reference §2.11). */
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

  /** The first immutable target type in this table, if any (it binds the device's future tables). */
  immutableType(registry: TargetRegistry): string | undefined {
    const spec = this.specs.find((s) => (registry.get(s.type)?.info.features ?? 0) & TargetFeatures.IMMUTABLE);
    return spec?.type;
  }
}
