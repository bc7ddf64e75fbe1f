/**
 * Reference counts on disk, shared by both space maps (dm-space-map-common.c, struct ll_disk):
 * bitmap blocks of 2-bit counts, an index of the bitmaps, and a btree of u32 counts for blocks
 * counted above 2. The two space maps differ only in where the index lives (a btree for data, a
 * single block for metadata), behind BitmapIndex.
 *
 * A space map keeps two of these: the current one and a snapshot taken at the last commit (the
 * kernel's old_ll), whose blocks the running transaction never overwrites, so "free now and free
 * at the last commit" can be asked of both.
 */
import { type BtreeInfo, emptyTree, lookup } from "./btree.js";
import { insert } from "./btree-insert.js";
import { remove } from "./btree-remove.js";
import { pdError } from "./errors.js";
import { encodeSmRoot } from "./space-map.js";
import {
  ENTRIES_PER_BLOCK,
  type IndexEntry,
  bitmapFindFree,
  bitmapLookup,
  bitmapSet,
  bitmapValidator,
} from "./space-map-bitmap.js";
import type { TransactionManager } from "./transaction-manager.js";

/** Where the index entries of the bitmaps live (load_ie, save_ie, commit of struct ll_disk). */
export interface BitmapIndex {
  load(index: number): Promise<IndexEntry>;
  save(index: number, ie: IndexEntry): Promise<void>;
  readonly maxEntries: number;
  /** Write out whatever is held in memory (the metadata index block). */
  commit(): Promise<void>;
  /** bitmap_root in the space map root. */
  readonly root: number;
  clone(): BitmapIndex;
}

/** What a count change did to a block: sm_ll_mutate's allocation_event. */
export type AllocationEvent = "none" | "alloc" | "free";

export class LowLevelDisk {
  readonly refCountInfo: BtreeInfo;

  constructor(
    readonly tm: TransactionManager,
    public index: BitmapIndex,
    public nrBlocks: number,
    public nrAllocated: number,
    public refCountRoot: number,
  ) {
    this.refCountInfo = { tm, levels: 1, valueType: { size: 4 } };
  }

  /** The state as of now, for the space map's copy of the last commit. */
  snapshot(): LowLevelDisk {
    return new LowLevelDisk(this.tm, this.index.clone(), this.nrBlocks, this.nrAllocated, this.refCountRoot);
  }

  static async newRefCountTree(tm: TransactionManager): Promise<number> {
    return emptyTree({ tm, levels: 1, valueType: { size: 4 } });
  }

  root(): Buffer {
    return encodeSmRoot({
      nrBlocks: this.nrBlocks,
      nrAllocated: this.nrAllocated,
      bitmapRoot: this.index.root,
      refCountRoot: this.refCountRoot,
    });
  }

  /** sm_ll_extend: bitmaps for `extra` more blocks, all free. */
  async extend(extra: number): Promise<void> {
    const nrBlocks = this.nrBlocks + extra;
    const oldBitmaps = Math.ceil(this.nrBlocks / ENTRIES_PER_BLOCK);
    const bitmaps = Math.ceil(nrBlocks / ENTRIES_PER_BLOCK);
    if (bitmaps > this.index.maxEntries) throw pdError("EINVAL", "space map too large");
    // Set first: allocating the new bitmaps may look at it (the metadata space map's bootstrap).
    this.nrBlocks = nrBlocks;
    for (let i = oldBitmaps; i < bitmaps; i++) {
      const { location } = await this.tm.newBlock(bitmapValidator);
      await this.index.save(i, { blocknr: location, nrFree: ENTRIES_PER_BLOCK, noneFreeBefore: 0 });
    }
  }

  /** The 2-bit bitmap entry (3: the count is in the ref-count tree). */
  async lookupBitmap(b: number): Promise<number> {
    this.checkBounds(b);
    const ie = await this.index.load(Math.floor(b / ENTRIES_PER_BLOCK));
    const bm = await this.tm.read(ie.blocknr, bitmapValidator);
    return bitmapLookup(bm, b % ENTRIES_PER_BLOCK);
  }

  async lookup(b: number): Promise<number> {
    const count = await this.lookupBitmap(b);
    return count === 3 ? this.lookupBigRefCount(b) : count;
  }

