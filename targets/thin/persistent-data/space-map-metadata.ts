/**
 * The metadata space map (dm-space-map-metadata.c): reference counts of the metadata device's own
 * blocks, kept in those blocks. Its index is one block of up to 255 entries (so at most
 * 255 × 16320 blocks, about 15.9 GiB of metadata), held in memory and written at commit.
 *
 * Recursion: changing a count shadows a bitmap or a ref-count tree node, which needs a new block
 * and drops the old one's count, which would change a count in the middle of changing one. While
 * an operation is running (`recursion > 0`) nested increments and decrements are queued instead
 * (block ops, the kernel's bop ring), and the outermost operation applies them when it is done,
 * each of which may queue more. Counts read meanwhile include the queued changes.
 *
 * Bootstrap: while the map is being created or extended it does not exist on disk yet, so blocks
 * are handed out in order from `begin` and every count change is queued; at the end every block
 * handed out gets its count.
 */
import type { BlockValidator } from "./block-manager.js";
import { INDEX_CSUM_XOR, dmChecksum } from "./checksum.js";
import { pdError } from "./errors.js";
import { type SpaceMap, decodeSmRoot, readU64, writeU64 } from "./space-map.js";
import {
  ENTRIES_PER_BLOCK,
  INDEX_ENTRY_SIZE,
  type IndexEntry,
  decodeIndexEntry,
  encodeIndexEntry,
} from "./space-map-bitmap.js";
import { type BitmapIndex, LowLevelDisk, findCommonFreeBlock } from "./space-map-ll.js";
import type { TransactionManager } from "./transaction-manager.js";

/** MAX_METADATA_BITMAPS */
export const MAX_METADATA_BITMAPS = 255;
/** DM_SM_METADATA_MAX_BLOCKS: what one index block can describe. */
export const METADATA_MAX_BLOCKS = MAX_METADATA_BITMAPS * ENTRIES_PER_BLOCK;
const INDEX_HEADER_SIZE = 16;

/** struct disk_metadata_index: csum, padding, blocknr, then the entries. */
export const indexValidator: BlockValidator = {
  name: "index",
  prepareForWrite(data, location) {
    writeU64(data, 8, location);
    data.writeUInt32LE(dmChecksum(data.subarray(4), INDEX_CSUM_XOR), 0);
  },
  check(data, location) {
    if (readU64(data, 8) !== location) {
      throw pdError("ENOTBLK", `index_check failed: blocknr ${readU64(data, 8)} != wanted ${location}`);
    }
    const csum = dmChecksum(data.subarray(4), INDEX_CSUM_XOR);
    if (csum !== data.readUInt32LE(0)) {
      throw pdError("EILSEQ", `index_check failed: csum ${csum} != wanted ${data.readUInt32LE(0)}`);
    }
  },
};

/** The index block, held in memory and shadowed to disk at commit (metadata_ll_*). */
class BlockBitmapIndex implements BitmapIndex {
  readonly maxEntries = MAX_METADATA_BITMAPS;

  constructor(
    private readonly tm: TransactionManager,
    public root: number,
    private readonly entries: Buffer,
    private changed: boolean,
  ) {}

  static async create(tm: TransactionManager): Promise<BlockBitmapIndex> {
    const { location } = await tm.newBlock(indexValidator);
    return new BlockBitmapIndex(tm, location, Buffer.alloc(4096), false);
  }

  static async open(tm: TransactionManager, root: number): Promise<BlockBitmapIndex> {
    return new BlockBitmapIndex(tm, root, Buffer.from(await tm.read(root, indexValidator)), false);
  }

  async load(index: number): Promise<IndexEntry> {
    return decodeIndexEntry(this.entries, INDEX_HEADER_SIZE + INDEX_ENTRY_SIZE * index);
  }

  async save(index: number, ie: IndexEntry): Promise<void> {
    encodeIndexEntry(ie, this.entries, INDEX_HEADER_SIZE + INDEX_ENTRY_SIZE * index);
    this.changed = true;
  }

