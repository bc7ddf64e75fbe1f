/**
 * snapshot-merge: `snapshot-merge <origin> <cow> <P|PO> <chunk_size> [<#features> <feature>...]`
 * (dm-snap.c: snapshot_merge_next_chunks, merge_callback; docs/snapshot.md).
 *
 * The table replaces snapshot-origin on the origin's device and copies the snapshot's chunks back
 * onto the origin in batches, newest record first; docs/snapshot.md ("The merge loop") gives the
 * steps of a batch (numbered there and below), the I/O rules and the failure behaviour.
 */
import { type Bio, flushBio, submitAndWait } from "../../core/bio.js";
import type { Copier } from "../../core/copier.js";
import type { OpenMode } from "../../core/devices/block-device.js";
import type { Logger } from "../../core/logger.js";
import { target } from "../../core/registry.js";
import { type DeviceLookup, Services } from "../../core/services.js";
import { MapResult, TargetError } from "../../core/target.js";
import { pendingExceptionsDoneCount, whenPendingExceptionDone } from "./origin-registry.js";
import { originMapWrite, originWrite } from "./origin-write.js";
import type { SnapshotParams } from "./params.js";
import { SnapshotParamsToken } from "./params.js";
import { SnapshotTarget } from "./snapshot.js";
import type { TrackContext } from "./tracked-chunks.js";

@target({
  name: "snapshot-merge",
  version: [1, 5, 0],
  inject: [Services.DeviceLookup, Services.Copier, Services.Logger, SnapshotParamsToken],
})
export class SnapshotMergeTarget extends SnapshotTarget {
  override readonly isMerge: boolean = true;

  /** The batch being copied (first_merging_chunk, num_merging_chunks): writes to it are held. */
  private firstMergingChunk = 0;
  private numMergingChunks = 0;
  /** Writes to the merging range, retargeted to the origin, released once the batch commits. */
  private heldDuringMerge: Bio[] = [];
  /** RUNNING_MERGE / SHUTDOWN_MERGE. */
  private running = false;
  private shutdown = false;
  private stopWaiters: (() => void)[] = [];
  /** Batches merged by this table (progress, tests). */
  mergedBatches = 0;

  constructor(devices: DeviceLookup, copier: Copier, logger: Logger, params: SnapshotParams) {
    super(devices, copier, logger, params);
  }

  override async ctr(args: string[]): Promise<void> {
    await super.ctr(args);
    // Flush clone 0 goes to the origin, clone 1 to the COW device.
    this.numFlushBios = 2;
  }

  /** The merge writes the origin. */
  protected override originMode(): OpenMode {
    return "rw";
  }

  protected override checkHandover(source: SnapshotTarget | null): void {
    if (!source) {
      // Reactivation (no snapshot to take over from): the store must be able to merge. The kernel
      // would only find out at resume, by calling the transient store's missing merge hook.
      if (!this.store.prepareMerge || !this.store.commitMerge) {
        throw new TargetError("Snapshot exception store does not support snapshot-merge.");
      }
      return;
    }
    if (this.originEntry.snapshots.some((s) => s.isMerge)) throw new TargetError("A snapshot is already merging.");
    if (!source.store.prepareMerge || !source.store.commitMerge) {
      throw new TargetError("Snapshot exception store does not support snapshot-merge.");
    }
  }

  /** Every I/O is cut at chunk boundaries, as the kernel's: the merge's map works per chunk. */
  protected override setChunkLimits(): void {
    super.setChunkLimits();
    this.maxIoLen = this.store.chunkSize;
  }

  override async resume(): Promise<void> {
    await super.resume(); // hand over the store (if any), become active
    // The device is the origin now: no I/O may span two chunks of any snapshot of it.
    this.maxIoLen = this.originEntry.minChunkSize() || this.chunkSize;
    this.startMerge();
  }

  /** A suspended merge device never has a batch in flight. */
  override async presuspend(): Promise<void> {
    await this.stopMerge();
  }

  override async dtr(): Promise<void> {
    await this.stopMerge();
    await super.dtr();
  }

  // ---- merge control ----

  override get mergeRunning(): boolean {
    return this.running;
  }

  override startMerge(): void {
    if (this.running) return;
    this.running = true;
    void this.mergeLoop();
  }

  override async stopMerge(): Promise<void> {
    if (!this.running) return;
    this.shutdown = true;
    await new Promise<void>((resolve) => this.stopWaiters.push(resolve));
    this.shutdown = false;
  }

  private async mergeLoop(): Promise<void> {
    try {
      while (await this.mergeNextBatch()) this.mergedBatches++;
    } catch (err) {
      // Nothing above throws by design; if something does, stop as a failed merge.
      this.logger.error("snapshot-merge: merge stopped unexpectedly", {
        device: this.table.deviceName,
        error: String(err),
      });
      this.failMerge();
    } finally {
      this.running = false;
      for (const wake of this.stopWaiters.splice(0)) wake();
    }
  }

