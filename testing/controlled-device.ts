/**
 * ControlledDevice: the block device every deterministic race test is built on.
 *
 * - Hold rules: matching bios are parked as HeldIo objects instead of being issued; the test
 *   releases or fails them in whatever order the race needs, and `waitForHeld` resolves when they
 *   have arrived (event-driven, no sleeps).
 * - Fault injection: `failNext(predicate, status)` fails the next matching bio when it is issued.
 * - Volatile write cache model: completed writes are readable at once but only durable after a
 *   flush (op "flush" or PREFLUSH: everything completed before the flush was *submitted*) or FUA
 *   (that write alone). `crash()` returns a new device holding only durable data, optionally plus
 *   a chosen subset of the unflushed writes, replayed in completion order.
 * - `log` records every completed bio in completion order; `counters` counts operations.
 *
 * Unheld bios complete synchronously inside `submit` (like a RAM disk), and a released bio completes
 * inside `release()`: nothing here uses timers or randomness, so every run is the same.
 */
import { Bio, SECTOR_SHIFT, SECTOR_SIZE, describeBio, type BioEndIo, type BioOp, type BioStatus } from "../core/bio.js";
import type { BlockDevice } from "../core/devices/block-device.js";

/** Sparse sector store in 4 KiB pages; absent pages read as zeros. */
export class SparseStore {
  static readonly PAGE_SECTORS = 8;
  private static readonly PAGE_BYTES = SparseStore.PAGE_SECTORS * SECTOR_SIZE;
  private readonly pages = new Map<number, Buffer>();

  read(sector: number, into: Buffer): void {
    this.walk(sector, into.length, (page, off, pos, len) => {
      const p = this.pages.get(page);
      if (p) p.copy(into, pos, off, off + len);
      else into.fill(0, pos, pos + len);
    });
  }

  write(sector: number, data: Buffer): void {
    this.walk(sector, data.length, (page, off, pos, len) => {
      let p = this.pages.get(page);
      if (!p) this.pages.set(page, (p = Buffer.alloc(SparseStore.PAGE_BYTES)));
      data.copy(p, off, pos, pos + len);
    });
  }

  zero(sector: number, sectors: number): void {
    this.walk(sector, sectors << SECTOR_SHIFT, (page, off, _pos, len) => {
      if (len === SparseStore.PAGE_BYTES) this.pages.delete(page);
      else this.pages.get(page)?.fill(0, off, off + len);
    });
  }

  clone(): SparseStore {
    const c = new SparseStore();
    for (const [k, v] of this.pages) c.pages.set(k, Buffer.from(v));
    return c;
  }

  private walk(sector: number, bytes: number, fn: (page: number, off: number, pos: number, len: number) => void): void {
    let abs = sector * SECTOR_SIZE;
    for (let pos = 0; pos < bytes;) {
      const page = Math.floor(abs / SparseStore.PAGE_BYTES);
      const off = abs % SparseStore.PAGE_BYTES;
      const len = Math.min(SparseStore.PAGE_BYTES - off, bytes - pos);
      fn(page, off, pos, len);
      pos += len;
      abs += len;
    }
  }
}

/** One completed bio, as recorded in `ControlledDevice.log`. */
export interface IoRecord {
  /** Submission sequence number (shared with HeldIo.seq). */
  seq: number;
  op: BioOp;
  sector: number;
  sectors: number;
  flags: number;
  status: BioStatus;
}

/** A completed write (write, write-zeroes or discard) that the cache has not made durable yet. */
export interface CachedWrite {
  seq: number;
  op: BioOp;
  sector: number;
  sectors: number;
  flags: number;
}

interface CacheEntry extends CachedWrite {
  /** Completion index: position among all completed writes since the cache model started. */
  index: number;
  /** Copy of the written data; null for write-zeroes/discard (both read back as zeros here). */
  data: Buffer | null;
  durable: boolean;
}

export type BioPredicate = (bio: Bio) => boolean;

export interface HoldHandle {
  readonly predicate: BioPredicate;
}

/** What a HeldIo may do to its device (kept off ControlledDevice's public surface). */
interface HeldIoOwner {
  issue(bio: Bio): void;
  finish(bio: Bio, status: BioStatus): void;
  unhold(io: HeldIo): void;
}

