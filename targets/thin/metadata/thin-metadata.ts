/**
 * Thin pool metadata (dm-thin-metadata.c), in the kernel's on-disk format: what thin_check,
 * thin_dump and the kernel's dm-thin read and write.
 *
 * Design:
 * - Layers, bottom up, one file each under ../persistent-data: the block manager (4 KiB blocks,
 *   cache, checksummed validators), the transaction manager (copy-on-write shadowing), btrees, and
 *   the two space maps (metadata blocks, counted in themselves; data blocks). This file puts them
 *   together as the kernel's dm_pool_metadata does: a superblock in block 0 holding the roots of
 *   the two space maps, of the two-level mapping tree (dev id → virtual block → data block and
 *   time) and of the device-details tree (dev id → details).
 * - A transaction is everything since the last commit. Nothing the committed superblock points
 *   to is overwritten until `commit` has written the new blocks, flushed, and written the
 *   superblock with FUA, so a crash anywhere before that reopens the previous transaction whole.
 * - Async all the way down: a block that is not cached is read with an await. The pool's lock
 *   serialises changes (one writer) against lookups (many readers); nothing below it locks.
 *   `tryFindBlock` is the map path's non-blocking lookup: cached blocks only, no lock wait.
 * - Numbers are JS numbers (blocks and keys stay far below 2^53); transaction ids are bigints
 *   because userspace sets them to any u64.
 * - Thin devices are held in memory while open or changed (ThinDevice); their details reach the
 *   device-details tree at commit, as in the kernel.
 * - A failed operation leaves the transaction half done: the caller aborts (`abort` rereads the
 *   last commit). If even that fails, every operation fails from then on (fail_io).
 */
import type { BlockDevice } from "../../../core/devices/block-device.js";
import { BlockManager, SECTORS_PER_BLOCK } from "../persistent-data/block-manager.js";
import {
  type BtreeInfo,
  WOULD_BLOCK,
  deleteTree,
  emptyTree,
  findHighestKey,
  le64,
  lookup,
  lookupNext,
  tryLookup,
  walk,
} from "../persistent-data/btree.js";
import { insert } from "../persistent-data/btree-insert.js";
import { remove } from "../persistent-data/btree-remove.js";
import { PersistentDataError, pdError } from "../persistent-data/errors.js";
import { readU64 } from "../persistent-data/space-map.js";
import { DiskSpaceMap } from "../persistent-data/space-map-disk.js";
import { METADATA_MAX_BLOCKS, MetadataSpaceMap } from "../persistent-data/space-map-metadata.js";
import { TransactionManager } from "../persistent-data/transaction-manager.js";
import { DEVICE_DETAILS_SIZE, type DeviceDetails, decodeDeviceDetails, encodeDeviceDetails } from "./device-details.js";
import { MetadataLock } from "./lock.js";
import { dataBlockValueType, packBlockTime, subtreeValueType, unpackBlockTime } from "./mapping.js";
import {
  COMPAT_RO_SUPPORTED,
  INCOMPAT_SUPPORTED,
  NEEDS_CHECK_FLAG,
  SB,
  THIN_SUPERBLOCK_LOCATION,
  decodeSuperblock,
  setHeldRoot,
  superblockValidator,
  writeCommitFields,
  writeFormatFields,
} from "./superblock.js";
import { type MappedRange, ThinDevice, type ThinDeviceOwner, type ThinLookupResult } from "./thin-device.js";

/** THIN_METADATA_BLOCK_SIZE in sectors. */
export const THIN_METADATA_BLOCK_SECTORS = SECTORS_PER_BLOCK;
/** THIN_METADATA_MAX_SECTORS: a bigger metadata device is used up to this size. */
export const THIN_METADATA_MAX_SECTORS = METADATA_MAX_BLOCKS * SECTORS_PER_BLOCK;
/** Thin device ids are 24 bits (dm-thin.c: MAX_DEV_ID). */
export const MAX_DEV_ID = (1 << 24) - 1;

