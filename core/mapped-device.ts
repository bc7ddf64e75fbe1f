/**
 * A mapped device: a name, an active (live) and an inactive table, suspend/resume that really
 * quiesces I/O, an event counter, an open count (dm.c: struct mapped_device, dm_suspend, dm_resume).
 *
 * Bios enter through `submit`. While the device is suspended (or has no live table) they wait on
 * `deferred`, in order, and never fail; otherwise a `DmIo` maps them synchronously through the live
 * table. Every state transition runs under one mutex, as the kernel's suspend_lock.
 */
import { type Bio, BioFlags } from "./bio.js";
import type { BlockDevice } from "./devices/block-device.js";
import { isStackable, type SharedDevices, type StackableDevice } from "./devices/shared-devices.js";
import { DmIo, type DmIoOwner } from "./dm-io.js";
import { DmError } from "./errors.js";
import type { Logger } from "./logger.js";
import { Mutex } from "./mutex.js";
import type { TargetRegistry } from "./registry.js";
import { type QueueLimits, Table } from "./table.js";
import type { Target } from "./target.js";
import type { TargetSpec } from "./table-text.js";

/** The device-mapper major number udm reports for its devices. */
export const DM_MAJOR = 253;

export interface MappedDeviceEnv {
  registry: TargetRegistry;
  devices: SharedDevices;
  logger: Logger;
  /** The last opener of a device marked for deferred removal has gone: remove it now. */
  lastClosed?(device: MappedDevice): Promise<void>;
}

export interface SuspendOptions {
  /** Let targets push I/O back (REQUEUE) to be retried after resume instead of draining it. */
  noflush?: boolean;
}

/**
 * Bios submitted to mapped devices while one is being mapped on this thread, in order (the
 * kernel's current->bio_list, __submit_bio_noacct): a stack of devices is walked by the loop in
 * `submit`, not by recursion, so its height costs no JS stack.
 */
let submitting = false;
const submitQueue: { device: MappedDevice; bio: Bio }[] = [];

export class MappedDevice implements StackableDevice, DmIoOwner {
  live: Table | null = null;
  inactive: Table | null = null;
  /** A new device is suspended until its first resume. */
  suspended = true;
  noflushSuspending = false;
  readOnly = false;
  eventNr = 0;
  /** Opens through the core: NBD connections, other devices' tables. */
  private opens = 0;
  /**
   * Openers the core cannot see, counted by whoever owns them: the users of a kernel block device
   * that stands for this one (udmd's attach), which are this device's openers as much as an NBD
   * client is. Null: none.
   */
  private outsideOpeners: (() => number) | null = null;
  removed = false;
  /**
   * Set when the device mapper shuts down: a bio that would wait for a resume fails instead, so
   * nothing above waits for I/O queued here.
   */
  failQueuedIo = false;
  /** `remove --deferred` while open: removed when the last opener closes (DMF_DEFERRED_REMOVE). */
  deferredRemove = false;
  /** Mapped devices whose tables hold this one, with how many of their tables do. */
  private readonly holdersByDevice = new Map<StackableDevice, number>();

  /** New bios wait here while blocked: the kernel's md->deferred. */
  private deferred: Bio[] = [];
  private blockIo = true;
  /** Nesting count of internal suspends (snapshot handover quiescing this origin). */
  private internalSuspends = 0;
  /** DmIos in flight: what suspend waits for. */
  private pending = 0;
  private idleWaiters: (() => void)[] = [];
  private eventWaiters: (() => void)[] = [];
  /** The live table's immutable target type (md->immutable_target_type), reset at every swap. */
  private immutableType: string | undefined;
  /**
   * The device's queue limits: none until the first successful load sets the device up
   * (dm_setup_md_queue), then those of the table bound at each swap.
   */
  private limits: QueueLimits | null = null;
  private readonly mutex = new Mutex();

  constructor(
    public name: string,
    public uuid: string,
    readonly minor: number,
    private readonly env: MappedDeviceEnv,
  ) {}

  // ---- BlockDevice facet: how other tables (stacking) and clients see this device ----