export class HeldIo {
  private settled = false;
  constructor(
    private readonly owner: HeldIoOwner,
    readonly bio: Bio,
    readonly seq: number,
  ) {}
  get op(): BioOp {
    return this.bio.op;
  }
  get sector(): number {
    return this.bio.sector;
  }
  get sectors(): number {
    return this.bio.sectors;
  }
  get flags(): number {
    return this.bio.flags;
  }

  /** Issue the bio now (it completes before this returns, unless the backing device is async). */
  release(): void {
    this.settle();
    this.owner.issue(this.bio);
  }

  /** Complete the bio with an error without touching the data. */
  fail(status: BioStatus = "EIO"): void {
    this.settle();
    this.owner.finish(this.bio, status);
  }

  toString(): string {
    return `#${this.seq} ${describeBio(this.bio)}`;
  }

  private settle(): void {
    if (this.settled) throw new Error(`held I/O ${this} was already released or failed`);
    this.settled = true;
    this.owner.unhold(this);
  }
}

export interface ControlledDeviceOptions {
  name?: string;
  /** Model a volatile write cache (needs the device's own store, not a `backing` device). */
  volatileCache?: boolean;
  supportsDiscard?: boolean;
  supportsWriteZeroes?: boolean;
  readOnly?: boolean;
}

interface HeldWaiter {
  match: (io: HeldIo) => boolean;
  count: number;
  resolve: (ios: HeldIo[]) => void;
}

export class ControlledDevice implements BlockDevice, BioEndIo {
  readonly tableName: string;
  readonly displayName: string;
  readonly sizeSectors: number;
  readonly logicalBlockSize = 512;
  readonly readOnly: boolean;
  readonly supportsDiscard: boolean;
  readonly supportsWriteZeroes: boolean;
  readonly volatileCache: boolean;

  /** Every completed bio, in completion order. */
  readonly log: IoRecord[] = [];
  /** Successful completions per kind; `flushes` counts flush bios and PREFLUSH-flagged bios. */
  readonly counters = { reads: 0, writes: 0, flushes: 0, fuaWrites: 0, discards: 0, writeZeroes: 0, failed: 0 };

  private store: SparseStore | null;
  private readonly backing: BlockDevice | null;
  private nextSeq = 1;
  private readonly seqOf = new WeakMap<Bio, number>();
  private readonly holds: HoldHandle[] = [];
  private heldIos: HeldIo[] = [];
  private heldWaiters: HeldWaiter[] = [];
  private readonly heldOwner: HeldIoOwner = {
    issue: (bio) => this.issue(bio),
    finish: (bio, status) => this.finish(bio, status),
    unhold: (io) => (this.heldIos = this.heldIos.filter((h) => h !== io)),
  };
  private readonly faults: { predicate: BioPredicate; status: BioStatus; remaining: number }[] = [];

  // Volatile cache model: durable = `base` + the entries of `cache` that are durable (or kept).
  private base: SparseStore | null = null;
  private cache: CacheEntry[] = [];
  private writesCompleted = 0;
  /** For a flush in flight: how many writes had completed when it was submitted. */
  private readonly flushBarrier = new WeakMap<Bio, number>();

  constructor(
    sizeOrBacking: number | BlockDevice,
    private readonly options: ControlledDeviceOptions = {},
  ) {
    if (typeof sizeOrBacking === "number") {
      this.sizeSectors = sizeOrBacking;
      this.store = new SparseStore();
      this.backing = null;
    } else {
      if (options.volatileCache)
        throw new Error("ControlledDevice: the volatile cache model needs the device's own store");
      this.sizeSectors = sizeOrBacking.sizeSectors;
      this.store = null;
      this.backing = sizeOrBacking;
    }
    this.tableName = options.name ?? `controlled:${this.sizeSectors}`;
    this.displayName = this.tableName;
    this.readOnly = options.readOnly ?? false;
    this.supportsDiscard = options.supportsDiscard ?? true;
    this.supportsWriteZeroes = options.supportsWriteZeroes ?? true;
    this.volatileCache = options.volatileCache ?? false;
    if (this.volatileCache) this.base = new SparseStore();
  }

  // ---- BlockDevice ----

