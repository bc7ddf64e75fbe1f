/**
 * The dm-log-writes on-disk log format (drivers/md/dm-log-writes.c, and the replay tool's
 * log-writes.h in josefbacik/log-writes), byte for byte. Everything is little-endian.
 *
 *   byte 0                 the super block, padded with zeros to one `sectorsize` block:
 *                          { u64 magic; u64 version; u64 nr_entries; u32 sectorsize; }
 *                          (sizeof is 32 with the struct's tail padding; bytes 28..31 are 0 here)
 *   byte sectorsize        entry 0: one `sectorsize` block holding
 *                          { u64 sector; u64 nr_sectors; u64 flags; u64 data_len; }
 *                          then, for a MARK entry, the mark text (data_len bytes, no NUL) and
 *                          zeros to the end of the block; then, unless the entry is a DISCARD,
 *                          `nr_sectors` blocks of written data
 *   ...                    entry 1, entry 2, ... (nr_entries of them are valid)
 *
 * `sectorsize` is the logical block size of the *data* device (the kernel's bdev_logical_block_size
 * of <dev>, not of the log device), and every `sector`/`nr_sectors` field counts blocks of that
 * size. The super block is only as fresh as the kernel last wrote it (after FUA and MARK entries
 * and at dtr), so entries past `nr_entries` may exist on disk; readers stop at `nr_entries`.
 */

export const LOG_FLUSH_FLAG = 1 << 0;
export const LOG_FUA_FLAG = 1 << 1;
export const LOG_DISCARD_FLAG = 1 << 2;
export const LOG_MARK_FLAG = 1 << 3;
export const LOG_METADATA_FLAG = 1 << 4;

export const WRITE_LOG_VERSION = 1;
/** "rhswfsj" read as a little-endian u64 (bytes 72 68 73 77 66 73 6a 00). */
export const WRITE_LOG_MAGIC = 0x6a736677736872n;
/** The super block lives at the start of the log (WRITE_LOG_SUPER_SECTOR). */
export const WRITE_LOG_SUPER_SECTOR = 0;

/** sizeof(struct log_write_super): 8 + 8 + 8 + 4, padded to 8-byte alignment. */
export const LOG_SUPER_SIZE = 32;
/** sizeof(struct log_write_entry). */
export const LOG_ENTRY_SIZE = 32;
/** The name of the mark the kernel logs when the target is destroyed. */
export const END_MARK = "dm-log-writes-end";

export class LogFormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "LogFormatError";
  }
}

export interface LogSuper {
  version: number;
  nrEntries: number;
  sectorSize: number;
}

/** One log entry as stored: the fields of struct log_write_entry plus what follows it. */
export interface LogEntryHeader {
  /** Written sector, in `sectorSize` units. */
  sector: number;
  /** Length in `sectorSize` units (discards: the discarded length; flush/mark: 0). */
  nrSectors: number;
  flags: number;
  /** Bytes of private entry data: the mark text's length for MARK entries, otherwise 0. */
  dataLen: number;
  /** MARK entries: the mark text, raw (what follows the 32-byte header, up to data_len or NUL). */
  mark?: Buffer;
}

export interface LogEntry extends LogEntryHeader {
  /** Position in the log, from 0. */
  index: number;
  /** Byte offset of the entry's metadata block in the log. */
  offset: number;
  /** The written data (nrSectors * sectorSize bytes) for entries that carry data, when read. */
  data?: Buffer;
}

/** What the encoder takes: an entry with its data (required for entries that carry data). */
export interface LogEntryInput {
  sector: number;
  nrSectors: number;
  flags: number;
  /** Defaults to the mark's length (MARK entries) or 0. */
  dataLen?: number;
  mark?: Buffer | string;
  data?: Buffer;
}

/** Whether an entry is followed by nr_sectors data blocks in the log (everything but discards). */
export function entryHasData(entry: { flags: number; nrSectors: number }): boolean {
  return (entry.flags & LOG_DISCARD_FLAG) === 0 && entry.nrSectors > 0;
}

/** Bytes an entry occupies in the log: its metadata block plus its data blocks. */
export function entryLogBytes(entry: { flags: number; nrSectors: number }, sectorSize: number): number {
  return sectorSize + (entryHasData(entry) ? entry.nrSectors * sectorSize : 0);
}

/** The longest mark the kernel keeps for a sector size: sectorsize - sizeof(entry) - 1 bytes. */
export function maxMarkBytes(sectorSize: number): number {
  return sectorSize - LOG_ENTRY_SIZE - 1;
}

/** A mark's bytes as the kernel stores them (kstrndup: truncated to maxMarkBytes, up to a NUL). */
export function markBytes(mark: Buffer | string, sectorSize: number): Buffer {
  let buf = typeof mark === "string" ? Buffer.from(mark, "utf8") : mark;
  const nul = buf.indexOf(0);
  if (nul >= 0) buf = buf.subarray(0, nul);
  return Buffer.from(buf.subarray(0, Math.min(buf.length, maxMarkBytes(sectorSize))));
}

