/**
 * COW image inspection: parse a persistent snapshot's COW device (a Buffer or a BlockDevice) the
 * way the kernel's loader would, and list the header, every metadata area and every exception
 * record, plus anything suspicious. `describeCowImage` renders it as text (for `udmsetup`).
 *
 * Unlike the loader this does not stop at bad content (only an I/O error rejects): problems are
 * collected in `problems`, and the records of an invalidated snapshot (valid=0, which the kernel
 * does not read) are still listed.
 */
import { Bio, SECTOR_SIZE, submitAndWait } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import {
  type DiskHeader,
  SNAP_MAGIC,
  SNAPSHOT_DISK_VERSION,
  areaLocation,
  chunkBytes,
  chunkSizeError,
  decodeHeader,
  encodeHeader,
  exceptionsPerArea,
  isMetadataChunk,
  readRecord,
  skipMetadata,
  writeRecord,
} from "./cow-format.js";

export interface CowImageRecord {
  area: number;
  slot: number;
  oldChunk: number;
  newChunk: number;
}

export interface CowImageArea {
  index: number;
  /** Chunk number of the area on the COW device. */
  chunk: number;
  records: number;
  full: boolean;
}

export interface CowImage {
  sizeSectors: number;
  header: DiskHeader;
  /** new: magic 0 (a fresh device); corrupt: unknown magic or version, or an unusable chunk size. */
  state: "new" | "valid" | "invalid" | "corrupt";
  /** Chunk size used to parse the areas (the header's), 0 when none could be used. */
  chunkSize: number;
  exceptionsPerArea: number;
  areas: CowImageArea[];
  records: CowImageRecord[];
  /** What the kernel's loader would end up with (after skip_metadata). */
  nextFree: number;
  currentArea: number;
  currentCommitted: number;
  /** The snapshot status numbers a loaded store would report, in sectors. */
  usage: { total: number; allocated: number; metadata: number };
  problems: string[];
}

type Reader = (sector: number, sectors: number) => Promise<Buffer | null>;

/** Parse a COW image. Reads past the end of the image are reported as problems. */
export async function readCowImage(source: Buffer | BlockDevice): Promise<CowImage> {
  const sizeSectors = Buffer.isBuffer(source) ? Math.floor(source.length / SECTOR_SIZE) : source.sizeSectors;
  const read = Buffer.isBuffer(source) ? bufferReader(source) : deviceReader(source);
  const problems: string[] = [];
  const first = await read(0, Math.max(1, Buffer.isBuffer(source) ? 1 : source.logicalBlockSize / SECTOR_SIZE));
  const header = first ? decodeHeader(first) : { magic: 0, valid: 0, version: 0, chunkSize: 0 };
  const img: CowImage = {
    sizeSectors,
    header,
    state: "corrupt",
    chunkSize: 0,
    exceptionsPerArea: 0,
    areas: [],
    records: [],
    nextFree: 2,
    currentArea: 0,
    currentCommitted: 0,
    usage: { total: sizeSectors, allocated: 0, metadata: 0 },
    problems,
  };
  if (!first) {
    problems.push("image is smaller than one sector");
    return img;
  }
  if (header.magic === 0) {
    img.state = "new";
    return img;
  }
  if (header.magic !== SNAP_MAGIC) {
    problems.push(`bad magic 0x${hex(header.magic)}: Invalid or corrupt snapshot`);
    return img;
  }
  if (header.version !== SNAPSHOT_DISK_VERSION) {
    problems.push(`unable to handle snapshot disk version ${header.version}`);
    return img;
  }
  const csError = chunkSizeError(header.chunkSize, [SECTOR_SIZE]);
  if (csError) {
    problems.push(`invalid on-disk chunk size ${header.chunkSize}: ${csError}.`);
    return img;
  }
  img.state = header.valid !== 0 ? "valid" : "invalid";
  if (header.valid === 0) problems.push("snapshot is marked invalid (the kernel does not load its exceptions)");
  img.chunkSize = header.chunkSize;
  img.exceptionsPerArea = exceptionsPerArea(header.chunkSize);
  await readAreas(img, read);
  const cs = img.chunkSize;
  img.usage = { total: sizeSectors, allocated: img.nextFree * cs, metadata: (img.currentArea + 2) * cs };
  return img;
}

/** The loader's walk: areas in order until one is not full. */
async function readAreas(img: CowImage, read: Reader): Promise<void> {
  const { chunkSize: cs, exceptionsPerArea: epa, problems } = img;
  const chunks = Math.floor(img.sizeSectors / cs);
  const olds = new Set<number>();
  const news = new Set<number>();
  let nextFree = 2;
  for (let index = 0; ; index++) {
    const chunk = areaLocation(epa, index);
    const buf = await read(chunk * cs, cs);
    if (!buf) {
      problems.push(`area ${index} (chunk ${chunk}) lies beyond the end of the image: the kernel's load would fail`);
      break;
    }
    const area: CowImageArea = { index, chunk, records: 0, full: true };
    img.areas.push(area);
    for (let slot = 0; slot < epa; slot++) {
      const { oldChunk, newChunk } = readRecord(buf, slot);
      if (newChunk === 0) {
        area.full = false;
        break;
      }
      area.records++;
      img.records.push({ area: index, slot, oldChunk, newChunk });
      nextFree = Math.max(nextFree, newChunk + 1);
      const where = `area ${index} slot ${slot}`;
      if (isMetadataChunk(epa, newChunk)) problems.push(`${where}: new chunk ${newChunk} is a metadata chunk`);
      if (newChunk >= chunks)
        problems.push(`${where}: new chunk ${newChunk} is beyond the end of the device (${chunks} chunks)`);
      if (news.has(newChunk)) problems.push(`${where}: new chunk ${newChunk} is used twice`);
      if (olds.has(oldChunk)) problems.push(`${where}: old chunk ${oldChunk} has two exceptions`);
      olds.add(oldChunk);
      news.add(newChunk);
    }
    if (!area.full) {
      img.currentArea = index;
      img.currentCommitted = area.records;
      break;
    }
  }
  img.nextFree = skipMetadata(epa, nextFree);
}

