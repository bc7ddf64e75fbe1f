/**
 * Reading and replaying a dm-log-writes log, as josefbacik's log-writes tools do (log-writes.c,
 * replay-log.c): open the log (super block checks), seek to an entry or past a mark, replay
 * entries onto a device until a limit, a mark, the next flush or FUA, or the end, or just find
 * which entry such a stop condition names.
 *
 * Semantics kept from the tool:
 * - entries are numbered from 0; only the super block's nr_entries entries exist;
 * - `limit` counts entries from where replay starts (0: no limit); the entry that meets a stop
 *   condition is replayed, then replay stops;
 * - with an end mark, the stop flags only stop at that mark (should_stop: a mark stop condition
 *   overrides next-flush / next-fua);
 * - `startMark` starts right after the named mark; seeking to an entry number past the end fails
 *   with "Invalid entry number" (the library, unlike the tool, accepts entry 0 of an empty log);
 * - a discard is replayed as a discard; when the device refuses discards, as zeros, except that a
 *   discard chunk longer than `maxZeroSize` (128 MiB) is then skipped; `discard: false` skips them.
 */
import { Bio, BioError, SECTOR_SHIFT, SECTOR_SIZE, flushBio, submitAndWait } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import {
  LOG_DISCARD_FLAG,
  LOG_ENTRY_SIZE,
  LOG_FLUSH_FLAG,
  LOG_FUA_FLAG,
  LOG_MARK_FLAG,
  LOG_SUPER_SIZE,
  LogFormatError,
  type LogEntry,
  type LogSuper,
  decodeEntryBlock,
  decodeSuper,
  entryHasData,
  flagsToString,
} from "./format.js";

/** Random-access reads of the log. */
export interface LogSource {
  /** Read exactly `length` bytes at byte `offset`; rejects on a short read. */
  read(offset: number, length: number): Promise<Buffer>;
}

/** A log held in memory. */
export function bufferLogSource(buf: Buffer): LogSource {
  return {
    async read(offset, length) {
      if (offset + length > buf.length) throw new LogFormatError(`short read at byte ${offset} of the log`);
      return buf.subarray(offset, offset + length);
    },
  };
}

/** A log on a block device (a log-writes target's log_dev, or a file opened as a device). */
export function deviceLogSource(dev: BlockDevice): LogSource {
  return {
    async read(offset, length) {
      const first = Math.floor(offset / SECTOR_SIZE);
      const end = Math.ceil((offset + length) / SECTOR_SIZE);
      if (end > dev.sizeSectors) throw new LogFormatError(`short read at byte ${offset} of ${dev.displayName}`);
      const buf = Buffer.alloc((end - first) * SECTOR_SIZE);
      await submitAndWait(dev, new Bio("read", first, end - first, buf, 0, null));
      const skip = offset - first * SECTOR_SIZE;
      return buf.subarray(skip, skip + length);
    },
  };
}

/** Log lines the tool prints with -v (replaying) and -vv (seeking). */
export type VerboseSink = (level: number, line: string) => void;

/** An open log: the tool's `struct log` (cur_entry, cur_pos) over a LogSource. */
export class LogReader {
  /** Index of the next entry `next()` returns. */
  curEntry = 0;
  /** Byte offset of that entry's metadata block. */
  position: number;

  private constructor(
    readonly source: LogSource,
    readonly super_: LogSuper,
    private readonly verbose: VerboseSink | undefined,
  ) {
    this.position = super_.sectorSize;
  }

  /**
   * Read and check the super block (LogFormatError "Magic doesn't match" / "Version mismatch ...").
   * `nrEntries` overrides the super block's count: a live target only rewrites the super block
   * after FUA and MARK entries, so its status line's count can be ahead of it.
   */
  static async open(source: LogSource, opts: { verbose?: VerboseSink; nrEntries?: number } = {}): Promise<LogReader> {
    let head: Buffer;
    try {
      head = await source.read(0, LOG_SUPER_SIZE);
    } catch (err) {
      throw new LogFormatError(`Error reading super: ${(err as Error).message}`);
    }
    const sup = decodeSuper(head);
    if (opts.nrEntries !== undefined) sup.nrEntries = opts.nrEntries;
    return new LogReader(source, sup, opts.verbose);
  }

  get sectorSize(): number {
    return this.super_.sectorSize;
  }

