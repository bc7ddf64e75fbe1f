/**
 * The block manager (dm-block-manager.c over dm-bufio): the metadata device as 4 KiB blocks, a
 * cache of them, and validators that check a block the first time it is used with a given type
 * and seal it (block number, checksum) whenever it is written.
 *
 * There are no block locks: the pool metadata runs one writer at a time (metadata/lock.ts), so a
 * buffer handed out here stays valid for as long as its caller holds it. Dirty blocks are never
 * evicted; clean ones are dropped oldest first beyond `maxCleanBlocks`.
 *
 * `commit` is dm_bm_flush_and_unlock's ordering: every dirty block but the superblock, a cache
 * flush, then the superblock alone with FUA. A crash at any point leaves either the old superblock
 * (whose blocks the transaction never overwrote, see transaction-manager.ts) or the new one with
 * everything it points to on stable storage.
 */
import { Bio, BioError, BioFlags, submitAndWait } from "../../../core/bio.js";
import type { BlockDevice } from "../../../core/devices/block-device.js";
import { pdError } from "./errors.js";

export const METADATA_BLOCK_SIZE = 4096;
export const SECTORS_PER_BLOCK = 8;

/** dm_block_validator: `check` throws a PersistentDataError (EILSEQ, ENOTBLK) for a bad block. */
export interface BlockValidator {
  readonly name: string;
  prepareForWrite(data: Buffer, location: number): void;
  check(data: Buffer, location: number): void;
}

interface CacheEntry {
  data: Buffer;
  dirty: boolean;
  /** The validator the block passed (or was created with); null: read but not checked yet (prefetch). */
  validator: BlockValidator | null;
}

export interface BlockManagerOptions {
  /** Clean blocks kept in memory (default 16384, 64 MiB). */
  maxCleanBlocks?: number;
  readOnly?: boolean;
}

/** Metadata writes are merged into bios of at most this many consecutive blocks. */
const MAX_RUN_BLOCKS = 64;

export class BlockManager {
  /** Least recently used first. */
  private readonly cache = new Map<number, CacheEntry>();
  private readonly reading = new Map<number, Promise<CacheEntry>>();
  private dirtyCount = 0;
  private readonly maxCleanBlocks: number;
  /** dm_bm_set_read_only: write locks fail with EPERM. */
  readOnly: boolean;
  /** Blocks read from and written to the device, for tests and benchmarks. */
  readonly stats = { reads: 0, writes: 0, flushes: 0 };

  constructor(
    readonly device: BlockDevice,
    options: BlockManagerOptions = {},
  ) {
    this.maxCleanBlocks = options.maxCleanBlocks ?? 16384;
    this.readOnly = options.readOnly ?? false;
  }

  /** dm_bm_nr_blocks: whole 4 KiB blocks on the device. */
  get nrBlocks(): number {
    return Math.floor(this.device.sizeSectors / SECTORS_PER_BLOCK);
  }

  get dirtyBlocks(): number {
    return this.dirtyCount;
  }

  /** The block if it is in memory, checked with `v`; undefined when reading it needs I/O (dm_bm_read_try_lock). */
  peek(b: number, v: BlockValidator | null): Buffer | undefined {
    const e = this.cache.get(b);
    if (!e) return undefined;
    this.validate(e, b, v);
    this.touch(b, e);
    return e.data;
  }

  /** dm_bm_read_lock: the block's contents, checked with `v` (null: unchecked). Do not modify them. */
  async read(b: number, v: BlockValidator | null): Promise<Buffer> {
    const e = this.cache.get(b) ?? (await this.load(b));
    this.validate(e, b, v);
    this.touch(b, e);
    return e.data;
  }

  /** dm_bm_write_lock: the block's contents, to modify; written at the next flush or commit. */
  async writeLock(b: number, v: BlockValidator): Promise<Buffer> {
    this.checkWritable(b);
    const e = this.cache.get(b) ?? (await this.load(b));
    this.validate(e, b, v);
    this.markDirty(e);
    this.touch(b, e);
    return e.data;
  }

  /** dm_bm_write_lock_zero: a zeroed block whose old contents are never read. */
  writeLockZero(b: number, v: BlockValidator): Buffer {
    this.checkWritable(b);
    if (b >= this.nrBlocks)
      throw pdError("ENOSPC", `metadata block ${b} is beyond the device (${this.nrBlocks} blocks)`);
    const old = this.cache.get(b);
    // A fresh buffer, so nobody still holding the old contents sees them change under it.
    const e: CacheEntry = { data: Buffer.alloc(METADATA_BLOCK_SIZE), dirty: false, validator: v };
    if (old?.dirty) {
      // The new entry inherits the old one's place in the dirty count.
      old.dirty = false;
      e.dirty = true;
    } else {
      this.markDirty(e);
    }
    this.cache.delete(b);
    this.cache.set(b, e);
    return e.data;
  }

  /** dm_bm_prefetch: start reading a block into the cache; errors surface when it is used. */
  prefetch(b: number): void {
    if (this.cache.has(b) || this.reading.has(b) || b >= this.nrBlocks) return;
    this.load(b).catch(() => {});
  }

