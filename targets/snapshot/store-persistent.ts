/**
 * The persistent exception store ("P"/"PO", dm-snap-persistent.c), writing
 * the kernel's on-disk format (cow-format.ts) so COW images are interchangeable with the kernel's.
 *
 * Metadata is written by one async commit writer, one area write (PREFLUSH|FUA) at a time, and
 * commit callbacks run after the write that records them, in commit order; docs/snapshot.md
 * ("The persistent store's commit protocol") states the rules.
 */
import { BioFlags } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { JsonLineLogger, type Logger } from "../../core/logger.js";
import { WorkQueue } from "../../core/work-queue.js";
import {
  DEFAULT_CHUNK_SECTORS,
  SNAP_MAGIC,
  SNAPSHOT_DISK_VERSION,
  areaLocation,
  chunkBytes,
  chunkSizeError,
  decodeHeader,
  encodeHeader,
  exceptionsPerArea,
  readRecord,
  skipMetadata,
  writeRecord,
} from "./cow-format.js";
import type { ExceptionStore, StoreParams } from "./store.js";
import { StoreError, readChunk, writeChunk } from "./store-io.js";

type Done = (success: boolean) => void;

/** One metadata write: the area chunk to write (a private copy) and whom to tell afterwards. */
interface CommitJob {
  area: number;
  data: Buffer;
  /** The area is full: zero area+1 on disk first, so a loader never reads past it into stale records. */
  zeroNext: boolean;
  callbacks: Done[];
}

const METADATA_WRITE = BioFlags.PREFLUSH | BioFlags.FUA;
const READ_AHEAD_AREAS = 12;
const READ_AHEAD_BYTES = 4 << 20;

export class PersistentStore implements ExceptionStore {
  readonly kind = "persistent";
  chunkSize: number;
  private readonly cow: BlockDevice;
  private readonly logger: Logger;
  private readonly blockSizes: readonly number[];
  /** ksnaphd: header reads and writes, never queued behind a metadata-area write. */
  private readonly headerQueue: WorkQueue;

  private loaded = false;
  private valid = true;
  /** E: records per area. */
  private epa = 0;
  /** The in-memory current area (B4: after a load, the contents of the last, partly filled area). */
  private area: Buffer = Buffer.alloc(0);
  private currentArea = 0;
  /** Next free record slot in the current area. */
  private currentCommitted = 0;
  /** Next chunk to allocate (header + area 0 come first). */
  private nextFree = 2;
  /** Prepared and not yet committed. */
  private pendingCount = 0;

  /** Callbacks of records in the open area that no write job has taken yet, in commit order. */
  private batch: Done[] = [];
  /** The open area must be written (pendingCount reached 0 with records in `batch`). */
  private writeWanted = false;
  /** Full areas waiting for their write, oldest first. */
  private sealed: CommitJob[] = [];
  /** The commit writer loop is running (a job is in flight or its callbacks are running). */
  private writing = false;
  private idleWaiters: (() => void)[] = [];
  /** Merge-path and load-path area I/O in flight (for drain). */
  private readonly directIo = new Set<Promise<unknown>>();

  constructor(
    params: StoreParams,
    public userspaceSupportsOverflow: boolean,
  ) {
    this.cow = params.cow;
    this.chunkSize = params.chunkSize;
    this.blockSizes = params.blockSizes;
    this.logger = params.logger ?? new JsonLineLogger();
    this.headerQueue = new WorkQueue("ksnaphd", { ordered: true, logger: this.logger });
  }

  // ---- loading ----

  async readMetadata(cb: (oldChunk: number, newChunk: number) => void): Promise<"valid" | "invalid"> {
    const supplied = this.chunkSize !== 0;
    if (!supplied) this.chunkSize = Math.max(DEFAULT_CHUNK_SECTORS, this.cow.logicalBlockSize / 512);
    const header = decodeHeader(await this.headerIo(() => readChunk(this.cow, this.chunkSize, 0)));
    const isNew = header.magic === 0;
    if (!isNew) {
      if (header.magic !== SNAP_MAGIC) throw new StoreError("Invalid or corrupt snapshot", "ENXIO");
      this.valid = header.valid !== 0;
      if (header.chunkSize !== this.chunkSize) this.adoptDiskChunkSize(header.chunkSize, supplied);
    }
    this.epa = exceptionsPerArea(this.chunkSize);
    this.area = Buffer.alloc(chunkBytes(this.chunkSize));
    if (isNew) {
      // Area 0 is zeroed, durably, before the header says the store exists. On a reused COW
      // device area 0 may hold an older store's records, and a crash after the header but before
      // the zeroing would load them as this store's (the kernel, persistent_read_metadata, writes
      // the header first: docs/snapshot.md, "A new store on a reused COW device"). Both writes
      // are FUA: the zeroed area is durable before the header is written.
      await this.track(
        writeChunk(this.cow, this.chunkSize, areaLocation(this.epa, 0), Buffer.alloc(this.area.length), BioFlags.FUA),
      );
      await this.headerIo(() =>
        writeChunk(this.cow, this.chunkSize, 0, encodeHeader(this.chunkSize, true), BioFlags.FUA),
      );
      this.loaded = true;
      return "valid";
    }
    if (header.version !== SNAPSHOT_DISK_VERSION) {
      throw new StoreError(`unable to handle snapshot disk version ${header.version}`, "EINVAL");
    }
    this.loaded = true;
    if (!this.valid) return "invalid";
    await this.readExceptions(cb);
    return "valid";
  }

