/**
 * The transaction manager (dm-transaction-manager.c): copy-on-write on top of the block manager.
 *
 * A block written in this transaction is either new (`newBlock`) or a shadow of an existing one
 * (`shadow`): a copy in a freshly allocated block, the original's count dropped by one. Blocks
 * allocated in this transaction are remembered, so a second shadow of one of them writes it in
 * place. A shadowed block still referenced from elsewhere (count > 1) is copied even if it is ours,
 * and the caller then takes a reference on its children (`incChildren`), which is how snapshots
 * and shared btree nodes come apart.
 *
 * Nothing the last commit points to is ever written: its blocks are shadowed, never written in
 * place, and the space maps do not hand out a block that was in use at the last commit until the
 * next one. So the previous transaction stays intact on disk until `commit` writes the superblock.
 */
import type { BlockManager, BlockValidator } from "./block-manager.js";
import type { SpaceMap } from "./space-map.js";

export interface ShadowResult {
  location: number;
  data: Buffer;
  /** The original was shared: the copy's children need one more reference. */
  incChildren: boolean;
}

export class TransactionManager {
  private shadows = new Set<number>();
  /** Set once the metadata space map exists (it is built on this transaction manager). */
  sm!: SpaceMap;

  constructor(readonly bm: BlockManager) {}

  async newBlock(v: BlockValidator): Promise<{ location: number; data: Buffer }> {
    const location = await this.sm.newBlock();
    const data = this.bm.writeLockZero(location, v);
    // New blocks count as shadows: they need no second copy in this transaction.
    this.shadows.add(location);
    return { location, data };
  }

  async shadow(orig: number, v: BlockValidator): Promise<ShadowResult> {
    const incChildren = await this.sm.countIsMoreThanOne(orig);
    if (!incChildren && this.shadows.has(orig)) {
      return { location: orig, data: await this.bm.writeLock(orig, v), incChildren };
    }
    const location = await this.sm.newBlock();
    await this.sm.dec(orig);
    const src = await this.bm.read(orig, v);
    const data = this.bm.writeLockZero(location, v);
    src.copy(data);
    this.shadows.add(location);
    return { location, data, incChildren };
  }

  read(b: number, v: BlockValidator): Promise<Buffer> {
    return this.bm.read(b, v);
  }

  /** The block without I/O, or undefined (the kernel's non-blocking clone). */
  peek(b: number, v: BlockValidator): Buffer | undefined {
    return this.bm.peek(b, v);
  }

  prefetch(b: number): void {
    this.bm.prefetch(b);
  }

  inc(b: number): Promise<void> {
    return this.sm.inc(b);
  }

  dec(b: number): Promise<void> {
    return this.sm.dec(b);
  }

  refCount(b: number): Promise<number> {
    return this.sm.getCount(b);
  }

  /** dm_tm_block_is_shared */
  isShared(b: number): Promise<boolean> {
    return this.sm.countIsMoreThanOne(b);
  }

  /** dm_tm_pre_commit: seal the metadata space map (its index may still need a block). */
  async preCommit(): Promise<void> {
    await this.sm.commit();
  }

  /** dm_tm_commit: write the transaction, the superblock last; the next transaction starts with no shadows. */
  async commit(superblock: number): Promise<void> {
    this.shadows = new Set();
    await this.bm.commit(superblock);
  }

  /** Drop the running transaction's shadows (abort: the block manager forgets its dirty blocks too). */
  reset(): void {
    this.shadows = new Set();
  }
}
