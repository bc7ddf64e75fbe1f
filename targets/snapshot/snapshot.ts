/**
 * snapshot: `snapshot <origin> <cow> <P|PO|N> <chunk_size> [<#features> <feature>...]`
 * (dm-snap.c: snapshot_ctr, snapshot_map; docs/snapshot.md).
 *
 * Reads of chunks not yet copied go to the origin (tracked until they complete); everything else
 * goes to the COW device. A read spanning chunks is mapped as one I/O per run of chunks with the
 * same destination (the origin, or consecutive COW chunks), where the kernel's snapshot cuts it at
 * every chunk (max_io_len) and leaves merging to the block layer below; writes are cut per chunk. A write to an un-copied chunk allocates a pending exception, copies the
 * origin chunk (or writes a whole-chunk bio in its place), commits the exception in allocation
 * order, and only then is released to the COW device.
 *
 * Node has no locks to drop: every lookup-then-allocate below runs synchronously inside `map`, so
 * the kernel's "re-check after re-locking" races (R5) cannot happen by construction.
 */
import { Bio, BioFlags } from "../../core/bio.js";
import { acceptPartialBio } from "../../core/dm-io.js";
import { type CopierClient, type Copier, MAX_COPY_DESTS } from "../../core/copier.js";
import type { BlockDevice, OpenMode } from "../../core/devices/block-device.js";
import type { Logger } from "../../core/logger.js";
import { ArgReader } from "../../core/args.js";
import { target } from "../../core/registry.js";
import { type DeviceLookup, Services } from "../../core/services.js";
import {
  type DeviceAreaCallback,
  EndIoResult,
  MapResult,
  type StatusType,
  Target,
  TargetError,
} from "../../core/target.js";
import { ExceptionTable } from "./exception-table.js";
import { originOf, type Origin, type OriginSnapshot, pendingExceptionDone } from "./origin-registry.js";
import { originRetry } from "./origin-write.js";
import { defaultSnapshotParams, type SnapshotParams, SnapshotParamsToken } from "./params.js";
import { InOrderGate, PendingException, RunWrite } from "./pending.js";
import { createExceptionStore, type ExceptionStore } from "./store.js";
import { type TrackContext, TrackedChunks } from "./tracked-chunks.js";

@target({
  name: "snapshot",
  version: [1, 16, 0],
  inject: [Services.DeviceLookup, Services.Copier, Services.Logger, SnapshotParamsToken],
})
export class SnapshotTarget extends Target<TrackContext> implements OriginSnapshot {
  origin!: BlockDevice;
  cow!: BlockDevice;
  store!: ExceptionStore;
  readonly isMerge: boolean = false;
  valid = true;
  active = false;
  overflowed = false;
  mergeFailed = false;
  discardZeroesCow = false;
  discardPassdownOrigin = false;

  complete!: ExceptionTable;
  readonly pending = new Map<number, PendingException>();
  readonly tracked = new TrackedChunks();
  private readonly gate = new InOrderGate();
  private sequence = 0;
  /** Pending exceptions alive; dtr waits for zero (R2, R14). */
  private alive = 0;
  private aliveWaiters: (() => void)[] = [];
  /** Copies in progress, for COW throttling (dm-snap.c: wait_for_in_progress). */
  inProgress = 0;
  private readonly throttled: (() => void)[] = [];
  protected copierClient!: CopierClient;
  /** Handover: the active snapshot whose store this (inactive) one takes at resume, and back. */
  handoverSource: SnapshotTarget | null = null;
  handoverDestination: SnapshotTarget | null = null;
  protected originEntry!: Origin<SnapshotTarget>;

  constructor(
    private readonly devices: DeviceLookup,
    private readonly copier: Copier,
    protected readonly logger: Logger,
    // Defaulted: a subclass declared with the first three tokens only still gets the kernel's values.
    private readonly params: SnapshotParams = defaultSnapshotParams,
  ) {
    super();
  }

