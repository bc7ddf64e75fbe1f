/**
 * The pool (dm-thin.c: struct pool): one per thin-pool device, kept across reloads of its table
 * and shared by every thin device in it. It owns the metadata, the data device, the pool's mode,
 * the bio prison, the worker that provisions and copies blocks, and the commits.
 *
 * Commits are grouped: every caller asking while a commit waits its turn shares that commit
 * (the kernel batches the flushes of one worker pass into one commit). A commit first flushes the
 * data device (metadata_pre_commit_callback), so the blocks a new mapping points to are durable
 * before the mapping is.
 */
import { Bio, BioError, BioFlags, submitAndWait } from "../../core/bio.js";
import type { CopierClient } from "../../core/copier.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { Logger } from "../../core/logger.js";
import type { Clock } from "../../core/services.js";
import type { TableContext } from "../../core/target.js";
import type { WorkQueue } from "../../core/work-queue.js";
import { BioPrison } from "./bio-prison.js";
import { DeferredSet } from "./deferred-set.js";
import type { ThinPoolMetadata } from "./metadata/thin-metadata.js";
import { type PoolFeatures, type PoolMode, isReadOnlyMode } from "./params.js";
import { PersistentDataError } from "./persistent-data/errors.js";

/** The longest a commit waits for the FUA writes being provisioned (gatherCommitters). */
export const GATHER_MAX_MS = 100;

/** COMMIT_PERIOD: changes are committed at least this often. */
export const COMMIT_PERIOD_MS = 1000;
/** The no_space_timeout module parameter's default: queued I/O fails after this long without space. */
export const NO_SPACE_TIMEOUT_MS = 60_000;

const MODE_ORDER: readonly PoolMode[] = ["write", "out-of-data-space", "out-of-metadata-space", "read-only", "fail"];

/** What the pool asks of an active thin device (struct thin_c on pool->active_thins). */
export interface ActiveThin {
  /** The pool aborted its transaction: mappings and details are the last commit's again. */
  afterAbort(): Promise<void>;
  /** dm_internal_suspend_noflush of the thin device: waiting bios are pushed back, I/O drains. */
  suspendInternally(): Promise<void>;
  resumeInternally(): void;
}

export interface PoolServices {
  worker: WorkQueue;
  copier: CopierClient;
  clock: Clock;
  logger: Logger;
}

export class Pool {
  readonly prison = new BioPrison();
  /** Reads of shared blocks in flight (shared_read_ds). */
  readonly sharedReads = new DeferredSet<() => void>();
  /** Bios in flight to data blocks (all_io_ds): a discard waits for them before unmapping. */
  readonly allIo = new DeferredSet<() => void>();
  mode: PoolMode = "write";
  /** The features the controlling table asked for (pt->adjusted_pf, bound at preresume). */
  features: PoolFeatures;
  lowWaterBlocks = 0;
  private lowWaterTriggered = false;
  /** The pool device is suspended: I/O that needs the worker waits for its resume. */
  suspended = false;
  /** Tables holding the pool: pool targets and thin targets (__pool_inc/__pool_dec). */
  refs = 1;
  /** The pool target's table that last resumed (bind_control_target): where pool events go. */
  control: TableContext | null = null;
  /** That target's length in sectors (pool->ti->len). */
  controlLen = 0;
  /**
   * Active thin devices (pool->active_thins): suspended with the pool, told when an abort changed
   * their mappings back.
   */
  readonly thins = new Set<ActiveThin>();
  /** The thin devices the pool's suspend suspended, resumed with the pool. */
  private suspendedThins: ActiveThin[] = [];
  /** Work that needs free data blocks, retried at the next resume (retry_on_resume_list). */
  private noSpace: Array<(err?: "ENOSPC" | "EIO") => void> = [];
  private noSpaceTimer: { cancel(): void } | null = null;
  private commitChain: Promise<void> = Promise.resolve();
  private pendingCommit: Promise<void> | null = null;
  /** The pending commit was asked for by a FUA write or a flush (commit's `gather`). */
  private pendingGathers = false;
  private waker: { cancel(): void } | null = null;
  /**
   * Data blocks counted in the running transaction that no mapping refers to yet: allocated for
   * a mapping not inserted yet (nor given back), or held for a discard passdown. A commit leaves
   * them out of the committed space map, so a crash does not leak them.
   */
  private readonly inFlightBlocks = new Set<number>();
  /**
   * Of those, the blocks being provisioned for FUA writes, each settled (mapped or given back)
   * when its promise resolves; once mapped, the write asks for a commit.
   */
  private readonly committingWrites = new Map<number, { settled: Promise<void>; settle: () => void }>();
  /** Data blocks unmapped since the last commit, to pass down once that is committed. */
  private unmapped: number[] = [];
  /**
   * Out of metadata space, the metadata is made read-only once the blocks allocated before are
   * mapped and committed (the reserve is for them), so no block is left allocated and unmapped.
   */
  private sealing = false;