export interface PoolMetadataOptions {
  /** Data block size in sectors; an existing pool must have this one. Omitted: the pool's own. */
  dataBlockSize?: number;
  /** Format the device when its first block is all zeros (otherwise that is EPERM). */
  format?: boolean;
  readOnly?: boolean;
  /** Clean metadata blocks kept in memory. */
  maxCleanBlocks?: number;
}

export class ThinPoolMetadata implements ThinDeviceOwner {
  private bm: BlockManager;
  private tm!: TransactionManager;
  private metadataSm!: MetadataSpaceMap;
  private dataSm!: DiskSpaceMap;
  /** The two-level mapping tree; `tlInfo` its top level alone (dev id → subtree), `blInfo` one device's tree. */
  private info!: BtreeInfo;
  private tlInfo!: BtreeInfo;
  private blInfo!: BtreeInfo;
  private detailsInfo!: BtreeInfo;

  private root = 0;
  private detailsRoot = 0;
  private time = 0;
  private trans = 0n;
  private flags = 0;
  /** The held metadata snapshot's block as the superblock in memory has it (0: none). */
  private held = 0;
  private dataBlockSizeSectors: number;
  private readonly devices = new Map<number, ThinDevice>();
  /** Metadata blocks kept back from what is reported free (commit overhead). */
  private metadataReserve = 0;
  /**
   * Data blocks counted in the running transaction that no mapping refers to yet: allocated with
   * `inFlight` and not inserted (nor given back), or held for a discard passdown. The pool's
   * commits leave them out (commitWithDataInFlight).
   */
  private readonly inFlight = new Set<number>();
  private failIo = false;
  /** Something changed since the pool was opened (commit is a no-op until then). */
  private inService = false;
  private readonly lock = new MetadataLock();
  /** Runs at the start of every commit, before anything is written (the pool flushes its data device). */
  preCommit: (() => Promise<void>) | null = null;

  private constructor(
    readonly device: BlockDevice,
    private readonly options: PoolMetadataOptions,
  ) {
    this.bm = new BlockManager(device, { maxCleanBlocks: options.maxCleanBlocks, readOnly: options.readOnly });
    this.dataBlockSizeSectors = options.dataBlockSize ?? 0;
  }

  /** dm_pool_metadata_open */
  static async open(device: BlockDevice, options: PoolMetadataOptions = {}): Promise<ThinPoolMetadata> {
    const pmd = new ThinPoolMetadata(device, options);
    await pmd.openOrFormat(options.format ?? false);
    await pmd.beginTransaction();
    pmd.setMetadataReserve();
    return pmd;
  }

  // ---- opening and formatting ----

  private async superblockAllZeroes(): Promise<boolean> {
    const data = await this.bm.read(THIN_SUPERBLOCK_LOCATION, null);
    return data.every((byte) => byte === 0);
  }

  private async openOrFormat(format: boolean): Promise<void> {
    if (await this.superblockAllZeroes()) {
      if (!format) throw pdError("EPERM", "metadata device is not formatted");
      await this.formatMetadata();
    } else {
      await this.openMetadata();
    }
  }

  /** __format_metadata + __write_initial_superblock */
  private async formatMetadata(): Promise<void> {
    if (!this.dataBlockSizeSectors) throw pdError("EINVAL", "formatting needs a data block size");
    this.tm = new TransactionManager(this.bm);
    this.metadataSm = await MetadataSpaceMap.create(this.tm, this.bm.nrBlocks, THIN_SUPERBLOCK_LOCATION);
    this.dataSm = await DiskSpaceMap.create(this.tm, 0);
    this.setupBtreeDetails();
    this.root = await emptyTree(this.info);
    this.detailsRoot = await emptyTree(this.detailsInfo);

    await this.dataSm.commit();
    await this.tm.preCommit();
    const sb = this.bm.writeLockZero(THIN_SUPERBLOCK_LOCATION, superblockValidator);
    const sectors = Math.min(this.device.sizeSectors, THIN_METADATA_MAX_SECTORS);
    writeFormatFields(sb, {
      dataBlockSize: this.dataBlockSizeSectors,
      metadataBlockSize: THIN_METADATA_BLOCK_SECTORS,
      metadataNrBlocks: Math.floor(sectors / SECTORS_PER_BLOCK),
    });
    writeCommitFields(sb, this.commitFields());
    await this.tm.commit(THIN_SUPERBLOCK_LOCATION);
  }