  /** More copies in progress than the COW threshold allows: new writes wait (dm-snap.c: wait_for_in_progress). */
  get copyThrottled(): boolean {
    return this.inProgress > this.params.cowThreshold;
  }

  get chunkSize(): number {
    return this.store.chunkSize;
  }

  async ctr(args: string[]): Promise<void> {
    if (args.length < 4) throw new TargetError("requires 4 or more arguments");
    // Feature arguments follow the first four and are checked before any device is opened.
    this.parseFeatures(args.slice(4));
    const [originPath, cowPath] = args as [string, string];
    // The snapshot only reads the origin; writes to it go through snapshot-origin.
    try {
      this.origin = await this.devices.get(originPath, this.originMode());
    } catch (err) {
      throw new TargetError("Cannot get origin device", (err as { code?: string }).code ?? "EINVAL");
    }
    // Compare identities before asking for write access, so a refused table never upgrades the
    // shared origin handle (the kernel compares device numbers before opening the COW).
    let probe: BlockDevice;
    try {
      probe = await this.devices.get(cowPath, "r");
    } catch (err) {
      throw new TargetError("Cannot get COW device", (err as { code?: string }).code ?? "EINVAL");
    }
    if (probe === this.origin) throw new TargetError("COW device cannot be the same as origin device");
    try {
      this.cow = await this.devices.get(cowPath, this.table.readOnly ? "r" : "rw");
    } catch (err) {
      throw new TargetError("Cannot get COW device", (err as { code?: string }).code ?? "EINVAL");
    } finally {
      await this.devices.put(probe);
    }
    try {
      ({ store: this.store } = createExceptionStore(args.slice(2, 4), this.cow, {
        logger: this.logger,
        originLogicalBlockSize: this.origin.logicalBlockSize,
      }));
    } catch (err) {
      this.logger.error("snapshot: exception store", { error: (err as Error).message });
      throw new TargetError("Couldn't create exception store", (err as { errno?: string }).errno ?? "EINVAL");
    }
    this.complete = new ExceptionTable({
      cowChunks: Math.floor(this.cow.sizeSectors / Math.max(1, this.store.chunkSize || 32)),
    });
    this.originEntry = originOf<SnapshotTarget>(this.origin, true)!;
    // Handover (dm-snap.c: __find_snapshots_sharing_cow, snapshot_preresume): a new table on a COW device an active snapshot already owns becomes the
    // destination of that snapshot's exception store; it does not read the metadata itself.
    const sharing = this.originEntry.snapshots.filter((s) => s.cow === this.cow);
    const source = sharing.find((s) => s.active);
    if (sharing.length >= 2 || sharing.some((s) => !s.active)) {
      throw new TargetError("Snapshot cow pairing for exception table handover failed");
    }
    this.checkHandover(source ?? null);
    this.numFlushBios = 1;
    if (this.discardZeroesCow) this.numDiscardBios = this.discardPassdownOrigin ? 2 : 1;
    this.copierClient = this.copier.client(`snapshot ${this.table.deviceName}`);
    if (source) {
      this.handoverSource = source;
      source.handoverDestination = this;
      this.originEntry.add(this);
      return;
    }
    let state: "valid" | "invalid";
    try {
      state = await this.store.readMetadata((oldChunk, newChunk) => this.complete.insert(oldChunk, newChunk));
    } catch (err) {
      this.logger.error("snapshot: reading metadata", { error: (err as Error).message });
      throw new TargetError("Failed to read snapshot metadata", (err as { errno?: string }).errno ?? "EINVAL");
    }
    if (state === "invalid") {
      this.valid = false;
      this.logger.warn("Snapshot is marked invalid.");
    }
    if (!this.store.chunkSize) throw new TargetError("Chunk size not set");
    this.setChunkLimits();
    this.originEntry.add(this);
  }

  /** How the origin is opened: read-only here (writes to it go through snapshot-origin). */
  protected originMode(): OpenMode {
    return "r";
  }

