/**
 * log-writes: `log-writes <dev> <log_dev>` (dm-log-writes.c 1.1.0).
 *
 * Maps every bio to <dev> unchanged and logs writes, flushes, FUA writes, discards and marks onto
 * <log_dev> (format.ts) so that a replay up to any entry gives what was durable on <dev> then. The
 * ordering rules (which writes a flush entry covers, when the super block is rewritten) are in
 * docs/targets.md, "log-writes"; the log is written by one ordered work queue (the kernel's
 * log-write kthread).
 */
import { deviceLookupError } from "../../core/args.js";
import { Bio, BioError, SECTOR_SHIFT, submitAndWait } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { Logger } from "../../core/logger.js";
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
import type { WorkQueue, WorkQueues } from "../../core/work-queue.js";
import {
  END_MARK,
  LOG_DISCARD_FLAG,
  LOG_FLUSH_FLAG,
  LOG_FUA_FLAG,
  LOG_MARK_FLAG,
  WRITE_LOG_SUPER_SECTOR,
  encodeEntryBlock,
  encodeSuper,
  markBytes,
} from "./format.js";

/** One entry waiting to be logged (the kernel's struct pending_block). */
interface PendingBlock {
  flags: number;
  /** In units of the log's sector size. */
  sector: number;
  nrSectors: number;
  /** Copy of the written data (writes only). */
  data: Buffer | null;
  /** MARK entries: the mark text. */
  mark: Buffer | null;
  /** A flush's share of the unflushed list, taken when it was mapped; logged before it. */
  flushed: PendingBlock[] | null;
}

/** Per-bio map context (struct per_bio_data). */
export interface LogWritesContext {
  block: PendingBlock | null;
}

@target({
  name: "log-writes",
  version: [1, 1, 0],
  inject: [Services.DeviceLookup, Services.WorkQueues, Services.Logger],
})
export class LogWritesTarget extends Target<LogWritesContext> {
  private dev!: BlockDevice;
  private logdev!: BlockDevice;
  /** Entries logged (or being logged) so far: nr_entries of the next super block. */
  private loggedEntries = 0;
  /** The data device's logical block size: the log's unit. */
  private sectorSize = 512;
  /** 512-byte sectors per log block. */
  private blockSectors = 1;
  /** Next free log sector, in 512-byte sectors (the super takes block 0). */
  private nextSector = 0;
  /** Size of the log device in 512-byte sectors (0: not known yet). */
  private endSector = 0;
  private loggingEnabled = false;
  private deviceSupportsDiscard = true;
  private unflushed: PendingBlock[] = [];
  private readonly logging: PendingBlock[] = [];
  private queue: WorkQueue | null = null;
  /** Log writes submitted and not yet completed. */
  private readonly inflight = new Set<Promise<void>>();

  constructor(
    private readonly devices: DeviceLookup,
    private readonly workQueues: WorkQueues,
    private readonly logger: Logger,
  ) {
    super();
  }

  async ctr(args: string[]): Promise<void> {
    if (args.length < 2) throw new TargetError("Invalid argument count");
    const mode = this.table.readOnly ? "r" : "rw";
    try {
      this.dev = await this.devices.get(args[0]!, mode);
    } catch (err) {
      throw deviceLookupError("Device lookup failed", err);
    }
    try {
      this.logdev = await this.devices.get(args[1]!, mode);
    } catch (err) {
      throw deviceLookupError("Log device lookup failed", err);
    }
    this.sectorSize = this.dev.logicalBlockSize;
    this.blockSectors = this.sectorSize >> SECTOR_SHIFT;
    this.queue = this.workQueues.create("log-write", { ordered: true });
    this.nextSector = this.blockSectors;
    this.loggingEnabled = true;
    this.endSector = this.logdev.sizeSectors;
    // io_hints: a data device without discard gets discards completed here (and still logged).
    this.deviceSupportsDiscard = this.dev.supportsDiscard;
    this.numFlushBios = 1;
    this.numDiscardBios = 1;
  }

  override async dtr(): Promise<void> {
    if (!this.queue) return;
    this.queueBlocks(this.unflushed);
    this.unflushed = [];
    // Nice to have: the mark makes the super count everything logged above.
    this.logMark(END_MARK);
    await this.drain();
    await this.queue.destroy();
  }

  /** Resolves once everything handed to the logger so far is on the log device (tests, dtr). */
  async drain(): Promise<void> {
    await this.queue?.flush();
    await Promise.all([...this.inflight]);
  }

  override newMapContext(): LogWritesContext {
    return { block: null };
  }

  map(bio: Bio, ctx: LogWritesContext): MapResult {
    ctx.block = null;
    const flush = bio.op === "flush" || bio.isPreflush;
    if (!this.loggingEnabled || bio.op === "read" || (bio.sectors === 0 && !flush)) return this.remap(bio);

    const block: PendingBlock = {
      flags:
        (flush ? LOG_FLUSH_FLAG : 0) | (bio.isFua ? LOG_FUA_FLAG : 0) | (bio.op === "discard" ? LOG_DISCARD_FLAG : 0),
      sector: Math.floor(bio.sector / this.blockSectors),
      nrSectors: Math.floor(bio.sectors / this.blockSectors),
      data: null,
      mark: null,
      flushed: null,
    };
    ctx.block = block;

    if (bio.op === "discard") {
      if (this.deviceSupportsDiscard) return this.remap(bio);
      bio.complete("ok"); // endIo still sees it and logs it
      return MapResult.SUBMITTED;
    }
    if (flush && bio.sectors === 0) {
      block.flushed = this.unflushed;
      this.unflushed = [];
      return this.remap(bio);
    }
    // The caller may reuse its buffer once the write completes: keep a copy for the log.
    block.data = Buffer.from(bio.data.subarray(0, bio.sectors << SECTOR_SHIFT));
    if (flush) {
      // A flush with data (the core splits these, so only reached by direct callers).
      block.flushed = this.unflushed;
      this.unflushed = [];
    }
    return this.remap(bio);
  }