  /** __open_metadata */
  private async openMetadata(): Promise<void> {
    const sb = decodeSuperblock(await this.bm.read(THIN_SUPERBLOCK_LOCATION, superblockValidator));
    if (this.options.dataBlockSize !== undefined && sb.dataBlockSize !== this.options.dataBlockSize) {
      throw pdError(
        "EINVAL",
        `changing the data block size (from ${sb.dataBlockSize} to ${this.options.dataBlockSize}) is not supported`,
      );
    }
    const incompat = sb.incompatFlags & ~INCOMPAT_SUPPORTED;
    if (incompat) {
      throw pdError(
        "EINVAL",
        `could not access metadata due to unsupported optional features (${incompat.toString(16)}).`,
      );
    }
    const compatRo = sb.compatRoFlags & ~COMPAT_RO_SUPPORTED;
    if (compatRo && !this.bm.readOnly) {
      throw pdError(
        "EINVAL",
        `could not access metadata RDWR due to unsupported optional features (${compatRo.toString(16)}).`,
      );
    }
    this.tm = new TransactionManager(this.bm);
    this.metadataSm = await MetadataSpaceMap.open(this.tm, sb.metadataSpaceMapRoot);
    this.dataSm = DiskSpaceMap.open(this.tm, sb.dataSpaceMapRoot);
    this.setupBtreeDetails();
  }

  /** __setup_btree_details */
  private setupBtreeDetails(): void {
    const tm = this.tm;
    const data = dataBlockValueType(this.dataSm);
    this.info = { tm, levels: 2, valueType: data };
    this.blInfo = { tm, levels: 1, valueType: data };
    this.tlInfo = { tm, levels: 1, valueType: subtreeValueType(tm, () => this.blInfo) };
    this.detailsInfo = { tm, levels: 1, valueType: { size: DEVICE_DETAILS_SIZE } };
  }

  /** __begin_transaction: the in-memory roots are the superblock's. */
  private async beginTransaction(): Promise<void> {
    const sb = decodeSuperblock(await this.bm.read(THIN_SUPERBLOCK_LOCATION, superblockValidator));
    this.time = sb.time;
    this.root = sb.dataMappingRoot;
    this.detailsRoot = sb.deviceDetailsRoot;
    this.trans = sb.transactionId;
    this.flags = sb.flags;
    this.held = sb.heldRoot;
    this.dataBlockSizeSectors = sb.dataBlockSize;
  }

  /** __set_metadata_reserve: a tenth of the device, at most 4096 blocks (16 MiB). */
  private setMetadataReserve(): void {
    this.metadataReserve = Math.min(4096, Math.floor(this.metadataSm.nrBlocks / 10));
  }

  // ---- commit and abort ----

  private commitFields() {
    return {
      flags: this.flags,
      time: this.time,
      transactionId: this.trans,
      dataMappingRoot: this.root,
      deviceDetailsRoot: this.detailsRoot,
      dataSpaceMapRoot: this.dataSm.root(),
      metadataSpaceMapRoot: this.metadataSm.root(),
    };
  }

  /** __write_changed_details */
  private async writeChangedDetails(): Promise<void> {
    for (const td of this.devices.values()) {
      if (!td.changed) continue;
      this.detailsRoot = (
        await insert(this.detailsInfo, this.detailsRoot, [td.id], encodeDeviceDetails(td.details()))
      ).root;
      if (td.openCount > 0) td.changed = false;
      else this.devices.delete(td.id);
    }
  }