  submit(bio: Bio): void {
    const seq = this.nextSeq++;
    this.seqOf.set(bio, seq);
    // Flush semantics are fixed at submission: only writes completed by now are covered.
    if (bio.op === "flush" || bio.isPreflush) this.flushBarrier.set(bio, this.writesCompleted);
    if (this.holds.some((h) => h.predicate(bio))) {
      const io = new HeldIo(this.heldOwner, bio, seq);
      this.heldIos.push(io);
      this.wakeHeldWaiters();
      return;
    }
    this.issue(bio);
  }

  async close(): Promise<void> {}

  // ---- hold rules ----

  /** Hold every bio submitted from now on that matches, until `stopHolding`. */
  hold(predicate: BioPredicate = () => true): HoldHandle {
    const handle = { predicate };
    this.holds.push(handle);
    return handle;
  }

  /** Stop holding new bios for this rule; bios already held stay held. */
  stopHolding(handle: HoldHandle): void {
    const i = this.holds.indexOf(handle);
    if (i >= 0) this.holds.splice(i, 1);
  }

  /** Bios held now, in submission order. */
  held(): HeldIo[] {
    return [...this.heldIos];
  }

  /**
   * Resolve once `n` bios are held, or once `count` held bios match `predicate`; resolves with
   * those bios (all held ones for a number). Already satisfied → resolves at once.
   */
  waitForHeld(n: number): Promise<HeldIo[]>;
  waitForHeld(predicate: (io: HeldIo) => boolean, count?: number): Promise<HeldIo[]>;
  waitForHeld(arg: number | ((io: HeldIo) => boolean), count = 1): Promise<HeldIo[]> {
    const waiter: Omit<HeldWaiter, "resolve"> =
      typeof arg === "number" ? { match: () => true, count: arg } : { match: arg, count };
    return new Promise((resolve) => {
      this.heldWaiters.push({ ...waiter, resolve });
      this.wakeHeldWaiters();
    });
  }

  /** Release everything held now, in submission order. */
  releaseAll(): void {
    for (const io of this.held()) io.release();
  }

  // ---- fault injection ----

  /** Fail the next `times` matching bios (checked when a bio is issued, i.e. after any hold). */
  failNext(predicate: BioPredicate, status: BioStatus = "EIO", times = 1): void {
    this.faults.push({ predicate, status, remaining: times });
  }

  // ---- direct access for test setup and assertions (no log, no holds) ----

  /** Read the current (not necessarily durable) contents. */
  readSync(sector: number, sectors: number): Buffer {
    const buf = Buffer.alloc(sectors << SECTOR_SHIFT);
    this.ownStore().read(sector, buf);
    return buf;
  }

  /** Write seed data that is immediately durable. */
  writeSync(sector: number, data: Buffer): void {
    if (this.cache.some((e) => overlaps(e, sector, data.length >> SECTOR_SHIFT))) {
      throw new Error("writeSync over an unflushed cached write would make the cache model inconsistent");
    }
    this.ownStore().write(sector, data);
    this.base?.write(sector, data);
  }

  // ---- volatile cache model ----

  /** Completed writes not yet durable, in completion order. */
  unflushed(): CachedWrite[] {
    return this.cache
      .filter((e) => !e.durable)
      .map(({ seq, op, sector, sectors, flags }) => ({ seq, op, sector, sectors, flags }));
  }

  /**
   * What the disk would hold after a power cut now: durable data, plus the unflushed writes that
   * `keep` selects (partial cache writeback), replayed in completion order. Held bios count as
   * never written. The returned device is fresh (no holds, empty log) with the same options.
   */
  crash(opts: { keep?: (write: CachedWrite) => boolean } = {}): ControlledDevice {
    const image = this.base ? this.base.clone() : this.ownStore().clone();
    for (const e of this.cache) {
      if (e.durable || opts.keep?.({ seq: e.seq, op: e.op, sector: e.sector, sectors: e.sectors, flags: e.flags })) {
        apply(image, e);
      }
    }
    const dev = new ControlledDevice(this.sizeSectors, this.options);
    dev.store = image;
    if (dev.base) dev.base = image.clone();
    return dev;
  }

  // ---- internals ----

