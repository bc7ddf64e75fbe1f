/**
 * thin-pool: `thin-pool <metadata dev> <data dev> <data block size> <low water mark>
 * [<#features> <feature>...]` (dm-thin.c: pool_ctr, pool_map, pool_status, pool_message, the
 * suspend and resume hooks). The pool device itself only passes I/O to the data device; the thin
 * devices do the mapping. Its table holds the pool, which outlives reloads of that table.
 */
import type { Bio } from "../../core/bio.js";
import type { Copier } from "../../core/copier.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { Logger } from "../../core/logger.js";
import { target } from "../../core/registry.js";
import { type Clock, type DeviceLookup, Services } from "../../core/services.js";
import {
  type DeviceAreaCallback,
  MapResult,
  type StatusFlags,
  type StatusType,
  Target,
  TargetError,
  TargetFeatures,
} from "../../core/target.js";
import type { WorkQueues } from "../../core/work-queue.js";
import { THIN_METADATA_MAX_SECTORS, ThinPoolMetadata } from "./metadata/thin-metadata.js";
import {
  POOL_MESSAGES,
  type PoolFeatures,
  defaultPoolFeatures,
  formatPoolStatus,
  formatPoolTable,
  metadataLowWater,
  parseDevId,
  parsePoolArgs,
  parsePoolNumbers,
  parseTransactionId,
} from "./params.js";
import { PersistentDataError } from "./persistent-data/errors.js";
import { Pool } from "./pool.js";
import { addPool, poolByMetadata, poolByName, releasePool } from "./pool-registry.js";

/** The kernel's version of thin-pool and thin (target_type.version). */
export const THIN_VERSION: readonly [number, number, number] = [1, 23, 0];

@target({
  name: "thin-pool",
  version: THIN_VERSION,
  features: TargetFeatures.SINGLETON | TargetFeatures.ALWAYS_WRITEABLE | TargetFeatures.IMMUTABLE,
  inject: [Services.DeviceLookup, Services.WorkQueues, Services.Copier, Services.Logger, Services.Clock],
})
export class ThinPoolTarget extends Target {
  pool!: Pool;
  private metadataDev!: BlockDevice;
  private dataDev!: BlockDevice;
  private lowWaterBlocks = 0;
  private requested!: PoolFeatures;
  /** The features the pool gets at resume (pt->adjusted_pf): the requested ones, less what the devices cannot do. */
  private adjusted!: PoolFeatures;

  constructor(
    private readonly devices: DeviceLookup,
    private readonly queues: WorkQueues,
    private readonly copier: Copier,
    private readonly logger: Logger,
    private readonly clock: Clock,
  ) {
    super();
  }

  async ctr(args: string[]): Promise<void> {
    const parsed = parsePoolArgs(args);
    const readOnly = parsed.features.readOnly;
    try {
      this.metadataDev = await this.devices.get(parsed.metadataDev, readOnly ? "r" : "rw");
    } catch (err) {
      throw new TargetError("Error opening metadata block device", errnoOf(err));
    }
    if (this.metadataDev.sizeSectors > THIN_METADATA_MAX_SECTORS) {
      this.logger.warn(
        `Metadata device ${this.metadataDev.displayName} is larger than ${THIN_METADATA_MAX_SECTORS} sectors: excess space will not be used.`,
      );
    }
    try {
      this.dataDev = await this.devices.get(parsed.dataDev, "rw");
    } catch (err) {
      throw new TargetError("Error getting data device", errnoOf(err));
    }
    // A reload is how a pool learns its devices grew (a file extended by truncate, an LV by
    // lvextend): their sizes are read again.
    await refreshSize(this.metadataDev);
    await refreshSize(this.dataDev);
    const { blockSize, lowWaterBlocks } = parsePoolNumbers(args);
    const { pool, created } = await this.findPool(blockSize, readOnly);
    if (!created && parsed.features.discardEnabled !== pool.features.discardEnabled) {
      await releasePool(this.queues, pool);
      throw new TargetError("Discard support cannot be disabled once enabled");
    }
    this.pool = pool;
    this.lowWaterBlocks = lowWaterBlocks;
    this.requested = parsed.features;
    this.adjusted = { ...parsed.features };
    // disable_passdown_if_not_supported: the status then says no_discard_passdown.
    if (this.adjusted.discardPassdown && !this.dataDev.supportsDiscard) {
      this.logger.warn(`Data device (${this.dataDev.displayName}) discard unsupported: Disabling discard passdown.`);
      this.adjusted.discardPassdown = false;
    }
    this.numFlushBios = 1;
    if (this.adjusted.discardEnabled && this.adjusted.discardPassdown) this.numDiscardBios = 1;
    pool.pmd.registerMetadataThreshold(metadataLowWater(this.metadataBlocks()), () => {
      this.logger.warn(`${pool.name}: reached low water mark for metadata device: sending event.`);
      pool.event();
    });
  }