export interface DescribeOptions {
  /** List at most this many records (default: all). */
  maxRecords?: number;
}

/** A text dump of a parsed image. */
export function describeCowImage(img: CowImage, opts: DescribeOptions = {}): string {
  const h = img.header;
  const lines = [`COW image: ${img.sizeSectors} sectors (${img.sizeSectors * SECTOR_SIZE} bytes)`];
  const magicText = h.magic === SNAP_MAGIC ? ' "SnAp"' : h.magic === 0 ? " (none: new store)" : " (unknown)";
  lines.push(
    `header: magic 0x${hex(h.magic)}${magicText}, valid ${h.valid}, version ${h.version}, chunk size ${h.chunkSize} sectors`,
  );
  lines.push(`state: ${img.state}`);
  if (img.chunkSize > 0) {
    const epa = img.exceptionsPerArea;
    lines.push(
      `layout: ${chunkBytes(img.chunkSize)}-byte chunks, ${epa} exceptions per area, area k at chunk 1 + ${epa + 1}·k`,
    );
    for (const a of img.areas)
      lines.push(`area ${a.index} at chunk ${a.chunk}: ${a.records} record(s)${a.full ? ", full" : ""}`);
    lines.push(`exceptions: ${img.records.length}`);
    const shown = Math.min(img.records.length, opts.maxRecords ?? Infinity);
    if (shown > 0)
      lines.push(
        `  ${"area".padStart(6)} ${"slot".padStart(6)} ${"old_chunk".padStart(16)} ${"new_chunk".padStart(16)}`,
      );
    for (const r of img.records.slice(0, shown)) {
      lines.push(`  ${pad(r.area, 6)} ${pad(r.slot, 6)} ${pad(r.oldChunk, 16)} ${pad(r.newChunk, 16)}`);
    }
    if (shown < img.records.length) lines.push(`  ... ${img.records.length - shown} more`);
    lines.push(
      `next free chunk ${img.nextFree}; current area ${img.currentArea} with ${img.currentCommitted} record(s)`,
    );
    lines.push(`usage: ${img.usage.allocated}/${img.usage.total} ${img.usage.metadata}`);
  }
  lines.push(img.problems.length === 0 ? "problems: none" : `problems (${img.problems.length}):`);
  for (const p of img.problems) lines.push(`  ${p}`);
  return lines.join("\n") + "\n";
}

export interface CowImageSpec {
  /** Chunk size in sectors. */
  chunkSize: number;
  /** Number of exceptions, recorded in this order. */
  exceptions: number;
  /** Origin chunk of the i-th exception (distinct for distinct i). */
  oldChunk: (i: number) => number;
  /** Header valid flag (default true). */
  valid?: boolean;
}

export interface CowImageLayout {
  /** What the store would allocate next. */
  nextFree: number;
  /** Smallest COW device (sectors) that holds every chunk of the image. */
  minSectors: number;
}

/**
 * The metadata of the COW image a fresh persistent store would have written after committing
 * `exceptions` exceptions in order: the header chunk, then every metadata area (plus the zeroed
 * area after a full last one, as the store writes it). COW chunks are handed out the store's way
 * (2, 3, ..., skipping metadata chunks), so exception i maps to the i-th allocated chunk. Data
 * chunks are not produced; their contents are the caller's. Pure: the caller writes the chunks.
 * Used to make large images quickly (tests and benchmarks of loading 10^6 exceptions).
 */
export function* cowImageChunks(spec: CowImageSpec): Generator<{ chunk: number; data: Buffer }, CowImageLayout> {
  const cs = spec.chunkSize;
  const epa = exceptionsPerArea(cs);
  yield { chunk: 0, data: encodeHeader(cs, spec.valid ?? true) };
  let nextFree = 2;
  let area = 0;
  let slot = 0;
  let buf = Buffer.alloc(chunkBytes(cs));
  for (let i = 0; i < spec.exceptions; i++) {
    writeRecord(buf, slot++, spec.oldChunk(i), nextFree);
    nextFree = skipMetadata(epa, nextFree + 1);
    if (slot === epa) {
      yield { chunk: areaLocation(epa, area), data: buf };
      area++;
      slot = 0;
      buf = Buffer.alloc(chunkBytes(cs));
    }
  }
  yield { chunk: areaLocation(epa, area), data: buf };
  const lastChunk = Math.max(nextFree - 1, areaLocation(epa, area));
  return { nextFree, minSectors: (lastChunk + 1) * cs };
}

function bufferReader(image: Buffer): Reader {
  return async (sector, sectors) => {
    const start = sector * SECTOR_SIZE;
    const end = start + sectors * SECTOR_SIZE;
    return end <= image.length ? image.subarray(start, end) : null;
  };
}

function deviceReader(dev: BlockDevice): Reader {
  return async (sector, sectors) => {
    if (sector + sectors > dev.sizeSectors) return null;
    const bio = new Bio("read", sector, sectors, Buffer.alloc(sectors * SECTOR_SIZE), 0, null);
    return (await submitAndWait(dev, bio)).data;
  };
}

function hex(n: number): string {
  return n.toString(16).padStart(8, "0");
}

function pad(n: number, width: number): string {
  return String(n).padStart(width);
}
