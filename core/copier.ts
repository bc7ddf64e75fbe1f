/**
 * Copier: the sector-range copy engine (the kernel's dm-kcopyd), shared by targets.
 *
 * A job copies one source region to up to MAX_COPY_DESTS destinations. It is split into sub-jobs
 * of `subJobSectors`; each sub-job reads the source once into a pooled buffer and writes that
 * buffer to every destination. At most `maxInFlight` sub-jobs run at once per Copier (all clients
 * together), so a burst of copies cannot flood the devices or memory.
 *
 * What the snapshot target relies on (as dm-snap.c on dm-kcopyd.c):
 * - a job's callback runs exactly once, with (readErr, writeErrMask), after all its sub-jobs;
 * - callbacks never run inside `copy()`/`zero()`/`doCallback()` (always from a later microtask);
 * - all callbacks of one client run one at a time, in job completion order, from one delivery loop.
 *   A callback that starts another job never sees that job's callback re-entrantly, even on a
 *   device that completes synchronously: it is appended to the same loop.
 *
 * I/O is issued with `bio.submitTo(device)` and completes into SubJob objects (bio.endIo), so the
 * hot path allocates a sub-job and its bios but no closures.
 */
import { Bio, SECTOR_SHIFT, type BioEndIo } from "./bio.js";
import type { BlockDevice } from "./devices/block-device.js";
import { JsonLineLogger, type Logger } from "./logger.js";

/** kcopyd's DM_KCOPYD_MAX_REGIONS: destinations per job (also keeps the bitmask small). */
export const MAX_COPY_DESTS = 8;

export const CopyFlags = {
  NONE: 0,
  /** Keep copying the remaining sub-jobs after an error (DM_KCOPYD_IGNORE_ERROR). */
  IGNORE_ERROR: 1 << 0,
} as const;

export interface CopySource {
  device: BlockDevice;
  sector: number;
  sectors: number;
}

export interface CopyDest {
  device: BlockDevice;
  sector: number;
}

/** `writeErrMask` bit i is set when destination i had a write error. */
export type CopyDone = (readErr: boolean, writeErrMask: number) => void;

export interface CopierOptions {
  /** Sectors per sub-job (default 128 = 64 KiB, kcopyd's SUB_JOB_SIZE). */
  subJobSectors?: number;
  /** Sub-jobs in flight at once per Copier, all clients together (default 16). */
  maxInFlight?: number;
  /** Where throwing callbacks are reported. Defaults to JSON lines on stderr. */
  logger?: Logger;
}

/** Opaque handle from `prepareCallback`, fired once with `doCallback`. */
export interface JobHandle {
  readonly client: CopierClient;
}

/** One copy/zero job, or a prepared callback (no sub-jobs). */
class Job implements JobHandle {
  /** Sectors handed to sub-jobs so far. */
  issued = 0;
  running = 0;
  readErr = false;
  writeErrMask = 0;
  /** Set on the first error without IGNORE_ERROR: issue no more sub-jobs. */
  stopped = false;
  /** Completion queued for delivery (guards exactly-once). */
  finished = false;

  constructor(
    readonly client: CopierClient,
    readonly done: CopyDone,
    /** null for zero jobs. */
    readonly source: CopySource | null,
    readonly dests: readonly CopyDest[],
    readonly sectors: number,
    readonly flags: number,
  ) {}

  get hasMoreToIssue(): boolean {
    return !this.stopped && this.issued < this.sectors;
  }

  noteError(): void {
    if (!(this.flags & CopyFlags.IGNORE_ERROR)) this.stopped = true;
  }
}

/** One slice of a job: read once (unless zeroing), then write to every destination. */
class SubJob implements BioEndIo {
  private writesLeft = 0;

  constructor(
    private readonly copier: Copier,
    readonly job: Job,
    /** Offset of this slice inside the job, in sectors. */
    private readonly offset: number,
    private readonly sectors: number,
    /** Pooled read buffer for copies; null for zero jobs (they write the shared zero buffer). */
    private buffer: Buffer | null,
  ) {}

  start(): void {
    const src = this.job.source;
    if (!src) return this.writeAll();
    const read = new Bio(
      "read",
      src.sector + this.offset,
      this.sectors,
      this.buffer!.subarray(0, this.sectors << SECTOR_SHIFT),
      0,
      this,
    );
    read.submitTo(src.device);
  }