  /** __commit_transaction: details, space maps, then the superblock written last by the transaction manager. */
  private async commitTransaction(): Promise<void> {
    if (!this.inService) return;
    if (this.preCommit) await this.preCommit();
    await this.writeChangedDetails();
    await this.dataSm.commit();
    await this.tm.preCommit();
    // The space map roots are final now: nothing below allocates.
    const sb = await this.bm.writeLock(THIN_SUPERBLOCK_LOCATION, superblockValidator);
    writeCommitFields(sb, this.commitFields());
    await this.tm.commit(THIN_SUPERBLOCK_LOCATION);
  }

  /** dm_pool_commit_metadata */
  commit(): Promise<void> {
    return this.lock.write(async () => {
      this.checkUsable();
      await this.commitLeavingOutInFlight();
    });
  }

  /** Commit and begin the next transaction, with the data blocks in flight left out. */
  private async commitLeavingOutInFlight(): Promise<void> {
    const counted: number[] = [];
    for (const b of this.inFlight) if ((await this.dataSm.getCount(b)) > 0) counted.push(b);
    for (const b of counted) await this.dataSm.dec(b);
    await this.commitTransaction();
    await this.beginTransaction();
    for (const b of counted) await this.dataSm.inc(b);
  }

  /**
   * A commit for a pool with data blocks in flight: they are left out of the committed data space
   * map and counted again in the new transaction, so a crash after this commit leaks none of them.
   * Of `unmapped` (data blocks unmapped since the last commit), those no mapping refers to once
   * the commit is done are counted again, held for their discard (in flight), and returned: the
   * caller discards them and gives them back (`decDataRange`). Passing a block down before its
   * unmapping is committed could discard data the last commit still maps in another device.
   */
  commitWithDataInFlight(unmapped: readonly number[]): Promise<number[]> {
    return this.lock.write(async () => {
      this.checkUsable();
      await this.commitLeavingOutInFlight();
      const held: number[] = [];
      for (const b of unmapped) {
        if ((await this.dataSm.getCount(b)) !== 0) continue;
        await this.dataSm.inc(b);
        this.inFlight.add(b);
        held.push(b);
      }
      return held;
    });
  }

  /**
   * dm_pool_abort_metadata: forget the running transaction and reopen the last committed one.
   * Open thin devices take their committed details back.
   */
  abort(): Promise<void> {
    return this.lock.write(async () => {
      this.checkUsable();
      for (const td of this.devices.values()) td.abortedWithChanges = td.changed;
      this.inFlight.clear();
      this.bm.reset();
      this.tm.reset();
      try {
        await this.openMetadata();
        await this.beginTransaction();
        for (const td of [...this.devices.values()]) {
          if (td.openCount === 0) {
            this.devices.delete(td.id);
            continue;
          }
          const v = await lookup(this.detailsInfo, this.detailsRoot, [td.id]);
          td.reload(
            v ? decodeDeviceDetails(v) : { mappedBlocks: 0, transactionId: 0n, creationTime: 0, snapshottedTime: 0 },
          );
        }
      } catch (err) {
        this.failIo = true;
        throw err;
      }
    });
  }

  /** dm_pool_metadata_close: commits what changed; EBUSY while a thin device is open. */
  close(): Promise<void> {
    return this.lock.write(async () => {
      const open = [...this.devices.values()].filter((td) => td.openCount > 0).length;
      if (open > 0) throw pdError("EBUSY", `attempt to close pmd when ${open} device(s) are still open`);
      if (!this.failIo && !this.bm.readOnly) await this.commitLeavingOutInFlight();
    });
  }

  // ---- thin devices ----