  private adoptDiskChunkSize(diskChunkSize: number, supplied: boolean): void {
    if (supplied) {
      this.logger.warn(
        `chunk size ${diskChunkSize} in device metadata overrides table chunk size of ${this.chunkSize}.`,
        {
          cow: this.cow.displayName,
        },
      );
    }
    const err = chunkSizeError(diskChunkSize, this.blockSizes);
    if (err) throw new StoreError(`invalid on-disk chunk size ${diskChunkSize}: ${err}.`, "EINVAL");
    this.chunkSize = diskChunkSize;
  }

  /**
   * Walk the areas until one is not full; that one becomes the in-memory current area. Like the
   * kernel, reads a few areas ahead (bounded to a few MiB of buffers).
   */
  private async readExceptions(cb: (oldChunk: number, newChunk: number) => void): Promise<void> {
    const window = Math.max(1, Math.min(READ_AHEAD_AREAS, Math.floor(READ_AHEAD_BYTES / this.area.length)));
    const ahead = new Map<number, Promise<Buffer>>();
    const fetch = (index: number) => this.track(readChunk(this.cow, this.chunkSize, areaLocation(this.epa, index)));
    const fits = (index: number) => (areaLocation(this.epa, index) + 1) * this.chunkSize <= this.cow.sizeSectors;
    for (let index = 0; ; index++) {
      const current = ahead.get(index) ?? fetch(index);
      ahead.delete(index);
      for (let k = index + 1; k < index + window && fits(k); k++) {
        if (!ahead.has(k)) ahead.set(k, fetch(k)); // errors of unused read-ahead are ignored (track handles them)
      }
      const buf = await current;
      for (let slot = 0; slot < this.epa; slot++) {
        const { oldChunk, newChunk } = readRecord(buf, slot);
        if (newChunk === 0) {
          // Not full: this is the current area (B4). Whatever follows the terminator is dropped,
          // so appending a record can never expose it.
          buf.fill(0, slot * 16);
          this.area = buf;
          this.currentArea = index;
          this.currentCommitted = slot;
          this.nextFree = skipMetadata(this.epa, this.nextFree); // B3
          return;
        }
        if (this.nextFree <= newChunk) this.nextFree = newChunk + 1;
        cb(oldChunk, newChunk);
      }
    }
  }

  // ---- allocation and commit ----

  prepareException(): number | null {
    this.assertLoaded();
    if (this.cow.sizeSectors < (this.nextFree + 1) * this.chunkSize) return null;
    const chunk = this.nextFree;
    this.nextFree = skipMetadata(this.epa, this.nextFree + 1);
    this.pendingCount++;
    return chunk;
  }

  consecutiveFree(max: number): number {
    this.assertLoaded();
    let n = 0;
    for (let chunk = this.nextFree; n < max && this.cow.sizeSectors >= (chunk + 1) * this.chunkSize; chunk++) {
      n++;
      // The chunk after this one is a metadata area's: the run ends here.
      if (skipMetadata(this.epa, chunk + 1) !== chunk + 1) break;
    }
    return n;
  }

  commitException(oldChunk: number, newChunk: number, valid: boolean, done: Done): void {
    this.assertLoaded();
    if (this.pendingCount <= 0) throw new Error("persistent snapshot: commitException without a prepared exception");
    if (!valid) this.valid = false; // a failed copy: nothing more is recorded, but batching goes on (R15)
    writeRecord(this.area, this.currentCommitted++, oldChunk, newChunk);
    this.batch.push(done);
    this.pendingCount--;
    if (this.pendingCount > 0 && this.currentCommitted < this.epa) return; // group commit
    if (this.currentCommitted === this.epa) {
      this.sealed.push({ area: this.currentArea, data: this.area, zeroNext: true, callbacks: this.batch });
      this.batch = [];
      this.writeWanted = false;
      this.currentArea++;
      this.currentCommitted = 0;
      this.area = Buffer.alloc(this.area.length);
    } else {
      this.writeWanted = true;
    }
    this.kick();
  }

  private kick(): void {
    if (this.writing) return; // the running loop picks the new work up when its write completes
    this.writing = true;
    void this.runJobs();
  }

  private nextJob(): CommitJob | null {
    const sealed = this.sealed.shift();
    if (sealed) return sealed;
    if (!this.writeWanted) return null;
    this.writeWanted = false;
    const job = { area: this.currentArea, data: Buffer.from(this.area), zeroNext: false, callbacks: this.batch };
    this.batch = [];
    return job;
  }