  /** Write every dirty block, then flush the device's cache (dm_bm_flush). */
  async flush(): Promise<void> {
    await this.writeDirty(() => true, 0);
    await this.flushDevice();
  }

  /**
   * Make a transaction durable: every dirty block except `superblock`, a flush, then the
   * superblock with FUA. The superblock must be dirty (it is what commits the transaction).
   */
  async commit(superblock: number): Promise<void> {
    await this.writeDirty((b) => b !== superblock, 0);
    await this.flushDevice();
    await this.writeDirty((b) => b === superblock, BioFlags.FUA);
  }

  /** Forget every cached block, dirty ones included: what a transaction abort needs (dm_block_manager_reset). */
  reset(): void {
    this.cache.clear();
    this.dirtyCount = 0;
  }

  // ---- internals ----

  private checkWritable(b: number): void {
    if (this.readOnly) throw pdError("EPERM", `metadata is read-only: cannot write block ${b}`);
  }

  private validate(e: CacheEntry, b: number, v: BlockValidator | null): void {
    if (!v || e.validator === v) return;
    if (e.validator) {
      throw pdError("EINVAL", `validator mismatch for block ${b} (old=${e.validator.name} vs new=${v.name})`);
    }
    v.check(e.data, b);
    e.validator = v;
  }

  private markDirty(e: CacheEntry): void {
    if (e.dirty) return;
    e.dirty = true;
    this.dirtyCount++;
  }

  private touch(b: number, e: CacheEntry): void {
    this.cache.delete(b);
    this.cache.set(b, e);
  }

  private load(b: number): Promise<CacheEntry> {
    let p = this.reading.get(b);
    if (!p) {
      p = this.readBlock(b).then(
        (data) => {
          this.reading.delete(b);
          // A block zeroed for writing while the read was in flight keeps its new contents.
          const cached = this.cache.get(b);
          if (cached) return cached;
          const e: CacheEntry = { data, dirty: false, validator: null };
          this.cache.set(b, e);
          this.evict();
          return e;
        },
        (err: unknown) => {
          this.reading.delete(b);
          throw err;
        },
      );
      this.reading.set(b, p);
    }
    return p;
  }

  private evict(): void {
    let budget = this.cache.size;
    while (this.cache.size - this.dirtyCount > this.maxCleanBlocks && budget-- > 0) {
      const first = this.cache.entries().next();
      if (first.done) return;
      const [b, e] = first.value;
      this.cache.delete(b);
      // Dirty blocks stay until written: move them to the recent end and keep looking.
      if (e.dirty) this.cache.set(b, e);
    }
  }

  private async readBlock(b: number): Promise<Buffer> {
    if (b >= this.nrBlocks) throw pdError("EIO", `metadata block ${b} is beyond the device (${this.nrBlocks} blocks)`);
    const data = Buffer.alloc(METADATA_BLOCK_SIZE);
    await this.io(new Bio("read", b * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK, data, 0, null), `read of block ${b}`);
    this.stats.reads++;
    return data;
  }

  private async writeDirty(select: (b: number) => boolean, flags: number): Promise<void> {
    const blocks: number[] = [];
    for (const [b, e] of this.cache) if (e.dirty && select(b)) blocks.push(b);
    if (blocks.length === 0) return;
    blocks.sort((x, y) => x - y);
    const writes: Promise<void>[] = [];
    for (let i = 0; i < blocks.length;) {
      let j = i + 1;
      while (j < blocks.length && blocks[j] === blocks[j - 1]! + 1 && j - i < MAX_RUN_BLOCKS) j++;
      writes.push(this.writeRun(blocks.slice(i, j), flags));
      i = j;
    }
    const results = await Promise.allSettled(writes);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) throw failed.reason;
  }

  private async writeRun(run: number[], flags: number): Promise<void> {
    const entries = run.map((b) => this.cache.get(b)!);
    entries.forEach((e, k) => e.validator?.prepareForWrite(e.data, run[k]!));
    const data = entries.length === 1 ? entries[0]!.data : Buffer.concat(entries.map((e) => e.data));
    const first = run[0]!;
    await this.io(
      new Bio("write", first * SECTORS_PER_BLOCK, run.length * SECTORS_PER_BLOCK, data, flags, null),
      `write of blocks ${first}..${first + run.length - 1}`,
    );
    this.stats.writes += run.length;
    for (const e of entries) {
      if (!e.dirty) continue;
      e.dirty = false;
      this.dirtyCount--;
    }
    this.evict();
  }

  private async flushDevice(): Promise<void> {
    await this.io(new Bio("flush", 0, 0, null, BioFlags.PREFLUSH, null), "flush");
    this.stats.flushes++;
  }

  private async io(bio: Bio, what: string): Promise<void> {
    try {
      await submitAndWait(this.device, bio);
    } catch (err) {
      const status = err instanceof BioError ? err.status : String(err);
      throw pdError("EIO", `${this.device.displayName}: metadata ${what} failed: ${status}`);
    }
  }
}