  constructor(
    readonly name: string,
    readonly metadataDevice: BlockDevice,
    readonly dataDevice: BlockDevice,
    readonly blockSize: number,
    readonly pmd: ThinPoolMetadata,
    features: PoolFeatures,
    readonly services: PoolServices,
  ) {
    this.features = features;
    pmd.preCommit = () => this.flushData();
    if (features.readOnly) this.setMode("read-only");
  }

  // ---- modes ----

  /** set_pool_mode: a worse mode takes effect at once; a better one only when asked for. */
  setMode(mode: PoolMode): void {
    if (this.mode === "fail" && mode !== "fail") return;
    const old = this.mode;
    if (mode === "write" && this.pmd.needsCheck) {
      // Only a repair (thin_check --clear-needs-check-flag) lets such a pool write again.
      this.services.logger.error(`${this.name}: unable to switch pool to write mode until repaired.`);
      mode = old === "write" ? "read-only" : old;
    }
    if (old === mode) return;
    this.mode = mode;
    this.sealing = false;
    if (mode === "out-of-metadata-space") this.sealWhenSettled();
    else if (isReadOnlyMode(mode) || mode === "fail") this.pmd.setReadOnly();
    else this.pmd.setReadWrite();
    if (mode === "out-of-data-space" && !this.features.errorIfNoSpace) this.startNoSpaceTimer();
    else this.cancelNoSpaceTimer();
    if (mode === "fail" || isReadOnlyMode(mode) || (mode === "out-of-data-space" && this.features.errorIfNoSpace)) {
      // Nothing parked for space can go on in these modes.
      this.failNoSpace(mode === "out-of-data-space" ? "ENOSPC" : "EIO");
    }
    this.services.logger.warn(`${this.name}: switching pool to ${mode} mode`);
    this.event();
  }

  /** Whether the pool refuses new mappings in its mode (writes that need one fail or wait). */
  get canProvision(): boolean {
    return this.mode === "write";
  }

  worseThan(mode: PoolMode): boolean {
    return MODE_ORDER.indexOf(this.mode) > MODE_ORDER.indexOf(mode);
  }

  event(): void {
    this.control?.event();
  }

  /**
   * metadata_operation_failed: the transaction is aborted (needs_check set) and the pool goes
   * read-only; if even the abort fails, the pool fails.
   */
  async metadataFailed(op: string, err: unknown): Promise<void> {
    const message = err instanceof Error ? err.message : String(err);
    this.services.logger.error(`${this.name}: metadata operation '${op}' failed: ${message}`);
    try {
      await this.pmd.abort();
      // The flag is committed on its own, so it is on disk whatever happens next.
      await this.pmd.setNeedsCheck();
      await this.pmd.commit();
      this.setMode("read-only");
      for (const thin of this.thins) await thin.afterAbort();
    } catch {
      this.setMode("fail");
    }
  }

  /**
   * check_for_metadata_space: no free metadata block left but the reserve, the pool goes to
   * out-of-metadata-space mode: read-only (status `ro`), its last changes committed from the
   * reserve, so nothing it acknowledged is lost and no repair is needed. Growing the metadata
   * device and resuming the pool brings it back to write mode.
   */
  checkMetadataSpace(): void {
    if (this.pmd.freeMetadataBlocks() > 0 || isReadOnlyMode(this.mode) || this.mode === "fail") return;
    this.services.logger.error(`${this.name}: No free metadata blocks`);
    this.setMode("out-of-metadata-space");
  }