  /** __pool_find: the pool this table's devices and name belong to, or a new one. */
  private async findPool(blockSize: number, readOnly: boolean): Promise<{ pool: Pool; created: boolean }> {
    const name = this.table.deviceName;
    let pool = poolByMetadata(this.queues, this.metadataDev);
    if (pool) {
      if (pool.name !== name) throw new TargetError("metadata device already in use by a pool", "EBUSY");
      if (pool.dataDevice !== this.dataDev) throw new TargetError("data device already in use by a pool", "EBUSY");
      pool.refs++;
      return { pool, created: false };
    }
    pool = poolByName(this.queues, name);
    if (pool) {
      if (pool.metadataDevice !== this.metadataDev || pool.dataDevice !== this.dataDev) {
        throw new TargetError("different pool cannot replace a pool");
      }
      pool.refs++;
      return { pool, created: false };
    }
    let pmd: ThinPoolMetadata;
    try {
      pmd = await ThinPoolMetadata.open(this.metadataDev, { dataBlockSize: blockSize, format: !readOnly, readOnly });
    } catch (err) {
      this.logger.error(`${name}: ${(err as Error).message}`);
      throw new TargetError("Error creating metadata object", errnoOf(err));
    }
    pool = new Pool(name, this.metadataDev, this.dataDev, blockSize, pmd, defaultPoolFeatures(), {
      worker: this.queues.create(`thin-pool ${name}`, { concurrency: 16 }),
      copier: this.copier.client(`thin-pool ${name}`),
      clock: this.clock,
      logger: this.logger,
    });
    addPool(this.queues, pool);
    return { pool, created: true };
  }

  override async dtr(): Promise<void> {
    if (this.pool.control === this.table) this.pool.control = null;
    await releasePool(this.queues, this.pool);
  }

  map(bio: Bio): MapResult {
    bio.device = this.dataDev;
    return MapResult.REMAPPED;
  }

  /** pool_presuspend: the thin devices are suspended first (pool_suspend_active_thins). */
  override presuspend(): Promise<void> {
    return this.pool.suspendThins();
  }

  override presuspendUndo(): void {
    this.pool.resumeThins();
  }

  /** pool_postsuspend: no more periodic commits; what the worker has started finishes; commit. */
  override async postsuspend(): Promise<void> {
    this.pool.stopWaker();
    await this.pool.services.worker.flush();
    await this.pool.commit().catch(() => {});
    await this.pool.commitsDone();
  }

  /**
   * pool_preresume: this table takes control (its features, mode and low water mark), and the
   * data and metadata space maps grow to the devices' sizes.
   */
  override async preresume(): Promise<void> {
    const pool = this.pool;
    await pool.commitsDone();
    pool.control = this.table;
    pool.controlLen = this.len;
    pool.features = { ...this.adjusted };
    pool.lowWaterBlocks = this.lowWaterBlocks;
    pool.setMode(this.requested.readOnly ? "read-only" : "write");
    if (pool.mode === "fail") return;
    let changed = false;
    const dataBlocks = Math.floor(this.len / pool.blockSize);
    const sbData = pool.pmd.dataDevSize();
    if (dataBlocks < sbData) {
      throw new TargetError(`${pool.name}: pool target (${dataBlocks} blocks) too small: expected ${sbData}`);
    }
    if (dataBlocks > sbData && !pool.pmd.needsCheck && !pool.pmd.readOnly) {
      await this.resize("dm_pool_resize_data_dev", () => pool.pmd.resizeDataDev(dataBlocks));
      changed = true;
    }
    const metadataBlocks = this.metadataBlocks();
    const sbMetadata = pool.pmd.metadataDevSize();
    if (metadataBlocks < sbMetadata) {
      throw new TargetError(
        `${pool.name}: metadata device (${metadataBlocks} blocks) too small: expected ${sbMetadata}`,
      );
    }
    if (metadataBlocks > sbMetadata && !pool.pmd.needsCheck && !pool.pmd.readOnly) {
      if (pool.mode === "out-of-metadata-space") pool.setMode("write");
      await this.resize("dm_pool_resize_metadata_dev", () => pool.pmd.resizeMetadataDev(metadataBlocks));
      changed = true;
    }
    if (changed) await pool.commit().catch(() => {});
  }

  private async resize(op: string, grow: () => Promise<void>): Promise<void> {
    try {
      await grow();
    } catch (err) {
      await this.pool.metadataFailed(op, err);
      throw new TargetError(`${this.pool.name}: ${op} failed`, errnoOf(err));
    }
  }

  /** pool_resume: parked work goes again, then the thin devices resume and the waker starts. */
  override resume(): void {
    const pool = this.pool;
    pool.checkDataSpace();
    pool.retryParked();
    pool.resumeThins();
    pool.startWaker();
  }