  /**
   * Extra conditions on the table's role, checked once the handover pairing is known and before the
   * snapshot registers with its origin: `source` is the active snapshot whose store this table
   * takes over at resume, or null. A plain snapshot has none; snapshot-merge adds its own.
   */
  protected checkHandover(_source: SnapshotTarget | null): void {}

  protected setChunkLimits(): void {
    // No max_io_len: map() cuts writes at chunk ends and reads at the end of a run of chunks with
    // one destination (acceptPartialBio), so that a 1 MiB read of 4 KiB chunks is not 256 reads.
    this.maxIoLen = 0;
    // A discard never spans chunks (the kernel's io_hints: max_discard_sectors = chunk size).
    this.maxDiscardSectors = this.store.chunkSize;
  }

  private parseFeatures(rest: string[]): void {
    if (rest.length === 0) return;
    const reader = new ArgReader(rest);
    const n = reader.readArgGroup({ min: 0, max: 2, error: "Invalid number of feature arguments" });
    for (let i = 0; i < n; i++) {
      const f = reader.shift()!.toLowerCase();
      if (f === "discard_zeroes_cow") this.discardZeroesCow = true;
      else if (f === "discard_passdown_origin") this.discardPassdownOrigin = true;
      else throw new TargetError("Unrecognised feature requested");
    }
    if (this.discardPassdownOrigin && !this.discardZeroesCow) {
      throw new TargetError("discard_passdown_origin feature depends on discard_zeroes_cow");
    }
  }

  override preresume(): void {
    const dest = this.handoverDestination;
    if (dest) throw new TargetError("Unable to resume snapshot source until handover completes.");
    const src = this.handoverSource;
    if (src && !src.table.suspended)
      throw new TargetError("Unable to perform snapshot handover until source is suspended.");
  }

  override async resume(): Promise<void> {
    const src = this.handoverSource;
    if (src) {
      // Quiesce the origin device so no pending exception of the source completes into the store
      // while it changes owner (R12): origin writes drain, copies finish, commits land. When the
      // origin's device is a snapshot-merge rather than a snapshot-origin, it is the merging
      // snapshot's device, and its merge is stopped across the swap as well (R13).
      let originTable = this.originEntry.originTable;
      let merging: SnapshotTarget | null = null;
      if (!originTable) {
        merging = this.originEntry.snapshots.find((s) => s.isMerge && s !== this) ?? null;
        originTable = merging?.table ?? null;
      }
      if (originTable && originTable.deviceName === this.table.deviceName) {
        originTable = null;
        merging = null;
      }
      let restartMerge = false;
      if (originTable) await originTable.internalSuspend();
      try {
        if (merging?.mergeRunning) {
          restartMerge = true;
          await merging.stopMerge();
        }
        this.takeOverExceptions(src);
        // Active before the origin's held writes are released: the source is invalid now, so a
        // write released before this would skip both snapshots and overwrite uncopied chunks.
        this.active = true;
        this.originEntry.sort();
      } finally {
        if (restartMerge) merging!.startMerge();
        originTable?.internalResume();
      }
    }
    this.active = true;
    this.originEntry.sort();
  }

  // ---- merge control (snapshot-merge overrides these; a plain snapshot never merges) ----

  /** A merge loop is running (RUNNING_MERGE). */
  get mergeRunning(): boolean {
    return false;
  }

  /** stop_merge: ask the merge to stop after its current batch and wait until it has. */
  async stopMerge(): Promise<void> {}

  /** start_merge: start the merge loop unless it runs already. */
  startMerge(): void {}