  private sealWhenSettled(): void {
    this.sealing = true;
    if (this.inFlightBlocks.size === 0) this.seal();
  }

  /** The last commit before the metadata goes read-only. */
  private seal(): void {
    this.commit()
      .then(() => {
        if (this.sealing && this.mode === "out-of-metadata-space") this.pmd.setReadOnly();
      })
      .catch(() => {})
      .finally(() => (this.sealing = false));
  }

  /**
   * A block from allocDataBlock is mapped now, or was given back. If that took the last free
   * metadata block, the pool commits while the reserve is whole (and is then out of metadata
   * space), as alloc_data_block does after an allocation.
   */
  settleDataBlock(b: number): void {
    this.inFlightBlocks.delete(b);
    this.committingWrites.get(b)?.settle();
    this.committingWrites.delete(b);
    if (this.inFlightBlocks.size === 0 && this.sealing) this.seal();
    else if (this.mode === "write") this.commitIfMetadataFull();
  }

  /** After a change: no free metadata block but the reserve left, commit (and check the space). */
  commitIfMetadataFull(): void {
    if (this.pmd.freeMetadataBlocks() === 0) this.commit().catch(() => {});
  }

  // ---- suspend and resume ----

  /**
   * pool_presuspend: the pool's thin devices are suspended first (noflush: what waits in them,
   * for space or in the worker's queue, goes back to their queues), so nothing changes the
   * metadata while the pool is suspended.
   */
  async suspendThins(): Promise<void> {
    this.suspended = true;
    for (const thin of this.thins) {
      if (this.suspendedThins.includes(thin)) continue;
      this.suspendedThins.push(thin);
      await thin.suspendInternally();
    }
  }

  /** pool_resume_active_thins: at the pool's resume, or when its suspend was undone. */
  resumeThins(): void {
    this.suspended = false;
    const thins = this.suspendedThins;
    this.suspendedThins = [];
    for (const thin of thins) thin.resumeInternally();
  }

  // ---- commits ----

  /**
   * commit(): joins a commit that has not started yet, or queues one after the running one.
   * `gather`: asked for by a FUA write or a flush, which waits for it; the commit then first lets
   * in the FUA writes being provisioned (gatherCommitters). Commits nobody waits on for I/O (the
   * periodic one, suspend's, the metadata-space ones) do not wait for anyone's data I/O.
   */
  commit(opts: { gather?: boolean } = {}): Promise<void> {
    if (opts.gather) this.pendingGathers = true;
    if (this.pendingCommit) return this.pendingCommit;
    const p = this.commitChain.then(async () => {
      if (this.pendingGathers) await this.gatherCommitters();
      this.pendingGathers = false;
      this.pendingCommit = null;
      return this.commitNow();
    });
    this.pendingCommit = p;
    this.commitChain = p.catch(() => {});
    return p;
  }

  /**
   * Before a commit that FUA writes or flushes wait for starts, the FUA writes whose blocks are
   * being provisioned now (allocated; zeroing, copy or data write in flight, then the insert) are
   * let in: each asks for a commit once its mapping is inserted (or fails), so waiting for them
   * makes one commit serve them all, as a kernel worker pass commits once for every FUA bio it
   * completed (process_deferred_bios). The first turn lets the writers the last commit completed
   * submit their next writes; the last lets the settled ones reach commit(). The wait is bounded
   * (GATHER_MAX_MS): it only saves commits, and a provisioning stuck on a slow device must not
   * hold up everyone's. Without it, 16 writers of 64 KiB FUA writes shared a commit by threes, and
   * a 1 MiB FUA write's blocks took five.
   */
  private async gatherCommitters(): Promise<void> {
    await nextTurn();
    if (this.committingWrites.size === 0) return;
    let timer: { cancel(): void } | null = null;
    const bound = new Promise<void>((resolve) => (timer = this.services.clock.setTimeout(resolve, GATHER_MAX_MS)));
    await Promise.race([Promise.all([...this.committingWrites.values()].map((w) => w.settled)), bound]);
    (timer as { cancel(): void } | null)?.cancel();
    await nextTurn();
  }