  private async lookupBigRefCount(b: number): Promise<number> {
    const v = await lookup(this.refCountInfo, this.refCountRoot, [b]);
    if (!v) throw pdError("EINVAL", `block ${b} is counted above 2 but has no entry in the ref-count tree`);
    return v.readUInt32LE(0);
  }

  /** sm_ll_find_free_block: the first block in [begin, end) with count 0, or -1. */
  async findFreeBlock(begin: number, end: number): Promise<number> {
    if (begin >= end) return -1;
    const indexBegin = Math.floor(begin / ENTRIES_PER_BLOCK);
    const indexEnd = Math.ceil(end / ENTRIES_PER_BLOCK);
    const lastEnd = end - (indexEnd - 1) * ENTRIES_PER_BLOCK;
    let bitBegin = begin % ENTRIES_PER_BLOCK;
    for (let i = indexBegin; i < indexEnd; i++, bitBegin = 0) {
      const ie = await this.index.load(i);
      if (ie.nrFree === 0) continue;
      const bm = await this.tm.read(ie.blocknr, bitmapValidator);
      const bitEnd = i === indexEnd - 1 ? lastEnd : ENTRIES_PER_BLOCK;
      const pos = bitmapFindFree(bm, Math.max(bitBegin, ie.noneFreeBefore), bitEnd);
      if (pos >= 0) return i * ENTRIES_PER_BLOCK + pos;
    }
    return -1;
  }

  inc(b: number): Promise<AllocationEvent> {
    return this.mutate(b, (old) => old + 1);
  }

  dec(b: number): Promise<AllocationEvent> {
    return this.mutate(b, (old) => {
      if (old === 0) throw pdError("EINVAL", `unable to decrement the reference count of block ${b} below 0`);
      return old - 1;
    });
  }

  /** sm_ll_insert: set a count outright. */
  insert(b: number, count: number): Promise<AllocationEvent> {
    return this.mutate(b, () => count);
  }

  /**
   * sm_ll_mutate: shadow the block's bitmap, change the count (moving it in or out of the ref-count
   * tree across 2), and keep the index entry's free count and hint in step.
   */
  private async mutate(b: number, change: (old: number) => number): Promise<AllocationEvent> {
    this.checkBounds(b);
    const index = Math.floor(b / ENTRIES_PER_BLOCK);
    const bit = b % ENTRIES_PER_BLOCK;
    const ie = await this.index.load(index);
    const bm = await this.tm.shadow(ie.blocknr, bitmapValidator);
    ie.blocknr = bm.location;

    const bitmapOld = bitmapLookup(bm.data, bit);
    const old = bitmapOld > 2 ? await this.lookupBigRefCount(b) : bitmapOld;
    const count = change(old);
    if (count <= 2) {
      bitmapSet(bm.data, bit, count);
      if (old > 2) this.refCountRoot = (await remove(this.refCountInfo, this.refCountRoot, [b])).root;
    } else {
      bitmapSet(bm.data, bit, 3);
      const value = Buffer.alloc(4);
      value.writeUInt32LE(count, 0);
      this.refCountRoot = (await insert(this.refCountInfo, this.refCountRoot, [b], value)).root;
    }

    let event: AllocationEvent = "none";
    if (count > 0 && old === 0) {
      event = "alloc";
      this.nrAllocated++;
      ie.nrFree--;
      if (ie.noneFreeBefore === bit) ie.noneFreeBefore = bit + 1;
    } else if (old > 0 && count === 0) {
      event = "free";
      this.nrAllocated--;
      ie.nrFree++;
      ie.noneFreeBefore = Math.min(ie.noneFreeBefore, bit);
    }
    await this.index.save(index, ie);
    return event;
  }

  commit(): Promise<void> {
    return this.index.commit();
  }

  private checkBounds(b: number): void {
    if (b < 0 || b >= this.nrBlocks) throw pdError("EINVAL", `block ${b} out of bounds (${this.nrBlocks} blocks)`);
  }
}

/**
 * sm_ll_find_common_free_block: a block free both now and at the last commit (a block freed in
 * this transaction may still hold what the committed metadata points to).
 */
export async function findCommonFreeBlock(
  oldLl: LowLevelDisk,
  newLl: LowLevelDisk,
  begin: number,
  end: number,
): Promise<number> {
  for (;;) {
    const b = await newLl.findFreeBlock(begin, end);
    if (b < 0) return -1;
    if (b >= oldLl.nrBlocks || (await oldLl.lookup(b)) === 0) return b;
    begin = b + 1;
  }
}