  private issue(bio: Bio): void {
    const fault = this.faults.find((f) => f.predicate(bio));
    if (fault) {
      if (--fault.remaining === 0) this.faults.splice(this.faults.indexOf(fault), 1);
      this.finish(bio, fault.status);
      return;
    }
    if (this.backing) {
      // Forward a clone so the backing device's completion comes back here first.
      const clone = new Bio(bio.op, bio.sector, bio.sectors, bio.data, bio.flags, this);
      clone.owner = bio;
      clone.submitTo(this.backing);
      return;
    }
    this.finish(bio, this.execute(bio));
  }

  /** Completion of a clone forwarded to the backing device. */
  bioDone(clone: Bio): void {
    this.finish(clone.owner as Bio, clone.status);
  }

  private execute(bio: Bio): BioStatus {
    const store = this.ownStore();
    if (bio.op !== "read" && bio.op !== "flush" && this.readOnly) return "EPERM";
    if (bio.sector < 0 || bio.sector + bio.sectors > this.sizeSectors) return "EIO";
    switch (bio.op) {
      case "read":
        store.read(bio.sector, bio.data.subarray(0, bio.bytes));
        return "ok";
      case "write":
        store.write(bio.sector, bio.data.subarray(0, bio.bytes));
        return "ok";
      case "discard":
        if (!this.supportsDiscard) return "EOPNOTSUPP";
        store.zero(bio.sector, bio.sectors);
        return "ok";
      case "write-zeroes":
        if (!this.supportsWriteZeroes) return "EOPNOTSUPP";
        store.zero(bio.sector, bio.sectors);
        return "ok";
      case "flush":
        return "ok";
    }
  }

  /** Record and complete a bio; for successful writes/flushes, update the cache model first. */
  private finish(bio: Bio, status: BioStatus): void {
    if (status === "ok") {
      this.count(bio);
      if (this.base) this.updateCache(bio);
    } else {
      this.counters.failed++;
    }
    this.log.push({
      seq: this.seqOf.get(bio) ?? 0,
      op: bio.op,
      sector: bio.sector,
      sectors: bio.sectors,
      flags: bio.flags,
      status,
    });
    bio.complete(status);
  }

  private count(bio: Bio): void {
    const c = this.counters;
    if (bio.op === "flush" || bio.isPreflush) c.flushes++;
    if (bio.op === "read") c.reads++;
    else if (bio.op === "write") c.writes++;
    else if (bio.op === "discard") c.discards++;
    else if (bio.op === "write-zeroes") c.writeZeroes++;
    if (bio.isFua && bio.op !== "read" && bio.op !== "flush") c.fuaWrites++;
  }

  private updateCache(bio: Bio): void {
    // PREFLUSH: the flush happens before this bio's own data, so it covers earlier writes only.
    const barrier = this.flushBarrier.get(bio);
    if (barrier !== undefined) for (const e of this.cache) if (e.index < barrier) e.durable = true;
    if (bio.op === "write" || bio.op === "write-zeroes" || bio.op === "discard") {
      this.cache.push({
        seq: this.seqOf.get(bio) ?? 0,
        op: bio.op,
        sector: bio.sector,
        sectors: bio.sectors,
        flags: bio.flags,
        index: this.writesCompleted++,
        data: bio.op === "write" ? Buffer.from(bio.data.subarray(0, bio.bytes)) : null,
        durable: bio.isFua,
      });
    }
    // Fold the durable prefix into the base image; later entries must stay to keep replay order.
    let n = 0;
    while (n < this.cache.length && this.cache[n]!.durable) apply(this.base!, this.cache[n++]!);
    if (n > 0) this.cache.splice(0, n);
  }

  private wakeHeldWaiters(): void {
    this.heldWaiters = this.heldWaiters.filter((w) => {
      const matching = this.heldIos.filter(w.match);
      if (matching.length < w.count) return true;
      w.resolve(matching);
      return false;
    });
  }

  private ownStore(): SparseStore {
    if (!this.store)
      throw new Error("ControlledDevice: direct access needs the device's own store (not a backing device)");
    return this.store;
  }
}

function apply(store: SparseStore, e: CacheEntry): void {
  if (e.data) store.write(e.sector, e.data);
  else store.zero(e.sector, e.sectors);
}

function overlaps(e: CachedWrite, sector: number, sectors: number): boolean {
  return e.sector < sector + sectors && sector < e.sector + e.sectors;
}
