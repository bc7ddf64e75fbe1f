/**
 * What a thin device's I/O needs beyond a lookup (dm-thin.c: process_cell, provision_block,
 * break_sharing, process_discard, process_deferred_bios), run on the pool's worker queue.
 *
 * Each piece of work holds the bio prison's cell of its virtual block (or range) from the lookup
 * until the new mapping is in the metadata; bios that arrived meanwhile wait in the cell and are
 * routed again afterwards, so they see the new mapping. In order:
 *
 * - a block written for the first time gets a data block: zeroed first unless the write covers it
 *   (or the pool skips zeroing), or copied from the external origin; then the mapping is inserted
 *   and the write goes to the new block;
 * - a write to a block a snapshot shares gets a copy first (break sharing); the mapping moves
 *   once reads of shared blocks started before have finished (shared_read_ds);
 * - a flush commits the metadata when this device changed it (the commit flushes the data device
 *   first), else goes to the data device; a FUA write that changed metadata completes after a commit;
 * - a discard unmaps the whole blocks it covers once the I/O in flight to data blocks has finished
 *   (all_io_ds); the blocks no one references any more go down to the data device once that
 *   unmapping is committed.
 */
import { Bio, BioFlags, type BioStatus } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { type Cell, virtualKey } from "./bio-prison.js";
import { type ThinDevice, WOULD_BLOCK } from "./metadata/thin-metadata.js";
import { isReadOnlyMode } from "./params.js";
import { PersistentDataError } from "./persistent-data/errors.js";
import type { Pool } from "./pool.js";
import type { ThinIoContext } from "./thin-target.js";

export class ThinWorker {
  /** The highest mapped virtual block, kept here because status lines cannot wait for a lookup. */
  highest: number | undefined;
  /**
   * A noflush suspend is under way (tc->requeue_mode): bios that would wait, and work that has
   * not started, are pushed back to the device (DM_REQUEUE) to be mapped again after the resume.
   */
  requeueMode = false;
  /** Work queued or running for this device (parked work excluded). */
  private outstanding = 0;
  private idle: (() => void)[] = [];
  /** Cells of this device parked until the pool has space (its share of retry_on_resume_list). */
  private readonly parked = new Set<Cell>();

  constructor(
    private readonly pool: Pool,
    private readonly td: ThinDevice,
    private readonly origin: BlockDevice | null,
  ) {}

  private get blockSize(): number {
    return this.pool.blockSize;
  }

  // ---- routing ----

  /**
   * Route a bio: true when it was remapped to its data block (the caller issues it), false when
   * it waits in the prison or went to the worker.
   */
  route(bio: Bio): boolean {
    const pool = this.pool;
    if (bio.op === "flush" || bio.op === "discard" || bio.isPreflush || bio.isFua) {
      this.defer(bio);
      return false;
    }
    const block = Math.floor(bio.sector / this.blockSize);
    const virt = pool.prison.detain(virtualKey(this.td.id, block), bio);
    if (virt.existed) return false;
    const found = this.td.tryFindBlock(block);
    if (found === WOULD_BLOCK || found === undefined || found.shared) {
      this.deferCell(virt.cell);
      return false;
    }
    // Counted in flight before the cell goes: a discard of this block waits for it from here on.
    this.remapTracked(bio, found.block);
    pool.prison.release(virt.cell);
    return true;
  }

  /** Route a bio the target already owns (released from a cell): issue it if it was remapped. */
  private reroute(bio: Bio): void {
    if (this.requeueMode) bio.complete("DM_REQUEUE");
    else if (this.pool.mode === "fail") bio.complete("EIO");
    else if (this.route(bio)) bio.device!.submit(bio);
  }

  /** Point a bio at data block `b`, counting it as I/O in flight to the data device. */
  private remapTracked(bio: Bio, b: number): void {
    const ctx = bio.mapContext as ThinIoContext | undefined;
    if (ctx) ctx.allIo = this.pool.allIo.inc();
    bio.device = this.pool.dataDevice;
    bio.sector = this.pool.sectorOf(b) + (bio.sector % this.blockSize);
  }

  defer(bio: Bio): void {
    this.queue(() => this.processBio(bio));
  }

  deferCell(cell: Cell): void {
    this.queue(() => this.processCell(cell));
  }

  private queue(work: () => Promise<void>): void {
    this.outstanding++;
    this.pool.services.worker.queue(async () => {
      try {
        await work();
      } catch (err) {
        this.pool.services.logger.error(`${this.pool.name}: thin ${this.td.id}: ${(err as Error).message}`);
      } finally {
        this.done();
      }
    });
  }

  private done(): void {
    if (--this.outstanding > 0) return;
    const idle = this.idle;
    this.idle = [];
    for (const wake of idle) wake();
  }