  override endIo(bio: Bio, ctx: LogWritesContext): EndIoResult {
    const block = ctx.block;
    if (bio.op === "read" || !block) return EndIoResult.DONE;
    ctx.block = null;
    if (block.flags & LOG_FLUSH_FLAG) {
      this.queueBlocks(block.flushed ?? []);
      block.flushed = null;
      this.queueBlocks([block]);
    } else if (block.flags & LOG_FUA_FLAG) {
      this.queueBlocks([block]);
    } else {
      this.unflushed.push(block);
    }
    return EndIoResult.DONE;
  }

  override status(type: StatusType): string {
    if (type === "table") return `${this.dev.tableName} ${this.logdev.tableName}`;
    return `${this.loggedEntries} ${this.nextSector - 1}${this.loggingEnabled ? "" : " logging_disabled"}`;
  }

  override message(args: string[]): string | undefined {
    if (args.length !== 2) {
      const msg = `Invalid log-writes message arguments, expect 2 arguments, got ${args.length}`;
      this.logger.warn(msg);
      throw new TargetError(msg, "EINVAL");
    }
    if (args[0]!.toLowerCase() !== "mark") {
      const msg = `Unrecognised log writes target message received: ${args[0]}`;
      this.logger.warn(msg);
      throw new TargetError(msg, "EINVAL");
    }
    this.logMark(args[1]!);
    return undefined;
  }

  override iterateDevices(fn: DeviceAreaCallback): boolean {
    return fn(this.dev, 0, this.len) === true;
  }

  // ---- logging ----

  private remap(bio: Bio): MapResult {
    bio.device = this.dev;
    return MapResult.REMAPPED;
  }

  private logMark(name: string): void {
    this.queueBlocks([
      {
        flags: LOG_MARK_FLAG,
        sector: 0,
        nrSectors: 0,
        data: null,
        mark: markBytes(name, this.sectorSize),
        flushed: null,
      },
    ]);
  }

  /** Append to the logging list and wake the logger once per block. */
  private queueBlocks(blocks: PendingBlock[]): void {
    for (const block of blocks) {
      this.logging.push(block);
      this.queue!.queue(() => this.logNext());
    }
  }

  /** One round of the kernel's log_writes_kthread: take the first block and log it. */
  private async logNext(): Promise<void> {
    const block = this.logging.shift();
    if (!block || !this.loggingEnabled) return;
    const sector = this.nextSector;
    if (!(block.flags & LOG_DISCARD_FLAG)) this.nextSector += block.nrSectors * this.blockSectors;
    this.nextSector += this.blockSectors;
    // The size of the log device may not be known right away.
    if (!this.endSector) this.endSector = this.logdev.sizeSectors;
    if (this.endSector && this.nextSector >= this.endSector) {
      this.logger.error("Ran out of space on the logdev", { logdev: this.logdev.displayName });
      this.loggingEnabled = false;
      return;
    }
    this.loggedEntries++;
    this.logOneBlock(block, sector);
    if (block.flags & (LOG_FUA_FLAG | LOG_MARK_FLAG)) await this.logSuper();
  }

  private logOneBlock(block: PendingBlock, sector: number): void {
    const entry = encodeEntryBlock(
      {
        sector: block.sector,
        nrSectors: block.nrSectors,
        flags: block.flags,
        ...(block.mark ? { mark: block.mark } : {}),
      },
      this.sectorSize,
    );
    // writeLog never rejects (a failed log write disables logging) and tracks itself in `inflight`.
    void this.writeLog(sector, entry);
    if (block.data && block.data.length > 0) void this.writeLog(sector + this.blockSectors, block.data);
  }

  /** Rewrite the super block with the current count, in order with everything logged before. */
  private async logSuper(): Promise<void> {
    await Promise.all([...this.inflight]);
    if (!this.loggingEnabled) return;
    await this.writeLog(
      WRITE_LOG_SUPER_SECTOR,
      encodeSuper({ nrEntries: this.loggedEntries, sectorSize: this.sectorSize }),
    );
  }

  private writeLog(sector: number, data: Buffer): Promise<void> {
    const bio = new Bio("write", sector, data.length >> SECTOR_SHIFT, data, 0, null);
    const done: Promise<void> = submitAndWait(this.logdev, bio).then(
      () => {
        this.inflight.delete(done);
      },
      (err: unknown) => {
        this.inflight.delete(done);
        const status = err instanceof BioError ? err.status : String(err);
        this.logger.error(`Error writing log block, error=${status}`, { logdev: this.logdev.displayName, sector });
        this.loggingEnabled = false;
      },
    );
    this.inflight.add(done);
    return done;
  }
}