  get nrEntries(): number {
    return this.super_.nrEntries;
  }

  /** Position before entry 0. */
  rewind(): void {
    this.curEntry = 0;
    this.position = this.sectorSize;
  }

  /**
   * log_seek_entry: walk the entry headers from the start up to entry `n` (0-based). Throws
   * "Invalid entry number" when `n >= nr_entries` (so also for entry 0 of an empty log, as the tool).
   */
  async seekEntry(n: number): Promise<void> {
    if (!Number.isSafeInteger(n) || n < 0 || n >= this.nrEntries) throw new LogFormatError("Invalid entry number");
    this.rewind();
    while (this.curEntry < n) await this.next({ data: false, seekLine: true });
  }

  /**
   * The next entry (header, mark text, and its data when `data` is set and it has any), or null at
   * the end of the log.
   */
  async next(opts: { data?: boolean; verb?: string; seekLine?: boolean } = {}): Promise<LogEntry | null> {
    if (this.curEntry >= this.nrEntries) return null;
    const ss = this.sectorSize;
    const offset = this.position;
    let block: Buffer;
    try {
      block = await this.source.read(offset, ss);
    } catch (err) {
      throw new LogFormatError(`Error reading entry: ${(err as Error).message}`);
    }
    const entry: LogEntry = { ...decodeEntryBlock(block), index: this.curEntry, offset };
    this.curEntry++;
    this.position += ss;
    // -vv lines as the tool prints them: log_seek_entry gives the header's own block and no flag
    // names; log_seek_next_entry the block after the header, and the names.
    if (this.verbose && opts.seekLine)
      this.verbose(
        2,
        `seek entry ${entry.index}@${offset / ss}: ${entry.sector}, size ${entry.nrSectors}, flags ${hex(entry.flags)}`,
      );
    else if (this.verbose && opts.verb)
      this.verbose(
        2,
        `${opts.verb} ${entry.index}@${this.position / ss}: ${entry.sector}, size ${entry.nrSectors}, flags ${hex(entry.flags)}(${flagsToString(entry.flags)})`,
      );
    if (entryHasData(entry)) {
      const bytes = entry.nrSectors * ss;
      if (opts.data) {
        try {
          entry.data = await this.source.read(this.position, bytes);
        } catch (err) {
          throw new LogFormatError(`Error reading data: ${(err as Error).message}`);
        }
      }
      this.position += bytes;
    }
    return entry;
  }

  /** seek_to_mark: position right after the first mark named `mark`; throws if there is none. */
  async seekPastMark(mark: string | Buffer): Promise<LogEntry> {
    const want = toMarkBytes(mark);
    for (let e = await this.next({ verb: "seek entry" }); e; e = await this.next({ verb: "seek entry" })) {
      if (shouldStop(e, LOG_MARK_FLAG, want)) return e;
    }
    throw new LogFormatError("Couldn't find starting mark");
  }

  /** The block right after the last entry `next()` returned (the tool's cur_pos / sectorsize). */
  get block(): number {
    return this.position / this.sectorSize;
  }

  /** Every remaining entry, with data when asked. */
  async *entries(opts: { data?: boolean } = {}): AsyncGenerator<LogEntry> {
    for (let e = await this.next(opts); e; e = await this.next(opts)) yield e;
  }
}

/** The tool reads marks from the command line with strndup(optarg, 4097 - 32). */
const MAX_CLI_MARK = 4097 - LOG_ENTRY_SIZE;

function toMarkBytes(mark: string | Buffer): Buffer {
  const buf = typeof mark === "string" ? Buffer.from(mark, "utf8") : mark;
  return buf.subarray(0, MAX_CLI_MARK);
}

/**
 * The tool's should_stop: the entry has one of `stopFlags`; if MARK is among them, only a mark
 * whose text equals `mark` stops.
 */
export function shouldStop(
  entry: Pick<LogEntry, "flags" | "mark">,
  stopFlags: number,
  mark?: string | Buffer,
): boolean {
  if (!(entry.flags & stopFlags)) return false;
  if (!(stopFlags & LOG_MARK_FLAG)) return true;
  return (
    (entry.flags & LOG_MARK_FLAG) !== 0 &&
    mark !== undefined &&
    entry.mark !== undefined &&
    entry.mark.equals(toMarkBytes(mark))
  );
}