  bioDone(bio: Bio): void {
    if (bio.op === "read") {
      if (bio.status !== "ok") {
        // A failed read is never written out: there is nothing valid to write.
        this.job.readErr = true;
        this.job.noteError();
        return this.finish();
      }
      return this.writeAll();
    }
    if (bio.op === "write-zeroes" && bio.status === "EOPNOTSUPP") {
      // Advertised but refused (e.g. a stacked device): fall back to writing a zero buffer.
      const dest = this.job.dests[bio.owner as number]!;
      const w = new Bio("write", bio.sector, bio.sectors, this.copier.zeroBuffer(this.sectors), 0, this);
      w.owner = bio.owner;
      return w.submitTo(dest.device);
    }
    if (bio.status !== "ok") {
      this.job.writeErrMask |= 1 << (bio.owner as number);
      this.job.noteError();
    }
    if (--this.writesLeft === 0) this.finish();
  }

  private writeAll(): void {
    const dests = this.job.dests;
    // Count first: a synchronous device may complete each write inside submitTo.
    this.writesLeft = dests.length;
    const zeroing = !this.job.source;
    const data = zeroing
      ? this.copier.zeroBuffer(this.sectors)
      : this.buffer!.subarray(0, this.sectors << SECTOR_SHIFT);
    for (let i = 0; i < dests.length; i++) {
      const d = dests[i]!;
      const sector = d.sector + this.offset;
      const bio =
        zeroing && d.device.supportsWriteZeroes
          ? new Bio("write-zeroes", sector, this.sectors, null, 0, this)
          : new Bio("write", sector, this.sectors, data, 0, this);
      bio.owner = i;
      bio.submitTo(d.device);
    }
  }

  private finish(): void {
    if (this.buffer) this.copier.releaseBuffer(this.buffer);
    this.buffer = null;
    this.copier.subJobDone(this);
  }
}

export class Copier {
  readonly subJobSectors: number;
  readonly maxInFlight: number;
  readonly logger: Logger;
  private inFlight = 0;
  /** Jobs with sub-jobs still to issue, FIFO. */
  private readonly ready: Job[] = [];
  private pumping = false;
  private readonly pool: Buffer[] = [];
  private zeros: Buffer | null = null;

  constructor(options: CopierOptions = {}) {
    this.subJobSectors = options.subJobSectors ?? 128;
    this.maxInFlight = options.maxInFlight ?? 16;
    if (!(Number.isInteger(this.subJobSectors) && this.subJobSectors > 0))
      throw new RangeError("subJobSectors must be a positive integer");
    if (!(Number.isInteger(this.maxInFlight) && this.maxInFlight > 0))
      throw new RangeError("maxInFlight must be a positive integer");
    this.logger = options.logger ?? new JsonLineLogger();
  }

  /** A client: its own serialised callback context and job accounting (one per snapshot). */
  client(name = "copier"): CopierClient {
    return new CopierClient(this, name);
  }

  /** Sub-jobs currently issued and not finished (for tests and status). */
  get subJobsInFlight(): number {
    return this.inFlight;
  }

  /** @internal */
  enqueue(job: Job): void {
    this.ready.push(job);
    this.pump();
  }

  /** @internal */
  subJobDone(sub: SubJob): void {
    this.inFlight--;
    const job = sub.job;
    job.running--;
    if (job.running === 0 && !job.hasMoreToIssue) job.client.jobDone(job);
    this.pump();
  }

  /** @internal A zero buffer of at least `sectors`; shared and never written to. */
  zeroBuffer(sectors: number): Buffer {
    if (!this.zeros) this.zeros = Buffer.alloc(this.subJobSectors << SECTOR_SHIFT);
    return this.zeros.subarray(0, sectors << SECTOR_SHIFT);
  }

  /** @internal */
  releaseBuffer(buf: Buffer): void {
    this.pool.push(buf);
  }

  /**
   * Issue sub-jobs while there is room. Sub-jobs on synchronous devices finish inside `start()`
   * and call back into pump(); the `pumping` guard turns that recursion into this loop's next turn.
   */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.inFlight < this.maxInFlight && this.ready.length > 0) {
        const job = this.ready[0]!;
        if (!job.hasMoreToIssue) {
          this.ready.shift();
          continue;
        }
        const sectors = Math.min(this.subJobSectors, job.sectors - job.issued);
        const buffer = job.source ? (this.pool.pop() ?? Buffer.allocUnsafe(this.subJobSectors << SECTOR_SHIFT)) : null;
        const sub = new SubJob(this, job, job.issued, sectors, buffer);
        job.issued += sectors;
        job.running++;
        this.inFlight++;
        sub.start();
      }
    } finally {
      this.pumping = false;
    }
  }
}