  /** One batch (snapshot_merge_next_chunks + merge_callback). Returns false when the merge stops. */
  private async mergeNextBatch(): Promise<boolean> {
    if (this.shutdown) return false;
    if (!this.valid) {
      this.logger.error("Snapshot is invalid: can't merge", { device: this.table.deviceName });
      this.table.event();
      return false;
    }
    let next: Awaited<ReturnType<NonNullable<typeof this.store.prepareMerge>>>;
    try {
      next = await this.store.prepareMerge!();
    } catch (err) {
      this.logger.error("Read error in exception store: shutting down merge", {
        device: this.table.deviceName,
        error: String(err),
      });
      this.mergeFailed = true;
      this.table.event();
      return false;
    }
    if (next === 0) {
      this.logger.info("snapshot-merge: merge complete", { device: this.table.deviceName });
      this.table.event();
      return false;
    }
    const n = next.count;
    const oldFirst = next.oldChunk + 1 - n;
    const newFirst = next.newChunk + 1 - n;
    const cs = this.chunkSize;
    const ioSize = n * cs;
    const dest = oldFirst * cs;
    const sectors = Math.min(ioSize, this.origin.sizeSectors - dest);

    // Every other snapshot keeps the origin's data of the range before the merge overwrites it
    // (R9): trigger their copies, and look again each time any pending exception finishes.
    let seen = pendingExceptionsDoneCount();
    while (this.originWriteExtent(dest, ioSize)) {
      await whenPendingExceptionDone(seen);
      seen = pendingExceptionsDoneCount();
    }

    // From here writes to any chunk of the batch are held (R10); wait for those already remapped
    // to the COW copies.
    this.firstMergingChunk = oldFirst;
    this.numMergingChunks = n;
    for (let i = 0; i < n; i++)
      if (this.tracked.isTracked(oldFirst + i)) await this.tracked.whenUntracked(oldFirst + i);

    const { readErr, writeErrMask } = await new Promise<{ readErr: boolean; writeErrMask: number }>((resolve) => {
      this.copierClient.copy(
        { device: this.cow, sector: newFirst * cs, sectors },
        [{ device: this.origin, sector: dest }],
        (readErr, writeErrMask) => resolve({ readErr, writeErrMask }),
      );
    });
    if (readErr || writeErrMask) {
      this.logger.error(readErr ? "Read error: shutting down merge." : "Write error: shutting down merge.", {
        device: this.table.deviceName,
      });
      return this.failMerge();
    }
    // The merged data must be durable before the records that point at the COW copies go (R20).
    try {
      await submitAndWait(this.origin, flushBio());
    } catch (err) {
      this.logger.error("Flush after merge failed: shutting down merge", {
        device: this.table.deviceName,
        error: String(err),
      });
      return this.failMerge();
    }
    try {
      await this.store.commitMerge!(n);
    } catch (err) {
      this.logger.error("Write error in exception store: shutting down merge", {
        device: this.table.deviceName,
        error: String(err),
      });
      return this.failMerge();
    }
    try {
      // Last chunk first, so each removal takes the end of a run.
      for (let c = oldFirst + n - 1; c >= oldFirst; c--) this.complete.remove(c);
    } catch (err) {
      this.logger.error((err as Error).message, { device: this.table.deviceName });
      return this.failMerge();
    }
    // The chunks are the origin's now: the held writes go straight to it.
    for (const bio of this.releaseMergingRange()) this.origin.submit(bio);
    return true;
  }

  /** The failure path of merge_callback: stop, mark failed, fail the held writes. */
  private failMerge(): false {
    this.mergeFailed = true;
    for (const bio of this.releaseMergingRange()) bio.complete("EIO");
    this.table.event();
    return false;
  }

  private releaseMergingRange(): Bio[] {
    this.firstMergingChunk = 0;
    this.numMergingChunks = 0;
    return this.heldDuringMerge.splice(0);
  }

  /**
   * origin_write_extent: an origin write with no bio for every step of the range, stepping by the
   * smallest chunk size of the origin's snapshots (set at resume), so every chunk of every other
   * snapshot overlapping the range gets its exception. True when something is still pending.
   */
  private originWriteExtent(sector: number, size: number): boolean {
    const step = this.maxIoLen || this.chunkSize;
    let mustWait = false;
    for (let n = 0; n < size; n += step) {
      if (originWrite(this.originEntry, sector + n, null) === MapResult.SUBMITTED) mustWait = true;
    }
    return mustWait;
  }

  // ---- I/O to the merging device (dm-snap.c: snapshot_merge_map) ----

  override map(bio: Bio, ctx: TrackContext): MapResult {
    if (bio.op === "flush") {
      bio.device = bio.targetBioNr === 0 ? this.origin : this.cow;
      return MapResult.REMAPPED;
    }
    if (bio.op === "discard") {
      // Once merging, discards no longer change anything.
      bio.complete("ok");
      return MapResult.SUBMITTED;
    }
    const offset = bio.sector - this.begin;
    if (this.valid) {
      const cs = this.chunkSize;
      const chunk = Math.floor(offset / cs);
      const copied = this.complete.lookup(chunk);
      if (copied >= 0) {
        const write = bio.op !== "read";
        if (write && chunk >= this.firstMergingChunk && chunk < this.firstMergingChunk + this.numMergingChunks) {
          // Being merged: the write lands on the origin once the batch is committed.
          bio.device = this.origin;
          bio.sector = offset;
          this.heldDuringMerge.push(bio);
          return MapResult.SUBMITTED;
        }
        bio.device = this.cow;
        bio.sector = copied * cs + (offset % cs);
        if (write) {
          // A later batch covering this chunk waits for the write (step 3 of a batch: tracked writes).
          this.tracked.track(chunk);
          ctx.chunk = chunk;
        }
        return MapResult.REMAPPED;
      }
    }
    // No exception (never copied, already merged, or an invalid snapshot): the origin's chunk.
    // Writes make the other snapshots preserve it first; never throttled here.
    bio.device = this.origin;
    bio.sector = offset;
    if (bio.op === "read") return MapResult.REMAPPED;
    return originMapWrite(this.originEntry, bio, false);
  }
}