  private async runJobs(): Promise<void> {
    for (let job = this.nextJob(); job; job = this.nextJob()) {
      await this.writeJob(job);
      const ok = this.valid;
      for (const done of job.callbacks) {
        try {
          done(ok);
        } catch (err) {
          this.logger.error("persistent snapshot: commit callback threw", { error: String(err) });
        }
      }
    }
    // Same synchronous step as the empty nextJob(): no commit can slip in between.
    this.writing = false;
    for (const wake of this.idleWaiters.splice(0)) wake();
  }

  /** Never rejects: errors clear `valid`. */
  private async writeJob(job: CommitJob): Promise<void> {
    const cs = this.chunkSize;
    if (job.zeroNext) {
      try {
        await writeChunk(this.cow, cs, areaLocation(this.epa, job.area + 1), Buffer.alloc(job.data.length), 0);
      } catch (err) {
        this.metadataError(err);
      }
    }
    if (!this.valid) return;
    try {
      await writeChunk(this.cow, cs, areaLocation(this.epa, job.area), job.data, METADATA_WRITE);
    } catch (err) {
      this.metadataError(err);
    }
  }

  private metadataError(err: unknown): void {
    this.valid = false;
    this.logger.warn("persistent snapshot: metadata write failed", {
      cow: this.cow.displayName,
      error: (err as Error).message,
    });
  }

  // ---- merge (dm-snap-persistent.c: persistent_prepare_merge, persistent_commit_merge) ----

  async prepareMerge(): Promise<{ count: number; oldChunk: number; newChunk: number } | 0> {
    this.assertLoaded();
    if (this.currentCommitted === 0) {
      if (this.currentArea === 0) return 0;
      const previous = this.currentArea - 1;
      this.area = await this.track(readChunk(this.cow, this.chunkSize, areaLocation(this.epa, previous)));
      this.currentArea = previous;
      this.currentCommitted = this.epa;
    }
    const cc = this.currentCommitted;
    const last = readRecord(this.area, cc - 1);
    let count = 1;
    for (; count < cc; count++) {
      const r = readRecord(this.area, cc - 1 - count);
      if (r.oldChunk !== last.oldChunk - count || r.newChunk !== last.newChunk - count) break;
    }
    return { count, oldChunk: last.oldChunk, newChunk: last.newChunk };
  }

  async commitMerge(count: number): Promise<void> {
    this.assertLoaded();
    const cc = this.currentCommitted;
    if (!Number.isInteger(count) || count < 1 || count > cc)
      throw new Error(`persistent snapshot: cannot merge ${count} of ${cc} records`);
    const next = Buffer.from(this.area);
    next.fill(0, (cc - count) * 16, cc * 16);
    await this.track(
      writeChunk(this.cow, this.chunkSize, areaLocation(this.epa, this.currentArea), next, METADATA_WRITE),
    );
    this.area = next;
    this.currentCommitted = cc - count;
    // Only usage() reads it from now on: the value an in-order store would have.
    this.nextFree = areaLocation(this.epa, this.currentArea) + this.currentCommitted + 1;
  }

  // ---- invalidation, status, teardown ----

  async dropSnapshot(): Promise<void> {
    this.valid = false;
    if (!this.loaded) return; // never write a header over a COW device that was not (or could not be) read
    const cs = this.chunkSize;
    try {
      // A fresh header buffer: the area buffer may be in the middle of a commit (R7).
      await this.headerIo(() => writeChunk(this.cow, cs, 0, encodeHeader(cs, false), BioFlags.FUA));
    } catch (err) {
      this.logger.warn("write header failed", { cow: this.cow.displayName, error: (err as Error).message });
    }
  }

  usage(): { total: number; allocated: number; metadata: number } {
    const cs = this.chunkSize;
    return { total: this.cow.sizeSectors, allocated: this.nextFree * cs, metadata: (this.currentArea + 2) * cs };
  }

  statusTable(): string {
    return ` ${this.userspaceSupportsOverflow ? "PO" : "P"} ${this.chunkSize}`;
  }

  async drain(): Promise<void> {
    for (;;) {
      if (this.writing) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
      else if (this.directIo.size > 0) await Promise.allSettled([...this.directIo]);
      else if (this.headerQueue.size > 0) await this.headerQueue.flush();
      else return;
    }
  }

  // ---- helpers ----

  /** Run header I/O on the ksnaphd queue. */
  private headerIo<T>(fn: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => this.headerQueue.queue(() => fn().then(resolve, reject)));
  }

  private track<T>(p: Promise<T>): Promise<T> {
    this.directIo.add(p);
    const untrack = () => void this.directIo.delete(p);
    p.then(untrack, untrack);
    return p;
  }

  private assertLoaded(): void {
    if (!this.loaded) throw new Error("persistent snapshot: store used before readMetadata");
  }
}