  /** __open_device */
  private async openDevice(dev: number, create: boolean): Promise<ThinDevice> {
    const open = this.devices.get(dev);
    if (open) {
      if (create) throw pdError("EEXIST", `thin device ${dev} already exists`);
      open.openCount++;
      return open;
    }
    const v = await lookup(this.detailsInfo, this.detailsRoot, [dev]);
    let details: DeviceDetails;
    if (v) {
      if (create) throw pdError("EEXIST", `thin device ${dev} already exists`);
      details = decodeDeviceDetails(v);
    } else {
      if (!create) throw pdError("ENODATA", `thin device ${dev} does not exist`);
      details = { mappedBlocks: 0, transactionId: this.trans, creationTime: this.time, snapshottedTime: this.time };
    }
    const td = new ThinDevice(this, dev, details, !v);
    this.devices.set(dev, td);
    return td;
  }

  private async deviceExists(dev: number): Promise<boolean> {
    return this.devices.has(dev) || (await lookup(this.detailsInfo, this.detailsRoot, [dev])) !== undefined;
  }

  /** dm_pool_create_thin: a new device with no mappings. */
  createThin(dev: number): Promise<void> {
    return this.change(async () => {
      checkDevId(dev);
      if (await this.deviceExists(dev)) throw pdError("EEXIST", `thin device ${dev} already exists`);
      const devRoot = await emptyTree(this.blInfo);
      this.root = (await insert(this.tlInfo, this.root, [dev], le64(devRoot))).root;
      (await this.openDevice(dev, true)).openCount--;
    });
  }

  /**
   * dm_pool_create_snap: device `dev` shares `origin`'s mapping tree (one more reference on its
   * root); the pool's time moves on, so every block mapped so far reads as shared by both.
   */
  createSnap(dev: number, origin: number): Promise<void> {
    return this.change(async () => {
      checkDevId(dev);
      if (await this.deviceExists(dev)) throw pdError("EEXIST", `thin device ${dev} already exists`);
      const v = await lookup(this.tlInfo, this.root, [origin]);
      if (!v) throw pdError("ENODATA", `origin thin device ${origin} does not exist`);
      const originRoot = readU64(v, 0);
      await this.tm.inc(originRoot);
      this.root = (await insert(this.tlInfo, this.root, [dev], le64(originRoot))).root;
      this.time++;
      const snap = await this.openDevice(dev, true);
      const td = await this.openDevice(origin, false);
      td.changed = true;
      td.snapshottedTime = this.time;
      snap.mappedBlocks = td.mappedBlocks;
      snap.snapshottedTime = this.time;
      td.openCount--;
      snap.openCount--;
    });
  }

  /** dm_pool_delete_thin_device: the device and its mappings (blocks no other device shares become free). */
  deleteThin(dev: number): Promise<void> {
    return this.change(async () => {
      const td = await this.openDevice(dev, false);
      if (td.openCount > 1) {
        td.openCount--;
        throw pdError("EBUSY", `thin device ${dev} is open`);
      }
      this.devices.delete(dev);
      // A device created in this transaction has no details entry yet.
      this.detailsRoot = (await remove(this.detailsInfo, this.detailsRoot, [dev])).root;
      this.root = (await remove(this.tlInfo, this.root, [dev])).root;
    });
  }

  /** dm_pool_open_thin_device */
  openThin(dev: number): Promise<ThinDevice> {
    return this.lock.write(async () => {
      this.checkUsable();
      return this.openDevice(dev, false);
    });
  }

  closeDevice(td: ThinDevice): void {
    td.openCount--;
  }

  /** Ids of every thin device, committed or not. */
  deviceIds(): Promise<number[]> {
    return this.lock.read(async () => {
      const ids = new Set(this.devices.keys());
      await walk(this.detailsInfo, this.detailsRoot, (keys) => void ids.add(keys[0]!));
      return [...ids].sort((a, b) => a - b);
    });
  }

  // ---- mappings ----