  /** Resolves once no work of this device is queued or running (parked work aside). */
  drain(): Promise<void> {
    if (this.outstanding === 0) return Promise.resolve();
    return new Promise((resolve) => this.idle.push(resolve));
  }

  /**
   * do_noflush_start and requeue_io: from now on bios that would wait are pushed back, and so are
   * the cells parked for space. Work already running finishes (the suspend waits for it).
   */
  startRequeue(): void {
    this.requeueMode = true;
    for (const cell of this.parked) {
      this.parked.delete(cell);
      this.errorCell(cell, "DM_REQUEUE");
    }
  }

  /** do_noflush_stop */
  stopRequeue(): void {
    this.requeueMode = false;
  }

  async refreshHighest(): Promise<void> {
    this.highest = await this.td.highestMappedBlock();
  }

  /** The pool aborted its transaction: mappings and details are the last commit's again. */
  async afterAbort(): Promise<void> {
    await this.refreshHighest();
  }

  // ---- deferred bios: flushes, FUA writes, discards ----

  private async processBio(bio: Bio): Promise<void> {
    if (this.requeueMode) {
      bio.complete("DM_REQUEUE");
      return;
    }
    if (bio.op === "discard") return this.processDiscard(bio);
    if (bio.op === "flush" || bio.sectors === 0) {
      // Changed metadata: the commit flushes the data device before the superblock goes out.
      if (this.td.changed) {
        this.completeAfterCommit(bio);
        return;
      }
      bio.device = this.pool.dataDevice;
      bio.device.submit(bio);
      return;
    }
    const block = Math.floor(bio.sector / this.blockSize);
    const virt = this.pool.prison.detain(virtualKey(this.td.id, block), bio);
    if (!virt.existed) await this.processCell(virt.cell);
  }

  /** The commit a flush or a FUA write waits for (pool.commit's `gather`). */
  private async commitStatus(): Promise<BioStatus> {
    try {
      await this.pool.commit({ gather: true });
      return "ok";
    } catch {
      return "EIO";
    }
  }

  /** Complete `bio` once its commit is done, off the worker (deferred_flush_completions). */
  private completeAfterCommit(bio: Bio): void {
    void this.commitStatus()
      .then((status) => bio.complete(status))
      .catch((err: unknown) =>
        this.pool.services.logger.error(`${this.pool.name}: completing a bio after a commit failed: ${String(err)}`),
      );
  }

  /** issue(): a FUA write that follows metadata changes of this device waits for their commit. */
  private issue(bio: Bio, b: number): void {
    this.remapTracked(bio, b);
    if ((bio.isFua || bio.isPreflush) && this.td.changed) {
      void this.commitStatus()
        .then((status) => (status === "ok" ? bio.device!.submit(bio) : bio.complete(status)))
        .catch((err: unknown) =>
          this.pool.services.logger.error(`${this.pool.name}: issuing a bio after a commit failed: ${String(err)}`),
        );
      return;
    }
    bio.device!.submit(bio);
  }

  /** The holder goes to data block `b`; the bios that waited are routed again. */
  private issueCell(cell: Cell, b: number): void {
    const [holder, ...waiting] = this.pool.prison.release(cell);
    this.issue(holder!, b);
    for (const bio of waiting) this.reroute(bio);
  }

  private releaseWaiting(cell: Cell): void {
    for (const bio of this.pool.prison.releaseNoHolder(cell)) this.reroute(bio);
  }

  private errorCell(cell: Cell, status: BioStatus): void {
    this.pool.prison.error(cell, status);
  }

  // ---- cells: lookups that needed I/O, unmapped and shared blocks ----

  private async processCell(cell: Cell): Promise<void> {
    if (this.requeueMode) {
      this.errorCell(cell, "DM_REQUEUE");
      return;
    }
    const bio = cell.holder!;
    const block = Math.floor(bio.sector / this.blockSize);
    let found;
    try {
      found = await this.td.findBlock(block);
    } catch (err) {
      return this.metadataFailed("dm_thin_find_block", err, cell);
    }
    if (found && !found.shared) return this.issueCell(cell, found.block);
    if (found) {
      if (bio.op === "read") return this.sharedRead(cell, found.block);
      return this.breakSharing(cell, block, found.block);
    }
    if (bio.op === "read") return this.readUnmapped(cell, bio);
    return this.provision(cell, block);
  }

  /** A read of a shared block: counted, so the block's last owner waits for it before moving on. */
  private sharedRead(cell: Cell, b: number): void {
    const holder = cell.holder!;
    const entry = this.pool.sharedReads.inc();
    this.releaseWaiting(cell);
    const child = new Bio(
      "read",
      this.pool.sectorOf(b) + (holder.sector % this.blockSize),
      holder.sectors,
      holder.data,
      holder.flags,
      {
        bioDone: (c) => {
          for (const work of this.pool.sharedReads.dec(entry)) work();
          holder.complete(c.status);
        },
      },
    );
    child.submitTo(this.pool.dataDevice);
  }