  get tableName(): string {
    return `${DM_MAJOR}:${this.minor}`;
  }
  get displayName(): string {
    return `dm-${this.minor}`;
  }
  get devno(): { major: number; minor: number } {
    return { major: DM_MAJOR, minor: this.minor };
  }
  get sizeSectors(): number {
    return this.live?.size ?? 0;
  }
  /** The logical block size of the devices underneath (512 before any table). */
  get logicalBlockSize(): number {
    return this.limits?.logicalBlockSize ?? 512;
  }
  get supportsDiscard(): boolean {
    return this.live?.supportsDiscard ?? false;
  }
  get supportsWriteZeroes(): boolean {
    return this.live?.supportsWriteZeroes ?? false;
  }

  /** dm's open count: opens through the core plus the outside openers. */
  get openCount(): number {
    return this.opens + (this.outsideOpeners?.() ?? 0);
  }

  /** Count the openers of something that stands for this device (null: stop counting them). */
  setOutsideOpeners(count: (() => number) | null): void {
    this.outsideOpeners = count;
  }

  /**
   * Whoever counts the outside openers saw the last of them go: for a device marked for deferred
   * removal this is a last close, as in close().
   */
  async outsideOpenersClosed(): Promise<void> {
    if (this.openCount === 0 && this.deferredRemove && !this.removed) await this.env.lastClosed?.(this);
  }

  open(holder?: StackableDevice): void {
    this.opens++;
    if (holder) this.holdersByDevice.set(holder, (this.holdersByDevice.get(holder) ?? 0) + 1);
  }

  async close(holder?: StackableDevice): Promise<void> {
    if (this.opens > 0) this.opens--;
    const held = holder ? this.holdersByDevice.get(holder) : undefined;
    if (held !== undefined) {
      if (held > 1) this.holdersByDevice.set(holder!, held - 1);
      else this.holdersByDevice.delete(holder!);
    }
    // dm_blk_close: the last close of a device marked for deferred removal removes it. A table
    // (holder) lets go of it inside the shared-devices lock that the removal needs: the removal
    // then goes on by itself (it logs its own failure); any other closer waits for it.
    if (this.openCount === 0 && this.deferredRemove && !this.removed) {
      const removal = this.env.lastClosed?.(this);
      if (!holder) await removal;
    }
  }

  /** Open, or held by another device's table: what `remove` refuses and `--deferred` marks. */
  get inUse(): boolean {
    return this.openCount > 0 || this.holdersByDevice.size > 0;
  }

  get holders(): StackableDevice[] {
    return [...this.holdersByDevice.keys()];
  }

  lowerDevices(): StackableDevice[] {
    const lowers = new Set<StackableDevice>();
    for (const table of [this.live, this.inactive]) {
      for (const d of table?.deps ?? []) if (isStackable(d)) lowers.add(d);
    }
    return [...lowers];
  }

  // ---- I/O ----

  /**
   * Take a bio (already marked in flight by its submitter). While the device is blocked (or has
   * no live table) it is queued; otherwise it is checked against the live table (end of device,
   * read-only, whether the op is supported at all: discard/write-zeroes need every target of the
   * table to take them; blk-core.c: submit_bio_noacct) and mapped. (The kernel's block layer makes those checks before dm
   * sees the bio, i.e. also for bios that then queue; udm checks queued bios when released.)
   */
  submit(bio: Bio): void {
    if (submitting) {
      submitQueue.push({ device: this, bio });
      return;
    }
    submitting = true;
    try {
      this.submitNow(bio);
      for (let i = 0; i < submitQueue.length; i++) {
        const next = submitQueue[i]!;
        next.device.submitNow(next.bio);
      }
    } finally {
      submitQueue.length = 0;
      submitting = false;
    }
  }

  private submitNow(bio: Bio): void {
    if (this.removed) {
      bio.complete("ENXIO");
      return;
    }
    const table = this.live;
    if (this.blockIo || table === null) {
      if (this.failQueuedIo) bio.complete("EIO");
      else if (bio.flags & BioFlags.NOWAIT) bio.complete("EAGAIN");
      else if (bio.flags & BioFlags.RAHEAD) bio.complete("EIO");
      else this.deferred.push(bio);
      return;
    }
    if (bio.op !== "flush" && bio.sector + bio.sectors > table.size) {
      bio.complete("EIO");
      return;
    }
    if (this.readOnly && bio.op !== "read" && !(bio.op === "flush")) {
      bio.complete("EPERM");
      return;
    }
    if ((bio.op === "discard" && !table.supportsDiscard) || (bio.op === "write-zeroes" && !table.supportsWriteZeroes)) {
      bio.complete("EOPNOTSUPP");
      return;
    }
    if (bio.sectors === 0 && bio.op !== "flush" && !bio.isPreflush) {
      bio.complete("ok");
      return;
    }
    this.pending++;
    new DmIo(this, bio).process(table);
  }