  private async commitNow(): Promise<void> {
    // Out of metadata space, the commits before the metadata is sealed still go ahead.
    if (this.worseThan("out-of-data-space") && !(this.mode === "out-of-metadata-space" && !this.pmd.readOnly)) {
      throw new PersistentDataError("pool is read-only", "EINVAL");
    }
    const unmapped = this.unmapped;
    this.unmapped = [];
    let held: number[];
    try {
      held = await this.pmd.commitWithDataInFlight(unmapped);
    } catch (err) {
      await this.metadataFailed("dm_pool_commit_metadata", err);
      throw err;
    }
    if (held.length > 0) void this.passDown(held);
    this.checkMetadataSpace();
    this.checkDataSpace();
  }

  // ---- discard passdown ----

  /** Data blocks a discard unmapped: passed down once their unmapping is committed. */
  queuePassdown(blocks: readonly number[]): void {
    if (this.dataDevice.supportsDiscard) this.unmapped.push(...blocks);
  }

  /** Discard `held` (counted so that no one allocates them meanwhile), then give them back. */
  private async passDown(held: number[]): Promise<void> {
    for (const b of held) this.inFlightBlocks.add(b);
    held.sort((a, b) => a - b);
    for (let i = 0; i < held.length;) {
      let j = i + 1;
      while (j < held.length && held[j] === held[j - 1]! + 1) j++;
      await this.discardData(held[i]!, held[j - 1]! + 1);
      i = j;
    }
    for (const b of held) {
      await this.pmd.decDataRange(b, b + 1).catch(() => {});
      this.inFlightBlocks.delete(b);
    }
    if (this.inFlightBlocks.size === 0 && this.sealing) this.seal();
  }

  private discardData(begin: number, end: number): Promise<void> {
    return new Promise((resolve) => {
      const bio = new Bio("discard", this.sectorOf(begin), (end - begin) * this.blockSize, null, 0, {
        bioDone: () => resolve(),
      });
      bio.submitTo(this.dataDevice);
    });
  }

  /** Resolves once no commit is running or queued (a seal's commit, queued by a commit, included). */
  async commitsDone(): Promise<void> {
    let chain: Promise<void>;
    do {
      chain = this.commitChain;
      await chain;
    } while (chain !== this.commitChain);
  }

  /** do_waker: commit what changed at least every COMMIT_PERIOD_MS while the pool runs. */
  startWaker(): void {
    this.stopWaker();
    this.waker = this.services.clock.setTimeout(() => {
      this.waker = null;
      if (this.pmd.changedThisTransaction() && !this.worseThan("out-of-data-space")) {
        this.commit().catch(() => {});
      }
      if (!this.suspended) this.startWaker();
    }, COMMIT_PERIOD_MS);
  }

  stopWaker(): void {
    this.waker?.cancel();
    this.waker = null;
  }

  // ---- data space ----

  /**
   * alloc_data_block: a new data block; "ENOSPC" when the pool is out of data space (its mode is
   * then out-of-data-space), "EIO" when it is out of metadata space (read-only now). The caller
   * settles the block (settleDataBlock) once it is mapped or given back.
   */
  async allocDataBlock(opts: { forCommittingWrite?: boolean } = {}): Promise<number | "ENOSPC" | "EIO"> {
    // Only the reserve left: commit, and the pool is out of metadata space.
    if (this.pmd.freeMetadataBlocks() === 0) {
      await this.commit().catch(() => {});
      this.checkMetadataSpace();
      if (this.mode !== "write") return "EIO";
    }
    let b: number;
    try {
      b = await this.pmd.allocDataBlock({ inFlight: true });
    } catch (err) {
      // The data space map's own ENOSPC; one from the metadata space map is a metadata failure.
      if (err instanceof PersistentDataError && err.errno === "ENOSPC" && this.pmd.freeDataBlocks() === 0) {
        this.setMode("out-of-data-space");
        return "ENOSPC";
      }
      await this.metadataFailed("dm_pool_alloc_data_block", err);
      throw err;
    }
    this.inFlightBlocks.add(b);
    if (opts.forCommittingWrite) {
      // A block given back and handed out again before its settle ran: the old entry is done.
      this.committingWrites.get(b)?.settle();
      let settle!: () => void;
      const settled = new Promise<void>((resolve) => (settle = resolve));
      this.committingWrites.set(b, { settled, settle });
    }
    // The kernel counts the free blocks before it allocates (one worker, one block at a time);
    // here allocations run side by side, so the count is taken after, plus this block.
    this.checkLowWaterMark(this.pmd.freeDataBlocks() + 1);
    return b;
  }

