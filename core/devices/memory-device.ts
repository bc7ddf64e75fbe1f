/**
 * MemoryDevice: a sparse RAM disk. Storage is a map of 4 KiB pages allocated on first write;
 * missing pages read as zeros, and discard/write-zeroes give pages back. Bios complete
 * synchronously inside `submit`, which is exactly what the BlockDevice contract warns callers of.
 */
import { type Bio, type BioStatus, SECTOR_SIZE } from "../bio.js";
import type { BlockDevice } from "./block-device.js";

const PAGE_SIZE = 4096;

export interface MemoryDeviceOptions {
  /** How tables print it; default `mem:<n>` with n unique per process. */
  tableName?: string;
  displayName?: string;
  readOnly?: boolean;
  logicalBlockSize?: number;
}

let instances = 0;

export class MemoryDevice implements BlockDevice {
  readonly tableName: string;
  readonly displayName: string;
  readonly readOnly: boolean;
  readonly logicalBlockSize: number;
  readonly supportsDiscard = true;
  readonly supportsWriteZeroes = true;
  private pages = new Map<number, Buffer>();
  private size: number;
  private closed = false;

  constructor(sizeSectors: number, opts: MemoryDeviceOptions = {}) {
    this.size = sizeSectors;
    this.tableName = opts.tableName ?? `mem:${instances++}`;
    this.displayName = opts.displayName ?? this.tableName;
    this.readOnly = opts.readOnly ?? false;
    this.logicalBlockSize = opts.logicalBlockSize ?? SECTOR_SIZE;
  }

  get sizeSectors(): number {
    return this.size;
  }

  /** Pages currently holding data (for tests of discard and sparseness). */
  get allocatedPages(): number {
    return this.pages.size;
  }

  /** Grow or shrink; shrinking forgets the data past the new end. */
  resize(sizeSectors: number): void {
    const end = sizeSectors * SECTOR_SIZE;
    if (end < this.size * SECTOR_SIZE) this.zero(end, this.size * SECTOR_SIZE - end);
    this.size = sizeSectors;
  }

  submit(bio: Bio): void {
    bio.complete(this.execute(bio));
  }

  private execute(bio: Bio): BioStatus {
    if (this.closed) return "ENXIO";
    if (bio.op === "flush") return "ok";
    if (this.readOnly && bio.op !== "read") return "EPERM";
    if (bio.sector < 0 || bio.sectors < 0 || bio.sector + bio.sectors > this.size) return "EIO";
    const pos = bio.sector * SECTOR_SIZE;
    // Not bio.bytes: `sectors << 9` overflows int32 (goes negative) from 2 GiB up.
    const bytes = bio.sectors * SECTOR_SIZE;
    switch (bio.op) {
      case "read":
      case "write":
        if (bio.data.length < bytes) return "EINVAL";
        this.copy(bio.op, pos, bio.data.subarray(0, bytes));
        return "ok";
      case "discard":
      case "write-zeroes":
        this.zero(pos, bytes);
        return "ok";
    }
  }

  /** Walk the pages overlapping [pos, pos + buf.length), copying in the direction of `op`. */
  private copy(op: "read" | "write", pos: number, buf: Buffer): void {
    for (let done = 0; done < buf.length;) {
      const index = Math.floor((pos + done) / PAGE_SIZE);
      const inPage = (pos + done) % PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, buf.length - done);
      let page = this.pages.get(index);
      if (op === "read") {
        if (page) page.copy(buf, done, inPage, inPage + n);
        else buf.fill(0, done, done + n);
      } else {
        if (!page) this.pages.set(index, (page = Buffer.alloc(PAGE_SIZE)));
        buf.copy(page, inPage, done, done + n);
      }
      done += n;
    }
  }

  /** Zero a range: whole pages are dropped, partial ones cleared in place. */
  private zero(pos: number, length: number): void {
    const end = pos + length;
    const first = Math.ceil(pos / PAGE_SIZE);
    const last = Math.floor(end / PAGE_SIZE);
    if (first > last) return this.clear(pos, end);
    this.clear(pos, first * PAGE_SIZE);
    this.clear(last * PAGE_SIZE, end);
    // Discarding a huge, mostly empty range must not walk every page number in it.
    if (last - first > this.pages.size) {
      for (const index of this.pages.keys()) if (index >= first && index < last) this.pages.delete(index);
    } else {
      for (let index = first; index < last; index++) this.pages.delete(index);
    }
  }

  /** Clear [from, to) within a single page. */
  private clear(from: number, to: number): void {
    if (from >= to) return;
    const index = Math.floor(from / PAGE_SIZE);
    this.pages.get(index)?.fill(0, from - index * PAGE_SIZE, to - index * PAGE_SIZE);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.pages.clear();
  }
}