  private lookupResult(td: ThinDevice, value: Buffer): ThinLookupResult {
    const { block, time } = unpackBlockTime(value);
    // __snapshotted_since: written before the device's last snapshot, so possibly shared.
    return { block, shared: td.snapshottedTime > time };
  }

  findBlock(td: ThinDevice, block: number): Promise<ThinLookupResult | undefined> {
    return this.lock.read(async () => {
      this.checkUsable();
      const v = await lookup(this.info, this.root, [td.id, block]);
      return v && this.lookupResult(td, v);
    });
  }

  tryFindBlock(td: ThinDevice, block: number): ThinLookupResult | undefined | typeof WOULD_BLOCK {
    this.checkUsable();
    if (this.lock.writing) return WOULD_BLOCK;
    const v = tryLookup(this.info, this.root, [td.id, block]);
    if (v === WOULD_BLOCK || v === undefined) return v;
    return this.lookupResult(td, v);
  }

  /** __find_mapped_range: the first mapped block at or after `begin`, and the run of consecutive pool blocks from it. */
  findMappedRange(td: ThinDevice, begin: number, end: number): Promise<MappedRange | undefined> {
    return this.lock.read(async () => {
      this.checkUsable();
      if (end <= begin) return undefined;
      const first = await lookupNext(this.info, this.root, [td.id, begin]);
      if (!first || first.key >= end) return undefined;
      const head = this.lookupResult(td, first.value);
      let thinEnd = first.key + 1;
      let poolEnd = head.block + 1;
      while (thinEnd < end) {
        const v = await lookup(this.info, this.root, [td.id, thinEnd]);
        if (!v) break;
        const next = this.lookupResult(td, v);
        if (next.block !== poolEnd || next.shared !== head.shared) break;
        thinEnd++;
        poolEnd++;
      }
      return { thinBegin: first.key, thinEnd, poolBegin: head.block, maybeShared: head.shared };
    });
  }

  insertBlock(td: ThinDevice, block: number, dataBlock: number): Promise<void> {
    return this.change(async () => {
      const r = await insert(this.info, this.root, [td.id, block], packBlockTime(dataBlock, this.time));
      this.root = r.root;
      td.changed = true;
      if (r.inserted) td.mappedBlocks++;
      this.inFlight.delete(dataBlock);
    });
  }

  removeBlock(td: ThinDevice, block: number): Promise<void> {
    return this.change(async () => {
      const r = await remove(this.info, this.root, [td.id, block]);
      this.root = r.root;
      if (!r.removed) throw pdError("ENODATA", `block ${block} of thin device ${td.id} is not mapped`);
      td.mappedBlocks--;
      td.changed = true;
    });
  }

  /**
   * __remove_range: the device's tree is taken out of the top level (with a reference of its own,
   * so that does not delete it), cut down, and put back.
   */
  removeRange(td: ThinDevice, begin: number, end: number): Promise<void> {
    return this.change(async () => {
      const v = await lookup(this.tlInfo, this.root, [td.id]);
      if (!v) throw pdError("ENODATA", `thin device ${td.id} has no mapping tree`);
      let mappingRoot = readU64(v, 0);
      await this.tm.inc(mappingRoot);
      this.root = (await remove(this.tlInfo, this.root, [td.id])).root;
      let removed = 0;
      while (begin < end) {
        const next = await lookupNext(this.blInfo, mappingRoot, [begin]);
        if (!next || next.key >= end) break;
        mappingRoot = (await remove(this.blInfo, mappingRoot, [next.key])).root;
        removed++;
        begin = next.key + 1;
      }
      td.mappedBlocks -= removed;
      td.changed = true;
      this.root = (await insert(this.tlInfo, this.root, [td.id], le64(mappingRoot))).root;
    });
  }