  /**
   * check_low_water_mark: the first allocation that finds no more free data blocks than the low
   * water mark raises the pool's event (dm_table_event: the pool device's event number goes up,
   * `udmsetup wait` returns); once until the pool is resumed again.
   */
  private checkLowWaterMark(freeBefore: number): void {
    if (this.lowWaterTriggered || freeBefore > this.lowWaterBlocks) return;
    this.lowWaterTriggered = true;
    this.services.logger.warn(`${this.name}: reached low water mark for data device: sending event.`);
    this.event();
  }

  /**
   * retry_bios_on_resume: `retry` runs again after the next resume (the data device may have
   * grown), or is told the error if the pool gives up first (error_if_no_space, the timeout).
   */
  parkForSpace(retry: (err?: "ENOSPC" | "EIO") => void): void {
    if (this.features.errorIfNoSpace || this.worseThan("out-of-data-space")) {
      retry(this.features.errorIfNoSpace ? "ENOSPC" : "EIO");
      return;
    }
    this.noSpace.push(retry);
  }

  /** check_for_data_space: back to write mode once blocks are free again. */
  checkDataSpace(): void {
    if (this.mode === "out-of-data-space" && this.pmd.freeDataBlocks() > 0) this.setMode("write");
  }

  /** At resume: work parked for space goes again (the table may have grown the data device). */
  retryParked(): void {
    this.lowWaterTriggered = false;
    const parked = this.noSpace;
    this.noSpace = [];
    for (const retry of parked) retry();
  }

  private failNoSpace(err: "ENOSPC" | "EIO"): void {
    const parked = this.noSpace;
    this.noSpace = [];
    for (const retry of parked) retry(err);
  }

  private startNoSpaceTimer(): void {
    if (this.noSpaceTimer) return;
    this.noSpaceTimer = this.services.clock.setTimeout(() => {
      this.noSpaceTimer = null;
      // do_no_space_timeout: from queueing to erroring.
      this.features = { ...this.features, errorIfNoSpace: true };
      this.failNoSpace("ENOSPC");
      this.event();
    }, NO_SPACE_TIMEOUT_MS);
  }

  private cancelNoSpaceTimer(): void {
    this.noSpaceTimer?.cancel();
    this.noSpaceTimer = null;
  }

  // ---- data I/O ----

  /** First sector of data block `b`. */
  sectorOf(b: number): number {
    return b * this.blockSize;
  }

  /** Zero a whole data block (ll_zero). */
  zeroBlock(b: number): Promise<void> {
    return new Promise((resolve, reject) =>
      this.services.copier.zero([{ device: this.dataDevice, sector: this.sectorOf(b) }], this.blockSize, (_r, w) =>
        w ? reject(new BioError("EIO", `zeroing data block ${b} failed`)) : resolve(),
      ),
    );
  }

  /** Copy data block `from` to `to` (the copy a write to a shared block makes first). */
  copyBlock(from: number, to: number): Promise<void> {
    return new Promise((resolve, reject) =>
      this.services.copier.copy(
        { device: this.dataDevice, sector: this.sectorOf(from), sectors: this.blockSize },
        [{ device: this.dataDevice, sector: this.sectorOf(to) }],
        (readErr, w) => (readErr || w ? reject(new BioError("EIO", `copying data block ${from} failed`)) : resolve()),
      ),
    );
  }

  /** Flush the data device's cache (metadata_pre_commit_callback). */
  async flushData(): Promise<void> {
    await submitAndWait(this.dataDevice, new Bio("flush", 0, 0, null, BioFlags.PREFLUSH, null));
  }

  /** Stop the timers (the last table let go of the pool). */
  shutdown(): void {
    this.stopWaker();
    this.cancelNoSpaceTimer();
  }
}

/** Resolves after the event loop's next turn: I/O completions and timers due now run first. */
function nextTurn(): Promise<void> {
  return new Promise<void>((resolve) => setImmediate(resolve));
}