  async commit(): Promise<void> {
    if (!this.changed) return;
    // Shadowing the index block changes counts, so entries: copy them only once it is done.
    const s = await this.tm.shadow(this.root, indexValidator);
    this.entries.copy(s.data);
    this.root = s.location;
    this.changed = false;
  }

  clone(): BitmapIndex {
    return new BlockBitmapIndex(this.tm, this.root, Buffer.from(this.entries), this.changed);
  }
}

interface BlockOp {
  inc: boolean;
  block: number;
}

export class MetadataSpaceMap implements SpaceMap {
  private ll!: LowLevelDisk;
  private oldLl!: LowLevelDisk;
  private begin = 0;
  private recursion = 0;
  private allocatedThisTransaction = 0;
  private readonly uncommitted: BlockOp[] = [];
  private bootstrap = false;
  private threshold: { value: number; fn: () => void; below: boolean } | null = null;

  private constructor(tm: TransactionManager) {
    tm.sm = this;
  }

  /** dm_sm_metadata_create: a map of `nrBlocks` blocks, the superblock and the map's own blocks in use. */
  static async create(tm: TransactionManager, nrBlocks: number, superblock: number): Promise<MetadataSpaceMap> {
    const sm = new MetadataSpaceMap(tm);
    sm.begin = superblock + 1;
    sm.bootstrap = true;
    try {
      sm.ll = new LowLevelDisk(tm, null as unknown as BitmapIndex, 0, 0, 0);
      sm.ll.index = await BlockBitmapIndex.create(tm);
      sm.ll.refCountRoot = await LowLevelDisk.newRefCountTree(tm);
      await sm.ll.extend(Math.min(nrBlocks, METADATA_MAX_BLOCKS));
    } finally {
      sm.bootstrap = false;
    }
    // Everything handed out so far, the superblock included, gets its count.
    for (let b = superblock; b < sm.begin; b++) sm.uncommitted.push({ inc: true, block: b });
    await sm.outermost(async () => {});
    await sm.commit();
    return sm;
  }

  /** dm_sm_metadata_open */
  static async open(tm: TransactionManager, root: Buffer): Promise<MetadataSpaceMap> {
    const sm = new MetadataSpaceMap(tm);
    const r = decodeSmRoot(root);
    const index = await BlockBitmapIndex.open(tm, r.bitmapRoot);
    sm.ll = new LowLevelDisk(tm, index, r.nrBlocks, r.nrAllocated, r.refCountRoot);
    sm.oldLl = sm.ll.snapshot();
    return sm;
  }

  get nrBlocks(): number {
    return this.ll.nrBlocks;
  }

  nrFree(): number {
    return this.oldLl.nrBlocks - this.oldLl.nrAllocated - this.allocatedThisTransaction;
  }

  /** Calls `fn` once each time the free count drops to `value` or below (the pool's low water mark). */
  registerThreshold(value: number, fn: () => void): void {
    this.threshold = { value, fn, below: false };
  }

  async getCount(b: number): Promise<number> {
    if (this.bootstrap) return b < this.begin ? 1 : 0;
    return (await this.ll.lookup(b)) + this.adjustment(b);
  }

  async countIsMoreThanOne(b: number): Promise<boolean> {
    if (this.bootstrap) return false;
    const adjustment = this.adjustment(b);
    if (adjustment > 1) return true;
    const bits = await this.ll.lookupBitmap(b);
    // 3 means "more than 2" in the bitmap: true whatever is queued.
    return bits === 3 || bits + adjustment > 1;
  }

  async setCount(b: number, count: number): Promise<void> {
    if (this.bootstrap || this.recursion > 0) throw pdError("EINVAL", "cannot recurse set_count()");
    await this.outermost(() => this.ll.insert(b, count));
  }

  async inc(b: number): Promise<void> {
    if (this.bootstrap || this.recursion > 0) this.uncommitted.push({ inc: true, block: b });
    else await this.outermost(() => this.ll.inc(b));
  }