export interface StopOptions {
  /** Start at this entry (default 0). */
  startEntry?: number;
  /** Start right after this mark (instead of startEntry). */
  startMark?: string;
  /** Stop after this many entries (0 or absent: no limit). */
  limit?: number;
  /** Stop at (after replaying) the mark with this name. */
  endMark?: string;
  /** Stop at the next entry with the FLUSH flag. */
  nextFlush?: boolean;
  /** Stop at the next entry with the FUA flag. */
  nextFua?: boolean;
}

export interface ReplayOptions extends StopOptions {
  /** Replay discards (default true; the tool's --no-discard sets false). */
  discard?: boolean;
  /** Longest discard chunk emulated with zeros when the device refuses discards (128 MiB). */
  maxZeroSize?: number;
  /**
   * Called after each replayed entry with the number replayed so far (the tool's --check/--fsck
   * hook); return false to stop there.
   */
  afterEntry?: (entry: LogEntry, replayed: number) => boolean | void | Promise<boolean | void>;
  /** Lines the tool prints with -v / -vv. */
  verbose?: VerboseSink;
  /**
   * Replay only writes touching sectors [startSector, endSector] (the tool's --start-sector and
   * --end-sector, in log sectors); discards are replayed wherever they fall, as the tool does.
   */
  startSector?: number;
  endSector?: number;
  /**
   * Replay discards by writing zeros, saying so once at -v, as the tool does on a regular file
   * (its BLKDISCARD fails there). The bytes are the same as a punched hole; the output is the tool's.
   */
  zeroDiscards?: boolean;
}

export interface ReplayResult {
  /** Entries replayed. */
  replayed: number;
  /** Index of the last entry replayed, or -1. */
  lastEntry: number;
  /** Why replay stopped. */
  stoppedBy: "end" | "limit" | "condition" | "callback";
}

function stopFlagsOf(opts: StopOptions): number {
  return (
    (opts.nextFlush ? LOG_FLUSH_FLAG : 0) |
    (opts.nextFua ? LOG_FUA_FLAG : 0) |
    (opts.endMark !== undefined ? LOG_MARK_FLAG : 0)
  );
}

/** Position the reader where replay or find starts: after startMark, or at startEntry. */
async function seekStart(reader: LogReader, opts: StopOptions): Promise<void> {
  reader.rewind();
  if (opts.startMark !== undefined) await reader.seekPastMark(opts.startMark);
  // Unlike the tool (and the CLI), starting at entry 0 of an empty log is not an error here.
  else if (opts.startEntry) await reader.seekEntry(opts.startEntry);
}

async function asReader(log: LogReader | BlockDevice | Buffer, verbose?: VerboseSink): Promise<LogReader> {
  if (log instanceof LogReader) return log;
  return LogReader.open(Buffer.isBuffer(log) ? bufferLogSource(log) : deviceLogSource(log), { verbose });
}

/**
 * Find mode: the index of the entry where replay with these options would stop (limit reached or
 * stop condition met), or null if none does.
 */
export async function findEntry(
  log: LogReader | BlockDevice | Buffer,
  opts: StopOptions & { verbose?: VerboseSink } = {},
): Promise<number | null> {
  const reader = await asReader(log, opts.verbose);
  await seekStart(reader, opts);
  const stopFlags = stopFlagsOf(opts);
  let n = 0;
  for (let e = await reader.next({ verb: "seek entry" }); e; e = await reader.next({ verb: "seek entry" })) {
    n++;
    if ((opts.limit && n === opts.limit) || shouldStop(e, stopFlags, opts.endMark)) return e.index;
  }
  return null;
}

/** Replay entries of `log` onto `dev`; see the module comment for the stop rules. */
export async function replayLog(
  log: LogReader | BlockDevice | Buffer,
  dev: BlockDevice,
  opts: ReplayOptions = {},
): Promise<ReplayResult> {
  const reader = await asReader(log, opts.verbose);
  await seekStart(reader, opts);
  const replayer = new EntryReplayer(dev, reader.sectorSize, opts);
  const stopFlags = stopFlagsOf(opts);
  let replayed = 0;
  let lastEntry = -1;
  let stoppedBy: ReplayResult["stoppedBy"] = "end";
  for (let e = await reader.next({ data: true }); e; e = await reader.next({ data: true })) {
    await replayer.apply(e);
    replayed++;
    lastEntry = e.index;
    if (opts.afterEntry && (await opts.afterEntry(e, replayed)) === false) {
      stoppedBy = "callback";
      break;
    }
    if (opts.limit && replayed === opts.limit) {
      stoppedBy = "limit";
      break;
    }
    if (shouldStop(e, stopFlags, opts.endMark)) {
      stoppedBy = "condition";
      break;
    }
  }
  await syncDevice(dev);
  return { replayed, lastEntry, stoppedBy };
}