  /** __handover_exceptions: the store and the complete table move; the source becomes invalid. */
  private takeOverExceptions(src: SnapshotTarget): void {
    if (src.pending.size > 0) throw new Error(`snapshot handover with ${src.pending.size} pending exceptions`);
    const overflowPreference = this.store.userspaceSupportsOverflow;
    [this.store, src.store] = [src.store, this.store];
    [this.complete, src.complete] = [src.complete, this.complete];
    // The destination keeps its own table's PO/P choice for the store it now owns.
    (this.store as { userspaceSupportsOverflow: boolean }).userspaceSupportsOverflow = overflowPreference;
    this.valid = src.valid;
    this.overflowed = src.overflowed;
    this.setChunkLimits();
    src.valid = false;
    src.handoverDestination = null;
    this.handoverSource = null;
  }

  override async dtr(): Promise<void> {
    if (this.handoverDestination) {
      this.logger.warn("Cancelling snapshot handover.", { device: this.table.deviceName });
      this.handoverDestination.valid = false;
      this.handoverDestination.handoverSource = null;
      this.handoverDestination = null;
    }
    if (this.handoverSource) {
      this.handoverSource.handoverDestination = null;
      this.handoverSource = null;
    }
    this.originEntry?.remove(this);
    while (this.alive > 0) await new Promise<void>((r) => this.aliveWaiters.push(r));
    await this.copierClient?.destroy();
    await this.store?.drain();
    await this.complete?.clear();
  }

  override newMapContext(): TrackContext {
    return { chunk: -1, chunks: 1 };
  }

  // ---- I/O to the snapshot device (dm-snap.c: snapshot_map) ----

  map(bio: Bio, ctx: TrackContext): MapResult {
    if (bio.op === "flush") {
      bio.device = this.cow;
      return MapResult.REMAPPED;
    }
    if (!this.valid) return MapResult.KILL;
    if (bio.op === "write" && !this.copyThrottled && this.mapWriteRun(bio)) return MapResult.SUBMITTED;
    // Otherwise a write never spans chunks: each chunk has its own exception (cut now, in map, as
    // acceptPartialBio requires, before the write may be parked).
    if (bio.op === "write") this.cutAtChunkEnd(bio);
    if (bio.op !== "read" && this.copyThrottled) {
      // Too many copies in flight: park the write and map it again when one finishes.
      this.throttled.push(() => this.remapLater(bio, ctx));
      return MapResult.SUBMITTED;
    }
    return this.mapChunk(bio, ctx);
  }

  private remapLater(bio: Bio, ctx: TrackContext): void {
    const r = this.map(bio, ctx);
    if (r === MapResult.REMAPPED) bio.device!.submit(bio);
    else if (r === MapResult.KILL) bio.complete("EIO");
  }

  private mapChunk(bio: Bio, ctx: TrackContext): MapResult {
    if (this.overflowed && bio.op !== "read") return MapResult.KILL;
    const cs = this.store.chunkSize;
    const offset = bio.sector - this.begin;
    const chunk = Math.floor(offset / cs);
    if (bio.op === "discard" && bio.targetBioNr === 1) {
      // discard_passdown_origin: straight to the origin device (no COW), tracked like a read.
      bio.device = this.origin;
      bio.sector = offset;
      this.trackBio(chunk, ctx);
      return MapResult.REMAPPED;
    }
    const copied = this.complete.lookup(chunk);
    if (bio.op === "read") this.cutAtRunEnd(bio, chunk, copied);
    if (copied >= 0) return this.mapToCow(bio, copied, offset, cs);
    if (bio.op === "discard") {
      bio.complete("ok"); // never copy for a discard
      return MapResult.SUBMITTED;
    }
    if (bio.op === "read") {
      bio.device = this.origin;
      bio.sector = offset;
      this.trackRun(chunk, this.lastChunk(bio) - chunk + 1, ctx);
      return MapResult.REMAPPED;
    }
    const pe = this.findOrAllocatePending(chunk, true);
    if (!pe) return MapResult.KILL;
    bio.device = this.cow;
    bio.sector = pe.newChunk * cs + (offset % cs);
    if (!pe.started && bio.sectors === cs && bio.op === "write") {
      pe.started = true;
      this.startFullBio(pe, bio);
      return MapResult.SUBMITTED;
    }
    pe.snapshotBios.push(bio);
    if (!pe.started) {
      pe.started = true;
      this.startCopy([{ snap: this, pe }]);
    }
    return MapResult.SUBMITTED;
  }