  private metadataBlocks(): number {
    return Math.floor(Math.min(this.metadataDev.sizeSectors, THIN_METADATA_MAX_SECTORS) / 8);
  }

  override status(type: StatusType, flags: StatusFlags): string {
    const pool = this.pool;
    if (type === "table") {
      return formatPoolTable(
        this.metadataDev.tableName,
        this.dataDev.tableName,
        pool.blockSize,
        this.lowWaterBlocks,
        this.requested,
      );
    }
    // The kernel commits first so the counts are current; here they are current in memory
    // anyway, and the commit (a side effect userspace may count on) runs in the background.
    if (!flags.noflush && !this.table.suspended && pool.mode !== "fail") pool.commit().catch(() => {});
    const pmd = pool.pmd;
    return formatPoolStatus({
      transactionId: pmd.transactionId,
      usedMetadataBlocks: pmd.metadataDevSize() - pmd.freeMetadataBlocks(),
      totalMetadataBlocks: pmd.metadataDevSize(),
      usedDataBlocks: pmd.dataDevSize() - pmd.freeDataBlocks(),
      totalDataBlocks: pmd.dataDevSize(),
      heldRoot: pmd.metadataSnapRoot,
      mode: pool.mode,
      features: pool.features,
      needsCheck: pmd.needsCheck,
      metadataLowWater: metadataLowWater(this.metadataBlocks()),
    });
  }

  /** pool_message: the six messages; a change is committed at once. */
  override async message(args: string[]): Promise<undefined> {
    const pool = this.pool;
    if (pool.worseThan("out-of-data-space")) {
      throw new TargetError(
        `${pool.name}: unable to service pool target messages in READ_ONLY or FAIL mode`,
        "EOPNOTSUPP",
      );
    }
    const name = args[0]!.toLowerCase();
    const argc = POOL_MESSAGES[name];
    if (argc === undefined) throw new TargetError(`Unrecognised thin pool target message received: ${args[0]}`);
    if (args.length !== argc) {
      throw new TargetError(`Message received with ${args.length} arguments instead of ${argc}.`);
    }
    const devId = (i: number): number => {
      const id = parseDevId(args[i]!);
      if (id === null) throw new TargetError(`Message received with invalid device id: ${args[i]}`);
      return id;
    };
    const pmd = pool.pmd;
    try {
      switch (name) {
        case "create_thin":
          await pmd.createThin(devId(1));
          break;
        case "create_snap":
          await pmd.createSnap(devId(1), devId(2));
          break;
        case "delete":
          await pmd.deleteThin(devId(1));
          break;
        case "set_transaction_id": {
          const current = parseTransactionId(args[1]!);
          if (current === null) throw new TargetError(`set_transaction_id message: Unrecognised id ${args[1]}.`);
          const next = parseTransactionId(args[2]!);
          if (next === null) throw new TargetError(`set_transaction_id message: Unrecognised new id ${args[2]}.`);
          await pmd.setTransactionId(current, next);
          break;
        }
        case "reserve_metadata_snap":
          await pool.commit().catch(() => {});
          await pmd.reserveMetadataSnap();
          break;
        case "release_metadata_snap":
          await pmd.releaseMetadataSnap();
          break;
      }
    } catch (err) {
      if (err instanceof PersistentDataError) throw new TargetError(messageFailure(name, args, err), err.errno);
      throw err;
    }
    await pool.commit().catch(() => {});
    return undefined;
  }

  override iterateDevices(fn: DeviceAreaCallback): boolean {
    return fn(this.dataDev, 0, this.len) === true;
  }
}

/** The kernel's warning for a failed message, with the metadata's reason. */
function messageFailure(name: string, args: string[], err: PersistentDataError): string {
  switch (name) {
    case "create_thin":
      return `Creation of new thinly-provisioned device with id ${args[1]} failed: ${err.message}`;
    case "create_snap":
      return `Creation of new snapshot ${args[1]} of device ${args[2]} failed: ${err.message}`;
    case "delete":
      return `Deletion of thin device ${args[1]} failed: ${err.message}`;
    case "set_transaction_id":
      return `Failed to change transaction id from ${args[1]} to ${args[2]}: ${err.message}`;
    default:
      return `${name} message failed: ${err.message}`;
  }
}

/** Read a file's or block device's size again, if it is one that can change (an open fd). */
async function refreshSize(device: BlockDevice): Promise<void> {
  const d = device as BlockDevice & { refreshSize?: () => Promise<number> };
  if (typeof d.refreshSize === "function") await d.refreshSize().catch(() => {});
}

function errnoOf(err: unknown): string {
  const e = err as { errno?: unknown; code?: unknown };
  if (typeof e?.errno === "string") return e.errno;
  return typeof e?.code === "string" && /^E[A-Z0-9]+$/.test(e.code) ? e.code : "EINVAL";
}