  async dec(b: number): Promise<void> {
    if (this.bootstrap || this.recursion > 0) this.uncommitted.push({ inc: false, block: b });
    else await this.outermost(() => this.ll.dec(b));
  }

  async newBlock(): Promise<number> {
    if (this.bootstrap) {
      if (this.begin >= this.ll.nrBlocks && this.ll.nrBlocks > 0) throw pdError("ENOSPC", "no free metadata block");
      return this.begin++;
    }
    let b = await this.findFree(this.begin, this.ll.nrBlocks);
    if (b < 0) b = await this.findFree(0, this.begin);
    if (b < 0) throw pdError("ENOSPC", "unable to allocate new metadata block");
    this.begin = b + 1;
    await this.inc(b);
    this.allocatedThisTransaction++;
    this.checkThreshold();
    return b;
  }

  async commit(): Promise<void> {
    await this.ll.commit();
    this.oldLl = this.ll.snapshot();
    this.begin = 0;
    this.allocatedThisTransaction = 0;
  }

  /**
   * sm_metadata_extend: bitmaps for the new blocks come from the new area itself (bootstrap from
   * the old end), then those blocks are counted, repeatedly, until counting them needs no more.
   */
  async extend(extraBlocks: number): Promise<void> {
    let oldLen = this.ll.nrBlocks;
    if (oldLen + extraBlocks > METADATA_MAX_BLOCKS) throw pdError("EINVAL", "space map too large");
    // The new area must hold its own bitmaps and the copies counting them makes: of the old last
    // bitmap, of the bitmaps holding the blocks that frees (at worst every old one), of the index.
    const oldBitmaps = Math.ceil(oldLen / ENTRIES_PER_BLOCK);
    const newBitmaps = Math.ceil((oldLen + extraBlocks) / ENTRIES_PER_BLOCK) - oldBitmaps;
    if (newBitmaps > 0 && extraBlocks < newBitmaps + oldBitmaps + 2) {
      throw pdError("ENOSPC", `metadata extension by ${extraBlocks} blocks cannot hold its own bitmaps`);
    }
    this.begin = oldLen;
    this.bootstrap = true;
    try {
      await this.ll.extend(extraBlocks);
      do {
        for (let b = oldLen; b < this.begin; b++) this.uncommitted.push({ inc: true, block: b });
        oldLen = this.begin;
        await this.applyOps();
        await this.ll.commit();
      } while (oldLen !== this.begin);
    } finally {
      this.bootstrap = false;
    }
  }

  root(): Buffer {
    return this.ll.root();
  }

  // ---- recursion ----

  /** in() … out(): run a count change, then apply what it queued. */
  private async outermost(change: () => Promise<unknown>): Promise<void> {
    this.recursion++;
    try {
      await change();
      await this.applyOps();
    } finally {
      this.recursion--;
    }
  }

  /** apply_bops: each queued change may queue more; the queue is drained in order. */
  private async applyOps(): Promise<void> {
    while (this.uncommitted.length > 0) {
      const op = this.uncommitted[0]!;
      if (op.inc) await this.ll.inc(op.block);
      else await this.ll.dec(op.block);
      this.uncommitted.shift();
    }
  }

  private adjustment(b: number): number {
    let adjustment = 0;
    for (const op of this.uncommitted) if (op.block === b) adjustment += op.inc ? 1 : -1;
    return adjustment;
  }

  /** A block free now and at the last commit, with no queued increment (handed out moments ago). */
  private async findFree(begin: number, end: number): Promise<number> {
    for (;;) {
      const b = await findCommonFreeBlock(this.oldLl, this.ll, begin, end);
      if (b < 0 || this.adjustment(b) === 0) return b;
      begin = b + 1;
    }
  }

  private checkThreshold(): void {
    const t = this.threshold;
    if (!t) return;
    const below = this.nrFree() <= t.value;
    if (below && !t.below) t.fn();
    t.below = below;
  }
}