/** fsync of the replay device: an empty flush. */
export async function syncDevice(dev: BlockDevice): Promise<void> {
  await submitAndWait(dev, flushBio());
}

/** Applies single entries to a device (log_replay_next_entry + log_discard). */
export class EntryReplayer {
  private discardNotSupported = false;
  private readonly maxZeroSize: number;

  constructor(
    private readonly dev: BlockDevice,
    private readonly sectorSize: number,
    private readonly opts: Pick<
      ReplayOptions,
      "discard" | "maxZeroSize" | "verbose" | "startSector" | "endSector" | "zeroDiscards"
    > = {},
  ) {
    this.maxZeroSize = opts.maxZeroSize ?? 128 * 1024 * 1024;
  }

  async apply(entry: LogEntry): Promise<void> {
    const size = entry.nrSectors * this.sectorSize;
    const skip = this.outsideRegion(entry);
    const block = entry.offset / this.sectorSize + 1; // the tool's cur_pos after the header
    this.opts.verbose?.(
      skip ? 2 : 1,
      `${skip ? "skipping" : "replaying"} ${entry.index}@${block}: sector ${entry.sector}, size ${size}, ` +
        `flags ${hex(entry.flags)}(${flagsToString(entry.flags)})`,
    );
    if (!size) return;
    const start = entry.sector * this.sectorSize;
    // As the tool: a discard is applied whatever the region (log_replay_next_entry checks it first).
    if (entry.flags & LOG_DISCARD_FLAG) return this.discard(start, size);
    if (skip) return;
    if (!entry.data) throw new LogFormatError(`entry ${entry.index}: data not read`);
    await this.io(
      new Bio("write", start / SECTOR_SIZE, size >> SECTOR_SHIFT, entry.data, 0, null),
      "Error writing data",
    );
  }

  /** log_should_skip: the entry has sectors and none of them is in [startSector, endSector]. */
  private outsideRegion(entry: LogEntry): boolean {
    if (!entry.nrSectors) return false;
    const from = this.opts.startSector ?? 0;
    const to = this.opts.endSector ?? Number.POSITIVE_INFINITY;
    return entry.sector + entry.nrSectors <= from || entry.sector > to;
  }

  private async discard(start: number, size: number): Promise<void> {
    if (this.opts.discard === false) return;
    const maxChunk = 1024 * 1024 * 1024;
    while (size) {
      const len = Math.min(size, maxChunk);
      if (!this.discardNotSupported) {
        try {
          if (this.opts.zeroDiscards) throw new Error("discards are replayed as zeros");
          await submitAndWait(this.dev, new Bio("discard", start / SECTOR_SIZE, len / SECTOR_SIZE, null, 0, null));
        } catch {
          this.opts.verbose?.(1, "replay device doesn't support discard, switching to writing zeros");
          this.discardNotSupported = true;
        }
      }
      if (this.discardNotSupported) await this.zero(start, len);
      size -= len;
      start += len;
    }
  }

  private async zero(start: number, len: number): Promise<void> {
    if (len > this.maxZeroSize) {
      this.opts.verbose?.(1, `discard len ${len} larger than max ${this.maxZeroSize}`);
      return;
    }
    const chunk = Math.min(len, 1024 * 1024);
    const zeros = Buffer.alloc(chunk);
    for (let done = 0; done < len;) {
      const n = Math.min(chunk, len - done);
      await this.io(
        new Bio("write", (start + done) / SECTOR_SIZE, n >> SECTOR_SHIFT, zeros, 0, null),
        "Error zeroing file",
      );
      done += n;
    }
  }

  private async io(bio: Bio, what: string): Promise<void> {
    try {
      await submitAndWait(this.dev, bio);
    } catch (err) {
      throw new LogFormatError(`${what}: ${err instanceof BioError ? err.status : (err as Error).message}`);
    }
  }
}

/** printf's 0x%llx. */
function hex(n: number): string {
  return `0x${n.toString(16)}`;
}