  /** An unmapped block reads as zeros, or as the external origin where it has data. */
  private readUnmapped(cell: Cell, bio: Bio): void {
    this.releaseWaiting(cell);
    const originSectors = this.origin?.sizeSectors ?? 0;
    if (bio.sector >= originSectors) {
      bio.data.fill(0, 0, bio.bytes);
      bio.complete("ok");
      return;
    }
    // Read what the origin has; past its end, zeros.
    const sectors = Math.min(bio.sectors, originSectors - bio.sector);
    bio.data.fill(0, sectors * 512, bio.bytes);
    const child = new Bio("read", bio.sector, sectors, bio.data.subarray(0, sectors * 512), 0, {
      bioDone: (c) => bio.complete(c.status),
    });
    child.submitTo(this.origin!);
  }

  /** What a write the pool cannot serve in its mode gets (handle_unserviceable_bio). */
  private unserviceable(cell: Cell): void {
    this.errorCell(cell, this.pool.mode === "out-of-data-space" ? "ENOSPC" : "EIO");
  }

  /** A new data block, or undefined when the cell was parked for space or failed. */
  private async allocate(cell: Cell): Promise<number | undefined> {
    if (isReadOnlyMode(this.pool.mode) || this.pool.mode === "fail") {
      this.unserviceable(cell);
      return undefined;
    }
    let b: number | "ENOSPC" | "EIO";
    try {
      const bio = cell.holder!;
      b = await this.pool.allocDataBlock({ forCommittingWrite: bio.isFua });
    } catch {
      this.errorCell(cell, "EIO");
      return undefined;
    }
    if (b === "EIO") {
      this.unserviceable(cell);
      return undefined;
    }
    if (b !== "ENOSPC") return b;
    // Parked work is no longer this device's outstanding work (a suspend does not wait for
    // space); the retry queues it again, unless a noflush suspend pushed the cell's bios back.
    this.parked.add(cell);
    this.pool.parkForSpace((err) => {
      if (!this.parked.delete(cell)) return;
      if (err) this.errorCell(cell, err);
      else this.deferCell(cell);
    });
    return undefined;
  }

  /** provision_block: a first write to `block`. */
  private async provision(cell: Cell, block: number): Promise<void> {
    const bio = cell.holder!;
    const b = await this.allocate(cell);
    if (b === undefined) return;
    if (this.coversBlock(bio)) return this.overwrite(cell, block, b);
    try {
      if (this.origin) await this.copyFromOrigin(block, b);
      else if (this.pool.features.zeroNewBlocks) await this.pool.zeroBlock(b);
    } catch {
      return this.dataFailed(cell, b);
    }
    if (await this.insert(cell, block, b)) this.issueCell(cell, b);
  }

  /** break_sharing: a write to a block a snapshot shares goes to a copy of it. */
  private async breakSharing(cell: Cell, block: number, old: number): Promise<void> {
    const bio = cell.holder!;
    const b = await this.allocate(cell);
    if (b === undefined) return;
    if (this.coversBlock(bio)) return this.overwrite(cell, block, b, true);
    try {
      await this.pool.copyBlock(old, b);
    } catch {
      return this.dataFailed(cell, b);
    }
    await this.quiesceSharedReads();
    if (await this.insert(cell, block, b)) this.issueCell(cell, b);
  }

  /** The write covers the whole block: it is the block's contents, no zeroing or copy first. */
  private async overwrite(cell: Cell, block: number, b: number, shared = false): Promise<void> {
    const bio = cell.holder!;
    // Without FUA: the mapping's insert changes metadata, so the holder completes only after a
    // commit, and every commit flushes the data device first (metadata_pre_commit_callback).
    const flags = bio.flags & ~BioFlags.FUA;
    const status = await new Promise<BioStatus>((resolve) => {
      const child = new Bio("write", this.pool.sectorOf(b), bio.sectors, bio.data, flags, {
        bioDone: (c) => resolve(c.status),
      });
      child.submitTo(this.pool.dataDevice);
    });
    if (status !== "ok") return this.dataFailed(cell, b, status);
    if (shared) await this.quiesceSharedReads();
    if (!(await this.insert(cell, block, b))) return;
    const [holder, ...waiting] = this.pool.prison.release(cell);
    // complete_overwrite_bio: a FUA write is durable only once its mapping is. It waits for the
    // commit off the worker (deferred_flush_completions), which goes on with other blocks: the
    // commit then serves them too.
    if (holder!.isFua && this.td.changed) this.completeAfterCommit(holder!);
    else holder!.complete("ok");
    for (const w of waiting) this.reroute(w);
  }

