/**
 * thin: `thin <pool dev> <dev id> [<external origin dev>]` (dm-thin.c: thin_ctr, thin_bio_map,
 * thin_endio, thin_status). A thin device maps each block of its own to a data block of the pool.
 *
 * The map path answers what it can from metadata already in memory: a read or write to a block
 * mapped to a data block no snapshot shares goes straight to the data device. Everything else
 * (unmapped blocks, shared blocks, lookups that need I/O, flushes, FUA writes, discards) is held
 * in the bio prison under its virtual block and handed to the pool's worker (thin-worker.ts),
 * while later I/O to the same block waits in that cell.
 */
import type { Bio } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { isStackable } from "../../core/devices/shared-devices.js";
import { target } from "../../core/registry.js";
import { type DeviceLookup, Services } from "../../core/services.js";
import {
  type DeviceAreaCallback,
  EndIoResult,
  MapResult,
  type StatusType,
  Target,
  TargetError,
} from "../../core/target.js";
import type { WorkQueues } from "../../core/work-queue.js";
import type { DeferredEntry } from "./deferred-set.js";
import type { ThinDevice } from "./metadata/thin-metadata.js";
import { formatThinStatus, parseDevId } from "./params.js";
import type { Pool } from "./pool.js";
import { poolByName, releasePool } from "./pool-registry.js";
import { THIN_VERSION } from "./pool-target.js";
import { ThinWorker } from "./thin-worker.js";

/** Per-bio state (struct dm_thin_endio_hook): the all-I/O entry a remapped bio holds. */
export interface ThinIoContext {
  allIo: DeferredEntry<() => void> | null;
}

@target({ name: "thin", version: THIN_VERSION, inject: [Services.DeviceLookup, Services.WorkQueues] })
export class ThinTarget extends Target<ThinIoContext> {
  pool!: Pool;
  td!: ThinDevice;
  private poolDev!: BlockDevice;
  private origin: BlockDevice | null = null;
  private devId = 0;
  private worker!: ThinWorker;

  constructor(
    private readonly devices: DeviceLookup,
    private readonly queues: WorkQueues,
  ) {
    super();
  }

  async ctr(args: string[]): Promise<void> {
    if (args.length !== 2 && args.length !== 3) throw new TargetError("Invalid argument count");
    if (args.length === 3) {
      if (args[0] === args[2]) throw new TargetError("Error setting origin device");
      try {
        this.origin = await this.devices.get(args[2]!, "r");
      } catch (err) {
        throw new TargetError("Error opening origin device", errnoOf(err));
      }
    }
    try {
      this.poolDev = await this.devices.get(args[0]!, this.table.readOnly ? "r" : "rw");
    } catch (err) {
      throw new TargetError("Error opening pool device", errnoOf(err));
    }
    const devId = parseDevId(args[1]!);
    if (devId === null) throw new TargetError("Invalid device id");
    this.devId = devId;
    if (!isStackable(this.poolDev)) throw new TargetError("Couldn't get pool mapped device");
    const pool = poolByName(this.queues, this.poolDev.name);
    if (!pool) throw new TargetError("Couldn't find pool object");
    pool.refs++;
    this.pool = pool;
    try {
      await this.attach(pool, devId);
    } catch (err) {
      // The core destroys only targets whose constructor succeeded: let go of the pool here.
      await releasePool(this.queues, pool);
      throw err;
    }
  }

  private async attach(pool: Pool, devId: number): Promise<void> {
    if (pool.mode === "fail") throw new TargetError("Couldn't open thin device, Pool is in fail mode");
    try {
      this.td = await pool.pmd.openThin(devId);
    } catch (err) {
      throw new TargetError("Couldn't open thin internal device", errnoOf(err));
    }
    this.maxIoLen = pool.blockSize;
    this.numFlushBios = 1;
    if (pool.features.discardEnabled) this.numDiscardBios = 1;
    if (pool.suspended) {
      this.td.close();
      throw new TargetError("Unable to activate thin device while pool is suspended");
    }
    this.worker = new ThinWorker(pool, this.td, this.origin);
    await this.worker.refreshHighest();
    pool.thins.add(this);
  }

  override async dtr(): Promise<void> {
    this.pool.thins.delete(this);
    await this.worker.drain();
    this.td.close();
    await releasePool(this.queues, this.pool);
  }

  override newMapContext(): ThinIoContext {
    return { allIo: null };
  }

  /** thin_bio_map: mapped and unshared goes straight to the data device; the rest to the worker. */
  map(bio: Bio): MapResult {
    if (this.worker.requeueMode) return MapResult.REQUEUE;
    if (this.pool.mode === "fail") return MapResult.KILL;
    if (bio.sectors > 0) bio.sector -= this.begin;
    return this.worker.route(bio) ? MapResult.REMAPPED : MapResult.SUBMITTED;
  }

  /** thin_endio: a remapped bio is no longer in flight to its data block. */
  override endIo(_bio: Bio, ctx: ThinIoContext): EndIoResult {
    if (ctx.allIo) {
      const entry = ctx.allIo;
      ctx.allIo = null;
      for (const work of this.pool.allIo.dec(entry)) work();
    }
    return EndIoResult.DONE;
  }

  /** thin_presuspend: a noflush suspend pushes back the bios that wait (do_noflush_start). */
  override presuspend(): void {
    if (this.table.noflushSuspending) this.worker.startRequeue();
  }

  /** thin_postsuspend: the worker's work for this device is done; requeueing stops. */
  override async postsuspend(): Promise<void> {
    await this.worker.drain();
    this.worker.stopRequeue();
  }

  // ---- what the pool asks of its active thin devices (ActiveThin) ----

  /** The pool aborted its transaction: mappings and details are the last commit's again. */
  afterAbort(): Promise<void> {
    return this.worker.afterAbort();
  }

  /** pool_suspend_active_thins: dm_internal_suspend_noflush of this device. */
  suspendInternally(): Promise<void> {
    return this.table.internalSuspend({ noflush: true });
  }

  /** pool_resume_active_thins: dm_internal_resume. */
  resumeInternally(): void {
    this.table.internalResume();
  }

  override status(type: StatusType): string {
    if (type === "table") {
      return `${this.poolDev.tableName} ${this.devId}${this.origin ? ` ${this.origin.tableName}` : ""}`;
    }
    return formatThinStatus(this.pool.mode, this.td.mappedBlocks, this.worker.highest, this.pool.blockSize);
  }

  /** thin_iterate_devices: the pool device as far as its bound table goes (not this device's length). */
  override iterateDevices(fn: DeviceAreaCallback): boolean {
    const blocks = Math.floor(this.pool.controlLen / this.pool.blockSize);
    return blocks > 0 && fn(this.poolDev, 0, blocks * this.pool.blockSize) === true;
  }
}

function errnoOf(err: unknown): string {
  const e = err as { errno?: unknown; code?: unknown };
  if (typeof e?.errno === "string") return e.errno;
  return typeof e?.code === "string" && /^E[A-Z0-9]+$/.test(e.code) ? e.code : "EINVAL";
}