  highestMappedBlock(td: ThinDevice): Promise<number | undefined> {
    return this.lock.read(async () => {
      this.checkUsable();
      const v = await lookup(this.tlInfo, this.root, [td.id]);
      if (!v) throw pdError("ENODATA", `thin device ${td.id} has no mapping tree`);
      return findHighestKey(this.blInfo, readU64(v, 0));
    });
  }

  // ---- data blocks ----

  /**
   * dm_pool_alloc_data_block: a free data block, counted once (ENOSPC when there is none). With
   * `inFlight`, commitWithDataInFlight leaves it out until it is mapped (insertBlock) or given
   * back (decDataRange).
   */
  allocDataBlock(opts: { inFlight?: boolean } = {}): Promise<number> {
    return this.change(async () => {
      const b = await this.dataSm.newBlock();
      if (opts.inFlight) this.inFlight.add(b);
      return b;
    });
  }

  /** dm_pool_block_is_shared */
  blockIsShared(b: number): Promise<boolean> {
    return this.lock.read(async () => (await this.dataSm.getCount(b)) > 1);
  }

  dataBlockCount(b: number): Promise<number> {
    return this.lock.read(() => this.dataSm.getCount(b));
  }

  incDataRange(begin: number, end: number): Promise<void> {
    return this.change(async () => {
      for (let b = begin; b < end; b++) await this.dataSm.inc(b);
    });
  }

  decDataRange(begin: number, end: number): Promise<void> {
    return this.change(async () => {
      for (let b = begin; b < end; b++) {
        await this.dataSm.dec(b);
        this.inFlight.delete(b);
      }
    });
  }

  // ---- pool-wide state ----

  get transactionId(): bigint {
    return this.trans;
  }

  get dataBlockSize(): number {
    return this.dataBlockSizeSectors;
  }

  /** dm_pool_set_metadata_transaction_id: only from the id userspace believes is current. */
  setTransactionId(current: bigint, next: bigint): Promise<void> {
    return this.change(async () => {
      if (this.trans !== current) throw pdError("EINVAL", "mismatched transaction id");
      this.trans = next;
    });
  }

  /**
   * dm_pool_reserve_metadata_snap: commit, then keep a copy of the superblock whose trees stay
   * alive (one more reference each) for userspace to read while the pool runs on.
   */
  reserveMetadataSnap(): Promise<void> {
    return this.change(async () => {
      await this.commitTransaction();
      await this.metadataSm.inc(THIN_SUPERBLOCK_LOCATION);
      const copy = await this.tm.shadow(THIN_SUPERBLOCK_LOCATION, superblockValidator);
      const held = decodeSuperblock(copy.data);
      if (held.heldRoot) {
        await this.tm.dec(copy.location);
        throw pdError("EBUSY", "Pool metadata snapshot already exists: release this before taking another.");
      }
      // The copy's space maps would be wrong as soon as the pool moves on: they are not published.
      copy.data.fill(0, SB.dataSpaceMapRoot, SB.metadataSpaceMapRoot + 128);
      await this.tm.inc(held.dataMappingRoot);
      await this.tm.inc(held.deviceDetailsRoot);
      setHeldRoot(await this.bm.writeLock(THIN_SUPERBLOCK_LOCATION, superblockValidator), copy.location);
      this.held = copy.location;
    });
  }

  /** dm_pool_release_metadata_snap */
  releaseMetadataSnap(): Promise<void> {
    return this.change(async () => {
      const sb = await this.bm.writeLock(THIN_SUPERBLOCK_LOCATION, superblockValidator);
      const held = readU64(sb, SB.heldRoot);
      setHeldRoot(sb, 0);
      this.held = 0;
      if (!held) throw pdError("EINVAL", "No pool metadata snapshot found: nothing to release.");
      const copy = decodeSuperblock(await this.tm.read(held, superblockValidator));
      await deleteTree(this.info, copy.dataMappingRoot);
      await deleteTree(this.detailsInfo, copy.deviceDetailsRoot);
      await this.tm.dec(held);
    });
  }

