/**
 * An open thin device as the pool metadata holds it in memory (struct dm_thin_device): its details,
 * changed in memory as mappings come and go and written to the device-details tree at commit.
 * The operations are the pool's (thin-metadata.ts), which takes its lock around each one.
 */
import type { WOULD_BLOCK } from "../persistent-data/btree.js";
import type { DeviceDetails } from "./device-details.js";

/** dm_thin_lookup_result: `shared` is true when a snapshot may share the block (written before the last one). */
export interface ThinLookupResult {
  block: number;
  shared: boolean;
}

/** A run of mapped blocks (dm_thin_find_mapped_range): thin blocks [thinBegin, thinEnd) → [poolBegin, ...). */
export interface MappedRange {
  thinBegin: number;
  thinEnd: number;
  poolBegin: number;
  maybeShared: boolean;
}

/** What a ThinDevice needs from its pool. */
export interface ThinDeviceOwner {
  findBlock(td: ThinDevice, block: number): Promise<ThinLookupResult | undefined>;
  tryFindBlock(td: ThinDevice, block: number): ThinLookupResult | undefined | typeof WOULD_BLOCK;
  findMappedRange(td: ThinDevice, begin: number, end: number): Promise<MappedRange | undefined>;
  insertBlock(td: ThinDevice, block: number, dataBlock: number): Promise<void>;
  removeBlock(td: ThinDevice, block: number): Promise<void>;
  removeRange(td: ThinDevice, begin: number, end: number): Promise<void>;
  highestMappedBlock(td: ThinDevice): Promise<number | undefined>;
  closeDevice(td: ThinDevice): void;
}

export class ThinDevice implements DeviceDetails {
  openCount = 1;
  /** Details differ from the device-details tree: written at the next commit. */
  changed: boolean;
  /** The last abort dropped changes of this device (dm_thin_aborted_changes). */
  abortedWithChanges = false;
  mappedBlocks: number;
  transactionId: bigint;
  creationTime: number;
  snapshottedTime: number;

  constructor(
    private readonly owner: ThinDeviceOwner,
    readonly id: number,
    details: DeviceDetails,
    changed: boolean,
  ) {
    this.changed = changed;
    this.mappedBlocks = details.mappedBlocks;
    this.transactionId = details.transactionId;
    this.creationTime = details.creationTime;
    this.snapshottedTime = details.snapshottedTime;
  }

  details(): DeviceDetails {
    const { mappedBlocks, transactionId, creationTime, snapshottedTime } = this;
    return { mappedBlocks, transactionId, creationTime, snapshottedTime };
  }

  /** Take these details back (after an abort). */
  reload(details: DeviceDetails): void {
    this.mappedBlocks = details.mappedBlocks;
    this.transactionId = details.transactionId;
    this.creationTime = details.creationTime;
    this.snapshottedTime = details.snapshottedTime;
    this.changed = false;
  }

  /** dm_thin_find_block: where virtual block `block` is, or undefined when it is not mapped. */
  findBlock(block: number): Promise<ThinLookupResult | undefined> {
    return this.owner.findBlock(this, block);
  }

  /** The same without I/O or waiting for the lock: WOULD_BLOCK when that would be needed. */
  tryFindBlock(block: number): ThinLookupResult | undefined | typeof WOULD_BLOCK {
    return this.owner.tryFindBlock(this, block);
  }

  findMappedRange(begin: number, end: number): Promise<MappedRange | undefined> {
    return this.owner.findMappedRange(this, begin, end);
  }

  /** dm_thin_insert_block: map `block` to `dataBlock` (whose reference the caller took by allocating it). */
  insertBlock(block: number, dataBlock: number): Promise<void> {
    return this.owner.insertBlock(this, block, dataBlock);
  }

  /** dm_thin_remove_block: unmap `block` (ENODATA if it was not mapped). */
  removeBlock(block: number): Promise<void> {
    return this.owner.removeBlock(this, block);
  }

  /** dm_thin_remove_range: unmap every block in [begin, end). */
  removeRange(begin: number, end: number): Promise<void> {
    return this.owner.removeRange(this, begin, end);
  }

  highestMappedBlock(): Promise<number | undefined> {
    return this.owner.highestMappedBlock(this);
  }

  /** dm_pool_close_thin_device */
  close(): void {
    this.owner.closeDevice(this);
  }
}
