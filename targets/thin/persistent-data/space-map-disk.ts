/**
 * The data space map (dm-space-map-disk.c): reference counts of the pool's data blocks, kept in
 * metadata blocks through the transaction manager. The index of its bitmaps is a btree (bitmap
 * number → index entry), so the data device can have any size.
 */
import { type BtreeInfo, emptyTree, lookup } from "./btree.js";
import { insert } from "./btree-insert.js";
import { pdError } from "./errors.js";
import { type SpaceMap, decodeSmRoot } from "./space-map.js";
import { INDEX_ENTRY_SIZE, type IndexEntry, decodeIndexEntry, encodeIndexEntry } from "./space-map-bitmap.js";
import { type AllocationEvent, type BitmapIndex, LowLevelDisk, findCommonFreeBlock } from "./space-map-ll.js";
import type { TransactionManager } from "./transaction-manager.js";

/** The index as a btree (disk_ll_load_ie, disk_ll_save_ie): changes go to disk as they happen. */
class BtreeBitmapIndex implements BitmapIndex {
  readonly maxEntries = Number.MAX_SAFE_INTEGER;
  private readonly info: BtreeInfo;

  constructor(
    tm: TransactionManager,
    public root: number,
  ) {
    // Bitmaps are shadowed through the transaction manager, so the entries hold no references.
    this.info = { tm, levels: 1, valueType: { size: INDEX_ENTRY_SIZE } };
  }

  async load(index: number): Promise<IndexEntry> {
    const v = await lookup(this.info, this.root, [index]);
    if (!v) throw pdError("ENODATA", `space map index has no entry ${index}`);
    return decodeIndexEntry(v);
  }

  async save(index: number, ie: IndexEntry): Promise<void> {
    this.root = (await insert(this.info, this.root, [index], encodeIndexEntry(ie))).root;
  }

  async commit(): Promise<void> {}

  clone(): BitmapIndex {
    return new BtreeBitmapIndex(this.info.tm, this.root);
  }
}

export class DiskSpaceMap implements SpaceMap {
  private oldLl: LowLevelDisk;
  /** Where the next allocation search starts. */
  private begin = 0;
  private allocatedThisTransaction = 0;

  private constructor(private readonly ll: LowLevelDisk) {
    this.oldLl = ll.snapshot();
  }

  /** dm_sm_disk_create */
  static async create(tm: TransactionManager, nrBlocks: number): Promise<DiskSpaceMap> {
    const index = new BtreeBitmapIndex(tm, await emptyTree({ tm, levels: 1, valueType: { size: INDEX_ENTRY_SIZE } }));
    const ll = new LowLevelDisk(tm, index, 0, 0, await LowLevelDisk.newRefCountTree(tm));
    await ll.extend(nrBlocks);
    const sm = new DiskSpaceMap(ll);
    await sm.commit();
    return sm;
  }

  /** dm_sm_disk_open: from the root the superblock holds. */
  static open(tm: TransactionManager, root: Buffer): DiskSpaceMap {
    const r = decodeSmRoot(root);
    return new DiskSpaceMap(
      new LowLevelDisk(tm, new BtreeBitmapIndex(tm, r.bitmapRoot), r.nrBlocks, r.nrAllocated, r.refCountRoot),
    );
  }

  /**
   * Counted now, not at the last commit as the kernel's is: two resizes in one transaction then
   * extend by what each one asks, not twice from the same base.
   */
  get nrBlocks(): number {
    return this.ll.nrBlocks;
  }

  /** Blocks freed in this transaction count as free, as in the kernel, though only the commit makes them allocatable. */
  nrFree(): number {
    return this.ll.nrBlocks - this.oldLl.nrAllocated - this.allocatedThisTransaction;
  }

  getCount(b: number): Promise<number> {
    return this.ll.lookup(b);
  }

  async countIsMoreThanOne(b: number): Promise<boolean> {
    return (await this.ll.lookup(b)) > 1;
  }

  async setCount(b: number, count: number): Promise<void> {
    this.account(await this.ll.insert(b, count));
  }

  async inc(b: number): Promise<void> {
    this.account(await this.ll.inc(b));
  }

  async dec(b: number): Promise<void> {
    this.account(await this.ll.dec(b));
  }

  async newBlock(): Promise<number> {
    let b = await findCommonFreeBlock(this.oldLl, this.ll, this.begin, this.ll.nrBlocks);
    // Nothing past `begin`: something before it may have been freed since.
    if (b < 0) b = await findCommonFreeBlock(this.oldLl, this.ll, 0, this.begin);
    if (b < 0) throw pdError("ENOSPC", "no free data block");
    this.begin = b + 1;
    this.account(await this.ll.inc(b));
    return b;
  }

  async commit(): Promise<void> {
    await this.ll.commit();
    this.oldLl = this.ll.snapshot();
    this.allocatedThisTransaction = 0;
  }

  extend(extraBlocks: number): Promise<void> {
    return this.ll.extend(extraBlocks);
  }

  root(): Buffer {
    return this.ll.root();
  }

  private account(event: AllocationEvent): void {
    if (event === "alloc") this.allocatedThisTransaction++;
    else if (event === "free") this.allocatedThisTransaction--;
  }
}