  ioDone(_io: DmIo): void {
    if (--this.pending === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  requeue(bio: Bio): void {
    this.deferred.unshift(bio);
  }

  resubmit(bio: Bio): void {
    this.submit(bio);
  }

  targetBug(target: Target<unknown>, message: string): void {
    this.env.logger.error("target bug", { device: this.name, target: target.constructor.name, message });
  }

  /** Bios in flight inside the device (mapped, not yet completed). */
  get inFlight(): number {
    return this.pending;
  }

  /** Bios queued behind a suspend. */
  get queued(): number {
    return this.deferred.length;
  }

  private async waitIdle(): Promise<void> {
    while (this.pending > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
  }

  // ---- Events ----

  bumpEvent(): void {
    this.eventNr = (this.eventNr + 1) >>> 0;
    const waiters = this.eventWaiters;
    this.eventWaiters = [];
    for (const wake of waiters) wake();
  }

  /** Resolves with the current event number once it differs from `eventNr` (DM_DEV_WAIT). */
  async waitEvent(eventNr: number): Promise<number> {
    while (this.eventNr === eventNr && !this.removed) await new Promise<void>((r) => this.eventWaiters.push(r));
    return this.eventNr;
  }

  // ---- Table lifecycle ----

  /**
   * DM_TABLE_LOAD: build and validate (constructors run now) into the inactive slot. The first
   * table a device ever loads also sets up its queue limits, so its device areas are checked now;
   * later tables are checked when they are swapped in at resume (table_load, dm_setup_md_queue).
   */
  load(specs: readonly TargetSpec[], opts: { readOnly?: boolean } = {}): Promise<void> {
    return this.mutex.run(async () => {
      this.assertPresent();
      const table = await Table.build(specs, {
        deviceName: this.name,
        readOnly: opts.readOnly ?? false,
        registry: this.env.registry,
        devices: this.env.devices,
        self: this,
        immutableType: this.immutableType,
        owner: this,
      });
      if (this.limits === null) {
        try {
          this.limits = table.calculateQueueLimits();
        } catch (err) {
          await table.destroy();
          throw err;
        }
      }
      const old = this.inactive;
      this.inactive = table;
      await old?.destroy();
    });
  }

  /** DM_TABLE_CLEAR. */
  clear(): Promise<void> {
    return this.mutex.run(async () => {
      const old = this.inactive;
      this.inactive = null;
      await old?.destroy();
    });
  }

  suspend(opts: SuspendOptions = {}): Promise<void> {
    return this.mutex.run(() => this.suspendLocked(opts));
  }

  private async suspendLocked(opts: SuspendOptions): Promise<void> {
    this.assertPresent();
    if (this.suspended) return;
    const targets = this.live?.targets ?? [];
    if (opts.noflush) this.noflushSuspending = true;
    for (const t of targets) await t.presuspend?.();
    // From here new bios queue; then wait for everything already inside to finish.
    this.blockIo = true;
    await this.waitIdle();
    this.suspended = true;
    this.noflushSuspending = false;
    for (const t of targets) await t.postsuspend?.();
  }

  /**
   * DM_DEV_SUSPEND (resume): swap in the inactive table if there is one (suspending first), run
   * preresume (which may veto: the device then stays suspended) and resume, release queued bios
   * in order, and destroy the old table.
   *
   * The swap computes the new table's queue limits, checking its device areas (dm_swap_table);
   * if that fails the new table is destroyed and the device stays suspended with its old table.
   */
  resume(opts: SuspendOptions = {}): Promise<void> {
    return this.mutex.run(async () => {
      this.assertPresent();
      const incoming = this.inactive;
      let old: Table | null = null;
      if (incoming) {
        this.inactive = null;
        let limits: QueueLimits;
        try {
          if (!this.suspended) await this.suspendLocked(opts);
          // A table without data devices keeps the live table's limits.
          limits =
            this.live && this.limits && incoming.hasNoDataDevices ? this.limits : incoming.calculateQueueLimits();
        } catch (err) {
          await incoming.destroy();
          throw err;
        }
        old = this.live;
        old?.bind(null);
        this.live = incoming;
        this.limits = limits;
        this.readOnly = incoming.readOnly;
        incoming.bind(() => this.bumpEvent());
        // __bind: md->immutable_target_type = dm_table_get_immutable_target_type(t).
        this.immutableType = incoming.immutableTargetType;
      }
      try {
        if (this.suspended && this.live && this.live.size > 0) await this.resumeLocked(this.live);
      } finally {
        // The swap has happened: a failure to tear down the old table is logged, not reported as
        // a failed resume (callers would take the new table for not live).
        await old?.destroy().catch((err: unknown) => {
          this.env.logger.error("destroying the replaced table failed", { device: this.name, error: String(err) });
        });
      }
    });
  }

  private async resumeLocked(table: Table): Promise<void> {
    for (const t of table.targets) {
      try {
        await t.preresume?.();
      } catch (err) {
        const type = table.specs[table.targets.indexOf(t)]!.type;
        throw new DmError(
          (err as { errno?: string }).errno ?? "EINVAL",
          `${type}: preresume failed, error = ${(err as Error).message}`,
        );
      }
    }
    for (const t of table.targets) await t.resume?.();
    this.suspended = false;
    if (this.internalSuspends === 0) this.releaseDeferred();
  }

  private releaseDeferred(): void {
    this.blockIo = false;
    const queued = this.deferred;
    this.deferred = [];
    for (const bio of queued) this.submit(bio);
  }

  /**
   * dm_internal_suspend_fast: block new bios and drain in-flight ones; no target hooks, no lock.
   * With `noflush`, dm_internal_suspend_noflush: under the device's lock, the first internal
   * suspend of a device the user has not suspended runs the live targets' presuspend and
   * postsuspend hooks around the drain, as a noflush suspend does (REQUEUE pushes bios back).
   */
  async internalSuspend(opts: SuspendOptions = {}): Promise<void> {
    if (!opts.noflush) {
      this.internalSuspends++;
      this.blockIo = true;
      await this.waitIdle();
      return;
    }
    await this.mutex.run(async () => {
      if (this.internalSuspends++ > 0 || this.suspended || this.removed) return;
      const targets = this.live?.targets ?? [];
      this.noflushSuspending = true;
      for (const t of targets) await t.presuspend?.();
      this.blockIo = true;
      await this.waitIdle();
      this.noflushSuspending = false;
      for (const t of targets) await t.postsuspend?.();
    });
  }

  /** dm_internal_resume_fast: the last internal resume of a device not suspended by the user releases its I/O. */
  internalResume(): void {
    if (this.internalSuspends === 0) throw new Error(`${this.name}: internal resume without internal suspend`);
    if (--this.internalSuspends > 0 || this.suspended || this.removed) return;
    this.releaseDeferred();
  }

  /**
   * Tear the device down (DM_DEV_REMOVE once the caller has checked the open count): targets are
   * told to suspend, in-flight I/O drains, queued I/O fails, both tables are destroyed.
   */
  remove(): Promise<void> {
    return this.mutex.run(async () => {
      this.assertPresent();
      const inactive = this.inactive;
      this.inactive = null;
      await inactive?.destroy();
      const live = this.live;
      if (live && !this.suspended) {
        for (const t of live.targets) await t.presuspend?.();
      }
      this.blockIo = true;
      await this.waitIdle();
      if (live && !this.suspended) {
        for (const t of live.targets) await t.postsuspend?.();
      }
      this.suspended = true;
      this.removed = true;
      for (const bio of this.deferred.splice(0)) bio.complete("EIO");
      this.live = null;
      live?.bind(null);
      await live?.destroy();
      this.bumpEvent();
    });
  }

  /** From now on, fail bios that would wait for a resume, and those waiting now (shutdown). */
  failQueued(): void {
    this.failQueuedIo = true;
    for (const bio of this.deferred.splice(0)) bio.complete("EIO");
  }

  private assertPresent(): void {
    if (this.removed) throw new DmError("ENXIO", `${this.name}: device has been removed`);
  }

  /** Devices the live (or inactive) table opened, for `deps`. */
  deps(inactive = false): readonly BlockDevice[] {
    return (inactive ? this.inactive : this.live)?.deps ?? [];
  }
}