/** The kernel accepts any logical block size; the format needs a power of two of at least 512. */
export function checkSectorSize(sectorSize: number): void {
  if (!Number.isInteger(sectorSize) || sectorSize < 512 || (sectorSize & (sectorSize - 1)) !== 0) {
    throw new LogFormatError(`invalid log sector size ${sectorSize}`);
  }
}

// ---- encoding ----

/** The super block, one `sectorSize` block. */
export function encodeSuper(sup: { nrEntries: number; sectorSize: number; version?: number }): Buffer {
  checkSectorSize(sup.sectorSize);
  const buf = Buffer.alloc(sup.sectorSize);
  buf.writeBigUInt64LE(WRITE_LOG_MAGIC, 0);
  buf.writeBigUInt64LE(BigInt(sup.version ?? WRITE_LOG_VERSION), 8);
  buf.writeBigUInt64LE(BigInt(sup.nrEntries), 16);
  buf.writeUInt32LE(sup.sectorSize, 24);
  return buf;
}

/** An entry's metadata block (header, mark text for MARK entries, zeros), one `sectorSize` block. */
export function encodeEntryBlock(entry: LogEntryInput, sectorSize: number): Buffer {
  checkSectorSize(sectorSize);
  const buf = Buffer.alloc(sectorSize);
  const mark = entry.mark !== undefined ? markBytes(entry.mark, sectorSize) : undefined;
  buf.writeBigUInt64LE(BigInt(entry.sector), 0);
  buf.writeBigUInt64LE(BigInt(entry.nrSectors), 8);
  buf.writeBigUInt64LE(BigInt(entry.flags), 16);
  buf.writeBigUInt64LE(BigInt(entry.dataLen ?? mark?.length ?? 0), 24);
  // The kernel copies private data into the metadata block only for MARK entries.
  if (mark && entry.flags & LOG_MARK_FLAG) mark.copy(buf, LOG_ENTRY_SIZE);
  return buf;
}

/** An entry as it appears in the log: metadata block followed by its data blocks, if any. */
export function encodeEntry(entry: LogEntryInput, sectorSize: number): Buffer {
  const block = encodeEntryBlock(entry, sectorSize);
  if (!entryHasData(entry)) return block;
  const bytes = entry.nrSectors * sectorSize;
  if (!entry.data || entry.data.length !== bytes) {
    throw new LogFormatError(
      `entry at sector ${entry.sector}: expected ${bytes} bytes of data, got ${entry.data?.length ?? 0}`,
    );
  }
  return Buffer.concat([block, entry.data]);
}

/** A whole log: super block (nr_entries defaults to the number of entries) then the entries. */
export function encodeLog(entries: readonly LogEntryInput[], sectorSize: number, nrEntries = entries.length): Buffer {
  return Buffer.concat([encodeSuper({ nrEntries, sectorSize }), ...entries.map((e) => encodeEntry(e, sectorSize))]);
}

// ---- decoding ----