export class CopierClient {
  /** Jobs (and prepared callbacks) whose callback has not run yet. */
  private outstanding = 0;
  private readonly completed: Job[] = [];
  private completedHead = 0;
  private delivering = false;
  private deliveryScheduled = false;
  private idleWaiters: (() => void)[] = [];
  private draining = false;
  private destroyed = false;

  constructor(
    readonly copier: Copier,
    readonly name: string,
  ) {}

  /** Jobs started or prepared whose callbacks have not finished yet. */
  get jobsOutstanding(): number {
    return this.outstanding;
  }

  /** Copy `src` to every destination; `done` runs once, later, in this client's callback context. */
  copy(src: CopySource, dests: CopyDest[], done: CopyDone, opts: { flags?: number } = {}): void {
    this.checkJob(dests, src.sectors);
    this.start(
      new Job(
        this,
        done,
        { ...src },
        dests.map((d) => ({ ...d })),
        src.sectors,
        opts.flags ?? 0,
      ),
    );
  }

  /** Write `sectors` zeros at every destination (write-zeroes where supported, else zero buffers). */
  zero(dests: CopyDest[], sectors: number, done: CopyDone, opts: { flags?: number } = {}): void {
    this.checkJob(dests, sectors);
    this.start(
      new Job(
        this,
        done,
        null,
        dests.map((d) => ({ ...d })),
        sectors,
        opts.flags ?? 0,
      ),
    );
  }

  /** A job handle that copies nothing; fire it later with `doCallback` (full-chunk write path). */
  prepareCallback(done: CopyDone): JobHandle {
    this.checkAlive();
    this.outstanding++;
    return new Job(this, done, null, [], 0, 0);
  }

  /** Run a prepared callback through this client's serialised callback context. */
  doCallback(handle: JobHandle, readErr: boolean, writeErrMask: number): void {
    if (!(handle instanceof Job) || handle.client !== this || handle.sectors !== 0 || handle.dests.length !== 0) {
      throw new Error(`copier client '${this.name}': doCallback with a handle not from this client's prepareCallback`);
    }
    handle.readErr = readErr;
    handle.writeErrMask = writeErrMask;
    this.jobDone(handle);
  }

  /**
   * Wait until every job and prepared callback of this client has delivered its callback, then
   * refuse new jobs. Callbacks may still start follow-up jobs while draining; those are waited for
   * too. A prepared callback that is never fired keeps this pending (as in kcopyd).
   */
  destroy(): Promise<void> {
    this.draining = true;
    const p = new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    this.wakeIdle();
    return p;
  }

  /** @internal Called once per job when its last sub-job finished (or by doCallback). */
  jobDone(job: Job): void {
    if (job.finished) throw new Error(`copier client '${this.name}': job completed twice`);
    job.finished = true;
    this.completed.push(job);
    if (!this.delivering && !this.deliveryScheduled) {
      this.deliveryScheduled = true;
      queueMicrotask(() => this.deliver());
    }
  }

  private start(job: Job): void {
    this.outstanding++;
    // Empty job: nothing to issue, but the callback still comes later, never from inside copy().
    if (job.sectors === 0) this.jobDone(job);
    else this.copier.enqueue(job);
  }

  /** The one callback context: runs callbacks one at a time, including ones queued meanwhile. */
  private deliver(): void {
    this.deliveryScheduled = false;
    this.delivering = true;
    try {
      while (this.completedHead < this.completed.length) {
        const job = this.completed[this.completedHead]!;
        this.completed[this.completedHead++] = undefined as never;
        try {
          job.done(job.readErr, job.writeErrMask);
        } catch (err) {
          this.copier.logger.error("copier callback threw", {
            client: this.name,
            error: err instanceof Error ? err.stack : String(err),
          });
        }
        this.outstanding--;
      }
      this.completed.length = 0;
      this.completedHead = 0;
    } finally {
      this.delivering = false;
    }
    this.wakeIdle();
  }

  private wakeIdle(): void {
    if (this.outstanding !== 0 || this.idleWaiters.length === 0) return;
    if (this.draining) this.destroyed = true;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  private checkJob(dests: CopyDest[], sectors: number): void {
    this.checkAlive();
    if (dests.length < 1 || dests.length > MAX_COPY_DESTS) {
      throw new RangeError(`copier: ${dests.length} destinations (1..${MAX_COPY_DESTS} allowed)`);
    }
    if (!Number.isInteger(sectors) || sectors < 0) throw new RangeError(`copier: invalid sector count ${sectors}`);
  }

  private checkAlive(): void {
    if (this.destroyed) throw new Error(`copier client '${this.name}' is destroyed`);
  }
}