  private coversBlock(bio: Bio): boolean {
    return bio.op === "write" && bio.sector % this.blockSize === 0 && bio.sectors === this.blockSize;
  }

  /** schedule_external_copy: the new block starts as the origin's data (zeros past its end). */
  private async copyFromOrigin(block: number, b: number): Promise<void> {
    const start = block * this.blockSize;
    const inOrigin = Math.max(0, Math.min(this.blockSize, this.origin!.sizeSectors - start));
    if (inOrigin < this.blockSize) await this.pool.zeroBlock(b);
    if (inOrigin === 0) return;
    await new Promise<void>((resolve, reject) =>
      this.pool.services.copier.copy(
        { device: this.origin!, sector: start, sectors: inOrigin },
        [{ device: this.pool.dataDevice, sector: this.pool.sectorOf(b) }],
        (readErr, w) => (readErr || w ? reject(new Error(`copy from the origin failed`)) : resolve()),
      ),
    );
  }

  private quiesceSharedReads(): Promise<void> {
    return new Promise((resolve) => {
      if (!this.pool.sharedReads.addWork(resolve)) resolve();
    });
  }

  /** Map `block` to `b`; on a metadata failure the cell's bios fail. */
  private async insert(cell: Cell, block: number, b: number): Promise<boolean> {
    try {
      await this.td.insertBlock(block, b);
    } catch (err) {
      await this.metadataFailed("dm_thin_insert_block", err, cell);
      return false;
    } finally {
      this.pool.settleDataBlock(b);
    }
    if (this.highest === undefined || block > this.highest) this.highest = block;
    return true;
  }

  /** The data I/O for a new block failed: the block goes back, the bios fail. */
  private async dataFailed(cell: Cell, b: number, status: BioStatus = "EIO"): Promise<void> {
    await this.pool.pmd.decDataRange(b, b + 1).catch(() => {});
    this.pool.settleDataBlock(b);
    this.errorCell(cell, status);
  }

  private async metadataFailed(op: string, err: unknown, cell: Cell): Promise<void> {
    this.errorCell(cell, "EIO");
    if (!(err instanceof PersistentDataError) || err.errno !== "EINVAL" || this.pool.mode !== "fail") {
      await this.pool.metadataFailed(op, err);
    }
  }

  // ---- discards ----

  /** process_discard_bio: unmap the whole blocks the discard covers; queue them for passdown. */
  private async processDiscard(bio: Bio): Promise<void> {
    const bs = this.blockSize;
    const begin = Math.ceil(bio.sector / bs);
    const end = Math.floor((bio.sector + bio.sectors) / bs);
    // Nothing to unmap (part of a block), or a pool that cannot change its metadata: done.
    if (begin >= end || isReadOnlyMode(this.pool.mode) || this.pool.mode === "fail") {
      bio.complete(this.pool.mode === "fail" ? "EIO" : "ok");
      return;
    }
    const virt = this.pool.prison.detain(virtualKey(this.td.id, begin, end), bio);
    if (virt.existed) return;
    await new Promise<void>((resolve) => {
      if (!this.pool.allIo.addWork(resolve)) resolve();
    });
    const runs: { begin: number; end: number; pool: number }[] = [];
    try {
      for (let v = begin; v < end;) {
        const r = await this.td.findMappedRange(v, end);
        if (!r) break;
        runs.push({ begin: r.thinBegin, end: r.thinEnd, pool: r.poolBegin });
        v = r.thinEnd;
      }
      if (runs.length > 0) {
        await this.td.removeRange(begin, end);
        // Unmapping blocks of a shared tree copies its nodes: it can use metadata up too.
        this.pool.commitIfMetadataFull();
      }
      if (this.highest !== undefined && this.highest >= begin && this.highest < end) await this.refreshHighest();
    } catch (err) {
      return this.metadataFailed("dm_thin_remove_range", err, virt.cell);
    }
    if (this.pool.features.discardPassdown) this.passDown(runs);
    const [holder, ...waiting] = this.pool.prison.release(virt.cell);
    holder!.complete("ok");
    for (const w of waiting) this.reroute(w);
  }

  /**
   * The data blocks of `runs` go down to the data device once their unmapping is committed, those
   * no device (or snapshot) maps then (the pool checks at its next commit).
   */
  private passDown(runs: { begin: number; end: number; pool: number }[]): void {
    const blocks: number[] = [];
    for (const run of runs) for (let i = 0; i < run.end - run.begin; i++) blocks.push(run.pool + i);
    this.pool.queuePassdown(blocks);
  }
}