  /**
   * A write from a chunk's start over two or more whole chunks that have no exception yet, while
   * the store's next free COW chunks are consecutive: one pending exception per chunk, as the
   * per-chunk path makes, but one write to the COW device for all of them (what the kernel's block
   * layer gets by merging its per-chunk writes) and so one group commit. The write is cut to the
   * run (the core maps the rest as another clone). False: take the per-chunk path.
   */
  private mapWriteRun(bio: Bio): boolean {
    if (this.isMerge || this.overflowed) return false;
    const cs = this.store.chunkSize;
    const offset = bio.sector - this.begin;
    if (offset % cs !== 0 || bio.sectors < 2 * cs) return false;
    const chunk = offset / cs;
    const whole = Math.floor(bio.sectors / cs);
    let n = 0;
    while (n < whole && this.complete.lookup(chunk + n) < 0 && !this.pending.has(chunk + n)) n++;
    n = Math.min(n, this.store.consecutiveFree?.(n) ?? 1);
    if (n < 2) return false;
    if (bio.sectors > n * cs) acceptPartialBio(bio, n * cs);
    const run = new RunWrite(bio, n);
    const pes: PendingException[] = [];
    for (let i = 0; i < n; i++) {
      const pe = this.findOrAllocatePending(chunk + i, true);
      if (!pe) throw new Error(`snapshot: the store promised ${n} free chunks and had ${i}`);
      pe.started = true;
      pe.run = run;
      pes.push(pe);
    }
    this.inProgress += n;
    const handle = this.copierClient.prepareCallback((_r, writeErr) => {
      this.copyFinished(n);
      for (const pe of pes) this.copyDone(pe, writeErr !== 0);
    });
    const write = new Bio("write", pes[0]!.newChunk * cs, n * cs, bio.data, bio.flags & ~BioFlags.PREFLUSH, {
      bioDone: (w) => this.copierClient.doCallback(handle, false, w.status === "ok" ? 0 : 1),
    });
    write.submitTo(this.cow);
    return true;
  }

  private mapToCow(bio: Bio, newChunk: number, offset: number, cs: number): MapResult {
    const sector = newChunk * cs + (offset % cs);
    if (bio.op === "discard" && bio.sectors === cs && offset % cs === 0) {
      // discard_zeroes_cow: the chunk reads as zeros from now on; the exception stays.
      this.inProgress++;
      this.copierClient.zero([{ device: this.cow, sector }], cs, (_r, w) => {
        this.copyFinished();
        bio.complete(w ? "EIO" : "ok");
      });
      return MapResult.SUBMITTED;
    }
    bio.device = this.cow;
    bio.sector = sector;
    return MapResult.REMAPPED;
  }

  private trackBio(chunk: number, ctx: TrackContext): void {
    this.trackRun(chunk, 1, ctx);
  }

  /** Track `chunks` chunks from `chunk` for one origin read (each, as one read per chunk would: R23). */
  private trackRun(chunk: number, chunks: number, ctx: TrackContext): void {
    for (let c = chunk; c < chunk + chunks; c++) this.tracked.track(c);
    ctx.chunk = chunk;
    ctx.chunks = chunks;
  }

  /** The last chunk `bio` touches. */
  private lastChunk(bio: Bio): number {
    return Math.floor((bio.sector - this.begin + bio.sectors - 1) / this.store.chunkSize);
  }

  private cutAtChunkEnd(bio: Bio): void {
    const cs = this.store.chunkSize;
    const toEnd = cs - ((bio.sector - this.begin) % cs);
    if (bio.sectors > toEnd) acceptPartialBio(bio, toEnd);
  }