function u64(buf: Buffer, offset: number, what: string): number {
  const v = buf.readBigUInt64LE(offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new LogFormatError(`${what} ${v} is too large`);
  return Number(v);
}

/**
 * Decode the super block from at least its first 32 bytes; throws LogFormatError with the
 * replay tool's messages ("Magic doesn't match", "Version mismatch, wanted 1, have N").
 */
export function decodeSuper(buf: Buffer): LogSuper {
  if (buf.length < LOG_SUPER_SIZE) throw new LogFormatError("Error reading super: short read");
  if (buf.readBigUInt64LE(0) !== WRITE_LOG_MAGIC) throw new LogFormatError("Magic doesn't match");
  const version = buf.readBigUInt64LE(8);
  if (version !== BigInt(WRITE_LOG_VERSION)) {
    throw new LogFormatError(`Version mismatch, wanted ${WRITE_LOG_VERSION}, have ${BigInt.asIntN(32, version)}`);
  }
  const sectorSize = buf.readUInt32LE(24);
  checkSectorSize(sectorSize);
  return { version: WRITE_LOG_VERSION, nrEntries: u64(buf, 16, "nr_entries"), sectorSize };
}

/** Decode an entry's metadata block (at least 32 bytes; the whole block to see a mark's text). */
export function decodeEntryBlock(block: Buffer): LogEntryHeader {
  if (block.length < LOG_ENTRY_SIZE) throw new LogFormatError("Error reading entry: short read");
  const header: LogEntryHeader = {
    sector: u64(block, 0, "entry sector"),
    nrSectors: u64(block, 8, "entry nr_sectors"),
    flags: u64(block, 16, "entry flags"),
    dataLen: u64(block, 24, "entry data_len"),
  };
  if (header.flags & LOG_MARK_FLAG) {
    // The replay tool compares the text up to its NUL (strcmp); data_len bounds it as well.
    const text = block.subarray(
      LOG_ENTRY_SIZE,
      LOG_ENTRY_SIZE + Math.min(header.dataLen, block.length - LOG_ENTRY_SIZE),
    );
    const nul = text.indexOf(0);
    header.mark = Buffer.from(nul >= 0 ? text.subarray(0, nul) : text);
  }
  return header;
}

/** The mark text of an entry as a string (UTF-8), or undefined for non-MARK entries. */
export function markName(entry: { mark?: Buffer }): string | undefined {
  return entry.mark?.toString("utf8");
}

const FLAG_NAMES: readonly [number, string][] = [
  [LOG_FLUSH_FLAG, "FLUSH"],
  [LOG_FUA_FLAG, "FUA"],
  [LOG_DISCARD_FLAG, "DISCARD"],
  [LOG_MARK_FLAG, "MARK"],
  [LOG_METADATA_FLAG, "METADATA"],
];

/** The replay tool's entry_flags_to_str: `FLUSH|FUA`, `UNKNOWN.<n>` for unknown bits, `NONE`. */
export function flagsToString(flags: number): string {
  const parts: string[] = [];
  let rest = flags;
  for (const [bit, name] of FLAG_NAMES) {
    if (rest & bit) {
      parts.push(name);
      rest -= bit;
    }
  }
  if (rest) parts.push(`UNKNOWN.0x${rest.toString(16)}`);
  return parts.length ? parts.join("|") : "NONE";
}

export interface LogDecoderOptions {
  /** Decode this many entries instead of the super block's nr_entries (e.g. a stale super). */
  nrEntries?: number;
  /** Keep each entry's data (default true); false skips over it. */
  keepData?: boolean;
}

/**
 * Incremental decoder: push the log's bytes in any chunking, get entries back as soon as they are
 * complete. Stops after nr_entries entries (later bytes are ignored, as the replay tool does).
 */
export class LogDecoder {
  super: LogSuper | null = null;
  /** Entries decoded so far. */
  decoded = 0;
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  /** Absolute log offset of the first buffered byte. */
  private offset = 0;
  private header: (LogEntryHeader & { offset: number }) | null = null;
  private limit = 0;

  constructor(private readonly options: LogDecoderOptions = {}) {}

  /** True once nr_entries entries have been decoded. */
  get done(): boolean {
    return this.super !== null && this.decoded >= this.limit;
  }

  push(chunk: Buffer): LogEntry[] {
    const out: LogEntry[] = [];
    if (this.done) return out;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    for (;;) {
      if (!this.super) {
        if (this.buffered < LOG_SUPER_SIZE) break;
        const sup = decodeSuper(this.peek(LOG_SUPER_SIZE));
        if (this.buffered < sup.sectorSize) break;
        this.take(sup.sectorSize);
        this.super = sup;
        this.limit = this.options.nrEntries ?? sup.nrEntries;
        continue;
      }
      if (this.decoded >= this.limit) break;
      const ss = this.super.sectorSize;
      if (!this.header) {
        if (this.buffered < ss) break;
        const offset = this.offset;
        this.header = { ...decodeEntryBlock(this.take(ss)), offset };
      }
      const need = entryHasData(this.header) ? this.header.nrSectors * ss : 0;
      if (this.buffered < need) break;
      const { offset, ...header } = this.header;
      const entry: LogEntry = { ...header, index: this.decoded, offset };
      if (need > 0) {
        const data = this.take(need);
        if (this.options.keepData !== false) entry.data = data;
      }
      this.header = null;
      this.decoded++;
      out.push(entry);
    }
    if (this.done) {
      this.chunks.length = 0;
      this.buffered = 0;
    }
    return out;
  }

  /** The input ended: throws if the super block or an entry it counts is missing or cut short. */
  end(): void {
    if (!this.super) throw new LogFormatError("Error reading super: short read");
    if (this.decoded < this.limit) {
      throw new LogFormatError(
        `log ends inside entry ${this.decoded} of ${this.limit} (${this.header ? "reading data" : "reading entry"})`,
      );
    }
  }

  private peek(n: number): Buffer {
    this.coalesce(n);
    return this.chunks[0]!.subarray(0, n);
  }

  private take(n: number): Buffer {
    this.coalesce(n);
    const first = this.chunks[0]!;
    const out = Buffer.from(first.subarray(0, n));
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.buffered -= n;
    this.offset += n;
    return out;
  }

  /** Make the first chunk at least `n` bytes long. */
  private coalesce(n: number): void {
    if (this.chunks[0]!.length >= n) return;
    let len = 0;
    let k = 0;
    while (len < n) len += this.chunks[k++]!.length;
    const merged = Buffer.concat(this.chunks.slice(0, k), len);
    this.chunks.splice(0, k, merged);
  }
}

/** Decode a whole log held in memory. */
export function decodeLog(buf: Buffer, options: LogDecoderOptions = {}): { super: LogSuper; entries: LogEntry[] } {
  const dec = new LogDecoder(options);
  const entries = dec.push(buf);
  dec.end();
  return { super: dec.super!, entries };
}