  /** dm_pool_get_metadata_snap: the held superblock copy's block, 0 for none. */
  metadataSnap(): Promise<number> {
    return this.lock.read(async () => {
      this.checkUsable();
      return readU64(await this.bm.read(THIN_SUPERBLOCK_LOCATION, superblockValidator), SB.heldRoot);
    });
  }

  /** The same without I/O, for status lines (which cannot wait). */
  get metadataSnapRoot(): number {
    return this.held;
  }

  /** Free data blocks (dm_pool_get_free_block_count). */
  freeDataBlocks(): number {
    return this.dataSm.nrFree();
  }

  dataDevSize(): number {
    return this.dataSm.nrBlocks;
  }

  /** Free metadata blocks less the commit reserve (dm_pool_get_free_metadata_block_count). */
  freeMetadataBlocks(): number {
    return Math.max(0, this.metadataSm.nrFree() - this.metadataReserve);
  }

  metadataDevSize(): number {
    return this.metadataSm.nrBlocks;
  }

  /** dm_pool_resize_data_dev: grow (never shrink) the data space map to `blocks`. */
  resizeDataDev(blocks: number): Promise<void> {
    return this.change(async () => {
      const old = this.dataSm.nrBlocks;
      if (blocks < old) throw pdError("EINVAL", "cannot reduce size of space map");
      if (blocks > old) await this.dataSm.extend(blocks - old);
    });
  }

  /** dm_pool_resize_metadata_dev */
  resizeMetadataDev(blocks: number): Promise<void> {
    return this.change(async () => {
      const old = this.metadataSm.nrBlocks;
      if (blocks < old) throw pdError("EINVAL", "cannot reduce size of space map");
      if (blocks > old) await this.metadataSm.extend(blocks - old);
      this.setMetadataReserve();
    });
  }

  /** dm_pool_register_metadata_threshold */
  registerMetadataThreshold(threshold: number, fn: () => void): void {
    this.metadataSm.registerThreshold(threshold, fn);
  }

  get needsCheck(): boolean {
    return (this.flags & NEEDS_CHECK_FLAG) !== 0;
  }

  /** dm_pool_metadata_set_needs_check: in the superblock as it is (written at the next commit or flush). */
  setNeedsCheck(): Promise<void> {
    return this.change(async () => {
      this.flags |= NEEDS_CHECK_FLAG;
      const sb = await this.bm.writeLock(THIN_SUPERBLOCK_LOCATION, superblockValidator);
      sb.writeUInt32LE(this.flags, SB.flags);
    });
  }

  /** dm_pool_changed_this_transaction */
  changedThisTransaction(): boolean {
    return [...this.devices.values()].some((td) => td.changed);
  }

  setReadOnly(): void {
    this.bm.readOnly = true;
  }

  setReadWrite(): void {
    this.bm.readOnly = false;
  }

  get readOnly(): boolean {
    return this.bm.readOnly;
  }

  /** Block manager counters (reads, writes, flushes). */
  get ioStats(): Readonly<{ reads: number; writes: number; flushes: number }> {
    return this.bm.stats;
  }

  // ---- internals ----

  private checkUsable(): void {
    if (this.failIo) throw pdError("EINVAL", "pool metadata failed: only closing is possible");
  }

  /** pmd_write_lock: a change puts the pool in service (so the next commit writes). */
  private change<T>(fn: () => Promise<T>): Promise<T> {
    return this.lock.write(async () => {
      this.checkUsable();
      this.inService = true;
      return fn();
    });
  }
}

function checkDevId(dev: number): void {
  if (!Number.isInteger(dev) || dev < 0 || dev > MAX_DEV_ID) {
    throw pdError("EINVAL", `thin device id ${dev} is not in 0..${MAX_DEV_ID}`);
  }
}

export { PersistentDataError, ThinDevice, WOULD_BLOCK };
export type { MappedRange, ThinLookupResult };