  /**
   * Keep only the chunks from `chunk` on that go where `chunk` goes: all un-copied (the origin), or
   * copied to consecutive COW chunks from `copied` on. The core maps the rest as another clone.
   */
  private cutAtRunEnd(bio: Bio, chunk: number, copied: number): void {
    const last = this.lastChunk(bio);
    let next = chunk + 1;
    for (; next <= last; next++) {
      const c = this.complete.lookup(next);
      if (copied < 0 ? c >= 0 : c !== copied + (next - chunk)) break;
    }
    if (next <= last) acceptPartialBio(bio, next * this.store.chunkSize - (bio.sector - this.begin));
  }

  override endIo(bio: Bio, ctx: TrackContext): EndIoResult {
    if (ctx.chunk >= 0) {
      for (let c = ctx.chunk; c < ctx.chunk + ctx.chunks; c++) this.tracked.untrack(c);
      ctx.chunk = -1;
      ctx.chunks = 1;
      // Origin writes wait for reads like this one only while the snapshot is valid: once it is
      // invalid (a failed copy or commit, or a full COW on an origin write) they go straight to the
      // origin and may have overwritten the chunk under this read. Never hand out that data.
      if (!this.valid && bio.op === "read") bio.status = "EIO";
    }
    return EndIoResult.DONE;
  }

  // ---- pending exceptions ----

  /**
   * The pending exception for `chunk`, allocating one if there is neither a pending nor a
   * complete exception. Returns null when the chunk is already copied (origin path) or the COW
   * device is full (then the snapshot overflows or is invalidated).
   */
  findOrAllocatePending(chunk: number, snapshotWrite: boolean): PendingException | null {
    const existing = this.pending.get(chunk);
    if (existing) return existing;
    if (!snapshotWrite && this.complete.lookup(chunk) >= 0) return null;
    const newChunk = this.store.prepareException();
    if (newChunk === null) {
      if (snapshotWrite && this.store.userspaceSupportsOverflow) {
        if (!this.overflowed) this.logger.error("Snapshot overflowed: Unable to allocate exception.");
        this.overflowed = true;
      } else {
        this.invalidate("ENOMEM");
      }
      return null;
    }
    const pe = new PendingException(chunk, newChunk, this.sequence++);
    this.pending.set(chunk, pe);
    this.alive++;
    return pe;
  }

  /**
   * Copy the origin chunk of each exception; exceptions of one chunk size share one origin read,
   * up to the copier's limit of destinations per job (more snapshots than that take several jobs).
   */
  startCopy(jobs: { snap: SnapshotTarget; pe: PendingException }[]): void {
    const byChunk = new Map<string, { snap: SnapshotTarget; pe: PendingException }[]>();
    for (const job of jobs) {
      const cs = job.snap.chunkSize;
      let key = `${cs}:${job.pe.oldChunk}`;
      for (let slice = 1; (byChunk.get(key)?.length ?? 0) >= MAX_COPY_DESTS; slice++)
        key = `${cs}:${job.pe.oldChunk}:${slice}`;
      const group = byChunk.get(key);
      if (group) group.push(job);
      else byChunk.set(key, [job]);
    }
    for (const group of byChunk.values()) {
      const { snap, pe } = group[0]!;
      const cs = snap.chunkSize;
      const start = pe.oldChunk * cs;
      // The last chunk of the origin may be short.
      const sectors = Math.min(cs, this.origin.sizeSectors - start);
      for (const j of group) j.snap.inProgress++;
      snap.copierClient.copy(
        { device: this.origin, sector: start, sectors },
        group.map((j) => ({ device: j.snap.cow, sector: j.pe.newChunk * cs })),
        (readErr, writeErrMask) => {
          group.forEach((j, i) => {
            j.snap.copyFinished();
            j.snap.copyDone(j.pe, readErr || (writeErrMask & (1 << i)) !== 0);
          });
        },
      );
    }
  }

  /** A whole-chunk snapshot write replaces the copy; its completion takes the copy's path (R18). */
  private startFullBio(pe: PendingException, bio: Bio): void {
    pe.fullBio = bio;
    this.inProgress++;
    const handle = this.copierClient.prepareCallback((_r, writeErr) => {
      this.copyFinished();
      this.copyDone(pe, writeErr !== 0);
    });
    const write = new Bio("write", bio.sector, bio.sectors, bio.data, bio.flags & ~BioFlags.PREFLUSH, {
      bioDone: (w) => this.copierClient.doCallback(handle, false, w.status === "ok" ? 0 : 1),
    });
    write.submitTo(this.cow);
  }

  private copyFinished(copies = 1): void {
    this.inProgress -= copies;
    if (!this.copyThrottled && this.throttled.length > 0) {
      for (const retry of this.throttled.splice(0)) retry();
    }
    if (!this.copyThrottled && this.originEntry.throttled.length > 0) {
      for (const bio of this.originEntry.throttled.splice(0)) originRetry(this.originEntry, bio, true);
    }
  }

  /** Copy callback: through the in-order gate to the store (R11). */
  copyDone(pe: PendingException, error: boolean): void {
    pe.copyError = error;
    this.gate.copied(pe, (p) =>
      this.store.commitException(p.oldChunk, p.newChunk, !p.copyError, (ok) => void this.pendingComplete(p, ok)),
    );
  }

  /**
   * The exception is durable (or failed). Insert it as complete first, so new snapshot reads go
   * to the COW device, then wait for reads still tracked on the origin chunk, then remove the
   * pending entry, releasing the writers that waited on it (R4, R17).
   */
  private async pendingComplete(pe: PendingException, success: boolean): Promise<void> {
    let error = false;
    if (!success) {
      this.invalidate("EIO");
      error = true;
    } else if (!this.valid) {
      error = true;
    } else {
      this.complete.insert(pe.oldChunk, pe.newChunk);
      if (this.tracked.isTracked(pe.oldChunk)) await this.tracked.whenUntracked(pe.oldChunk);
    }
    this.pending.delete(pe.oldChunk);
    const full = pe.fullBio;
    const snapshotBios = pe.snapshotBios.splice(0);
    const originBios = pe.originBios.splice(0);
    pe.run?.exceptionDone(error);
    if (error) {
      full?.complete("EIO");
      for (const b of snapshotBios) b.complete("EIO");
    } else {
      full?.complete("ok");
      for (const b of snapshotBios) b.device!.submit(b);
    }
    // A merge waiting for other snapshots to preserve its next batch looks again (R9).
    pendingExceptionDone();
    // Origin writes are retried, never failed: an invalid snapshot no longer holds them back.
    for (const b of originBios) originRetry(this.originEntry, b, false);
    if (--this.alive === 0) for (const w of this.aliveWaiters.splice(0)) w();
  }

  invalidate(reason: "EIO" | "ENOMEM"): void {
    if (!this.valid) return;
    this.logger.error(
      reason === "EIO"
        ? "Invalidating snapshot: Error reading/writing."
        : "Invalidating snapshot: Unable to allocate exception.",
      { device: this.table.deviceName },
    );
    this.valid = false;
    this.store.dropSnapshot().catch((err) => this.logger.warn("write header failed", { error: String(err) }));
    this.table.event();
  }

  override status(type: StatusType): string {
    if (type === "table") {
      let s = `${this.origin.tableName} ${this.cow.tableName}${this.store.statusTable()}`;
      if (this.discardZeroesCow)
        s += this.discardPassdownOrigin ? " 2 discard_zeroes_cow discard_passdown_origin" : " 1 discard_zeroes_cow";
      return s;
    }
    if (!this.valid) return "Invalid";
    if (this.mergeFailed) return "Merge failed";
    if (this.overflowed) return "Overflow";
    const u = this.store.usage();
    return `${u.allocated}/${u.total} ${u.metadata}`;
  }

  override iterateDevices(fn: DeviceAreaCallback): boolean {
    return fn(this.origin, 0, this.len) === true;
  }
}
