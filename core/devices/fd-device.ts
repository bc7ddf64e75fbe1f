/**
 * FdDevice: the part of file and kernel-block-device backends that only needs a file descriptor:
 * positional read/write, flush ordering (PREFLUSH/FUA), bounds and permission checks, O_DIRECT
 * bounce buffering. Subclasses supply discard and write-zeroes (fallocate vs. block ioctls) and
 * how the size is (re)read.
 *
 * Uses the callback fd API of node:fs rather than FileHandle promises: one libuv request per
 * syscall, no promise/FileHandle allocation per bio.
 */
import fs from "node:fs";
import { type Bio, BioFlags, type BioStatus, SECTOR_SIZE } from "../bio.js";
import { RWF_DSYNC, bufferAddress, pwriteFlagsAsync } from "../sys/file.js";
import type { BlockDevice, OpenOptions } from "./block-device.js";
import { inlineReadsSupported, readCached } from "./inline-io.js";
import { PLUG_WRITE_MAX, WritePlug } from "./write-plug.js";

/** Memory alignment used for O_DIRECT: covers every logical block size up to 4 KiB. */
export const DIRECT_ALIGN = 4096;

/** A Buffer of `bytes` bytes whose first byte is `align`-aligned in memory (not zeroed). */
export function alignedBuffer(bytes: number, align = DIRECT_ALIGN): Buffer {
  // allocUnsafeSlow: never a slice of Node's shared pool, so the slack really belongs to us.
  const raw = Buffer.allocUnsafeSlow(bytes + align);
  const skip = (align - Number(bufferAddress(raw) % BigInt(align))) % align;
  return raw.subarray(skip, skip + bytes);
}

function isAligned(buf: Buffer, align = DIRECT_ALIGN): boolean {
  return bufferAddress(buf) % BigInt(align) === 0n;
}

type Done = (err: NodeJS.ErrnoException | null) => void;

const EOPNOTSUPP_ERRNO = 95;
/**
 * Larger reads go to the pool even when cached: copying them is real work, and on the pool it
 * runs beside the event loop (measured slower inline at 1 MiB: bench/results.md).
 */
const INLINE_READ_MAX = 64 * 1024;

const PASSTHROUGH = new Set<BioStatus>(["EIO", "EOPNOTSUPP", "ENOSPC", "EAGAIN", "EPERM", "EINVAL", "ENXIO"]);

/** Map a syscall error to the bio status a submitter sees. */
export function errorToStatus(err: unknown): BioStatus {
  const code = (err as NodeJS.ErrnoException | null)?.code;
  switch (code) {
    case "ENOTSUP":
      return "EOPNOTSUPP";
    case "EDQUOT":
      return "ENOSPC";
    case "EROFS":
    case "EACCES":
    case "EBADF":
      return "EPERM";
    default:
      return code && PASSTHROUGH.has(code as BioStatus) ? (code as BioStatus) : "EIO";
  }
}

/** Read exactly `buf.length` bytes at `pos`; bytes past end-of-file read as zeros. */
export function readFully(fd: number, buf: Buffer, pos: number, done: Done): void {
  const step = (off: number): void => {
    fs.read(fd, buf, off, buf.length - off, pos + off, (err, n) => {
      if (err) return done(err);
      if (n === 0) {
        buf.fill(0, off);
        return done(null);
      }
      if (off + n < buf.length) return step(off + n);
      done(null);
    });
  };
  if (buf.length === 0) return done(null);
  step(0);
}

type Wrote = (err: NodeJS.ErrnoException | null, written: number) => void;

/** Write `length` bytes by calling `writeFrom(offset, cb)` until all are written (short writes loop). */
function writeLoop(length: number, writeFrom: (offset: number, cb: Wrote) => void, done: Done): void {
  const step = (off: number): void => {
    writeFrom(off, (err, n) => {
      if (err) return done(err);
      // A 0-byte write would loop forever; the kernel only does it on a broken device.
      if (n === 0) return done(Object.assign(new Error("write made no progress"), { code: "EIO" }));
      if (off + n < length) return step(off + n);
      done(null);
    });
  };
  if (length === 0) return done(null);
  step(0);
}

/** Write all of `buf` at `pos`, looping over short writes. */
export function writeFully(fd: number, buf: Buffer, pos: number, done: Done): void {
  writeLoop(buf.length, (off, cb) => fs.write(fd, buf, off, buf.length - off, pos + off, cb), done);
}

/** pwritev all of `bufs`, back to back from `pos`, looping over short writes. */
export function writevFully(fd: number, bufs: Buffer[], pos: number, done: Done): void {
  const length = bufs.reduce((n, b) => n + b.length, 0);
  writeLoop(length, (off, cb) => fs.writev(fd, buffersFrom(bufs, off), pos + off, cb), done);
}

/** `bufs` without their first `skip` bytes. */
function buffersFrom(bufs: Buffer[], skip: number): Buffer[] {
  let i = 0;
  while (i < bufs.length && skip >= bufs[i]!.length) skip -= bufs[i++]!.length;
  return i < bufs.length && skip > 0 ? [bufs[i]!.subarray(skip), ...bufs.slice(i + 1)] : bufs.slice(i);
}

/** writeFully with every write durable on return (pwritev2 RWF_DSYNC). */
function writeFullyDsync(fd: number, buf: Buffer, pos: number, done: Done): void {
  writeLoop(
    buf.length,
    (off, cb) =>
      void pwriteFlagsAsync(fd, buf.subarray(off), pos + off, RWF_DSYNC).then(
        (n) => cb(null, n),
        (err: NodeJS.ErrnoException) => cb(err, 0),
      ),
    done,
  );
}

/** Errors meaning "no RWF_DSYNC writes here" rather than a failed write. */
const DSYNC_UNSUPPORTED = new Set(["ENOSYS", "EOPNOTSUPP", "ENOTSUP"]);

export interface FdDeviceInit {
  fd: number;
  /** Path the fd was opened from: a read-only device reopens it read-write on upgrade. */
  path: string;
  tableName: string;
  displayName: string;
  readOnly: boolean;
  direct: boolean;
  /** Read page-cache hits inline (IoOptions.inlineReads; ignored with `direct`). */
  inlineReads: boolean;
  /** Merge small writes per event-loop turn (IoOptions.writePlug; ignored with `direct`). */
  writePlug: boolean;
  sizeSectors: number;
  logicalBlockSize: number;
  supportsDiscard: boolean;
  supportsWriteZeroes: boolean;
  devno?: { major: number; minor: number };
}

/** The FdDeviceInit fields that `opts` decides, with the IoOptions defaults. */
export function initFromOptions(
  opts: OpenOptions,
): Pick<FdDeviceInit, "readOnly" | "direct" | "inlineReads" | "writePlug"> {
  return {
    readOnly: opts.mode !== "rw",
    direct: opts.direct ?? false,
    inlineReads: opts.inlineReads ?? inlineReadsSupported(),
    writePlug: opts.writePlug ?? true,
  };
}

export abstract class FdDevice implements BlockDevice {
  readonly tableName: string;
  readonly displayName: string;
  readOnly: boolean;
  readonly direct: boolean;
  readonly logicalBlockSize: number;
  readonly supportsDiscard: boolean;
  readonly supportsWriteZeroes: boolean;
  readonly devno?: { major: number; minor: number };
  protected fd: number;
  protected size: number;
  private readonly path: string;
  /** fds replaced by an upgrade: bios already issued on them may still run; closed with the device. */
  private readonly retiredFds: number[] = [];
  /** Page-cache hits are read in the calling thread (buffered fds only; see inline-io.ts). */
  private inlineReads: boolean;
  /** FUA writes as pwritev2(RWF_DSYNC) (Linux x86_64, where the koffi bindings work); else write + fdatasync. */
  private dsyncWrites = process.platform === "linux" && process.arch === "x64";
  /** Small buffered writes of one event-loop turn, merged where they touch (write-plug.ts). */
  private readonly plug: WritePlug | null;

  protected constructor(init: FdDeviceInit) {
    this.fd = init.fd;
    this.path = init.path;
    this.tableName = init.tableName;
    this.displayName = init.displayName;
    this.readOnly = init.readOnly;
    this.direct = init.direct;
    this.size = init.sizeSectors;
    this.logicalBlockSize = init.logicalBlockSize;
    this.supportsDiscard = init.supportsDiscard;
    this.supportsWriteZeroes = init.supportsWriteZeroes;
    if (init.devno) this.devno = init.devno;
    // An O_DIRECT read always waits for the device: never inline.
    this.inlineReads = !init.direct && init.inlineReads;
    this.plug = !init.direct && init.writePlug ? new WritePlug(writeFully, writevFully) : null;
  }

  /** Held writes issued as one pool job each or merged (tests and statistics). */
  get plugStats(): { jobs: number; merged: number } | null {
    return this.plug ? { jobs: this.plug.jobs, merged: this.plug.merged } : null;
  }

  get sizeSectors(): number {
    return this.size;
  }

  /** Re-read the size from the backing store (after it was resized); returns sectors. */
  abstract refreshSize(): Promise<number>;
  /** Deallocate a byte range (contents become zeros or undefined, as discard allows). */
  protected abstract discardRange(offset: number, length: number): Promise<void>;
  /** Zero a byte range; `noUnmap` (BioFlags.NOUNMAP) forbids deallocating it. */
  protected abstract zeroRange(offset: number, length: number, noUnmap: boolean): Promise<void>;

  submit(bio: Bio): void {
    const status = this.check(bio);
    if (status !== "ok") return bio.complete(status);
    const pos = bio.sector * SECTOR_SIZE;
    // Not bio.bytes: `sectors << 9` overflows int32 (goes negative) from 2 GiB up.
    const bytes = bio.sectors * SECTOR_SIZE;
    switch (bio.op) {
      case "read":
        return this.read(bio, pos, bytes);
      case "flush":
        return fs.fdatasync(this.fd, (err) => bio.complete(err ? errorToStatus(err) : "ok"));
      case "write":
        // FUA: the write itself is made durable (RWF_DSYNC) instead of a write then an fdatasync.
        if (bio.isFua && this.dsyncWrites)
          return this.ordered(bio, (done) => this.write(bio, pos, bytes, done, true), true);
        return this.ordered(bio, (done) => this.write(bio, pos, bytes, done));
      case "discard":
        return this.ordered(bio, (done) => settle(this.discardRange(pos, bytes), done));
      case "write-zeroes":
        return this.ordered(bio, (done) =>
          settle(this.zeroRange(pos, bytes, (bio.flags & BioFlags.NOUNMAP) !== 0), done),
        );
    }
  }

  private check(bio: Bio): BioStatus {
    if (this.fd < 0) return "ENXIO";
    if (bio.op === "flush") return "ok";
    if (!Number.isSafeInteger(bio.sector) || !Number.isSafeInteger(bio.sectors) || bio.sector < 0 || bio.sectors < 0) {
      return "EINVAL";
    }
    if (this.readOnly && bio.op !== "read") return "EPERM";
    if (bio.sector + bio.sectors > this.size) return "EIO";
    if ((bio.op === "read" || bio.op === "write") && bio.data.length < bio.sectors * SECTOR_SIZE) return "EINVAL";
    if (bio.op === "discard" && !this.supportsDiscard) return "EOPNOTSUPP";
    if (bio.op === "write-zeroes" && !this.supportsWriteZeroes) return "EOPNOTSUPP";
    return "ok";
  }

  /**
   * Run a modifying op between the PREFLUSH and FUA cache flushes it asks for (`durable`: the op
   * itself already made its data durable, so FUA needs no flush after it).
   */
  private ordered(bio: Bio, op: (done: Done) => void, durable = false): void {
    const fd = this.fd;
    const finish: Done = (err) => {
      if (err) return bio.complete(errorToStatus(err));
      if (!bio.isFua || durable) return bio.complete("ok");
      fs.fdatasync(fd, (e) => bio.complete(e ? errorToStatus(e) : "ok"));
    };
    if (!bio.isPreflush) return op(finish);
    fs.fdatasync(fd, (err) => (err ? bio.complete(errorToStatus(err)) : op(finish)));
  }

  private read(bio: Bio, pos: number, bytes: number): void {
    const target = bio.data.subarray(0, bytes);
    // Zero-copy: the submitter sends this range from the file itself. Not for O_DIRECT
    // descriptors, whose reads bypass the page cache that sendfile would go through.
    if (bio.fileRanges && !this.direct && bio.fileRanges.take(target, this.fd, pos)) return bio.complete("ok");
    if (this.inlineReads && bytes <= INLINE_READ_MAX) {
      let n: number;
      try {
        n = readCached(this.fd, target, pos);
      } catch {
        n = -EOPNOTSUPP_ERRNO; // the binding itself failed (no preadv2 in this libc): stop trying
      }
      if (n === bytes) return bio.complete("ok");
      if (n > 0) return this.readRest(bio, target.subarray(n), pos + n);
      if (n === -EOPNOTSUPP_ERRNO) this.inlineReads = false; // this file system has no RWF_NOWAIT reads
      // Other errors: the pool repeats the read and reports them.
    }
    this.readRest(bio, target, pos);
  }

  /** Through the pool: whatever was not in the page cache (or all of it). */
  private readRest(bio: Bio, target: Buffer, pos: number): void {
    const buf = this.direct && !isAligned(target) ? alignedBuffer(target.length) : target;
    readFully(this.fd, buf, pos, (err) => {
      if (err) return bio.complete(errorToStatus(err));
      if (buf !== target) buf.copy(target);
      bio.complete("ok");
    });
  }

  private write(bio: Bio, pos: number, bytes: number, done: Done, dsync = false): void {
    let buf = bio.data.subarray(0, bytes);
    if (this.direct && !isAligned(buf)) {
      const bounce = alignedBuffer(buf.length);
      buf.copy(bounce);
      buf = bounce;
    }
    if (!dsync) {
      if (this.plug && bytes <= PLUG_WRITE_MAX) return this.plug.add(this.fd, buf, pos, done);
      return writeFully(this.fd, buf, pos, done);
    }
    const fd = this.fd;
    writeFullyDsync(fd, buf, pos, (err) => {
      if (!err || !DSYNC_UNSUPPORTED.has(err.code ?? "")) return done(err);
      // No pwritev2 / RWF_DSYNC here (old kernel or libc): write, then fdatasync, from now on.
      this.dsyncWrites = false;
      writeFully(fd, buf, pos, (e) => (e ? done(e) : fs.fdatasync(fd, done)));
    });
  }

  /** Write-zeroes fallback for stores that cannot zero natively: write a reused zero buffer. */
  protected writeZeroBuffers(offset: number, length: number): Promise<void> {
    const zeros = zeroBuffer();
    return new Promise((resolve, reject) => {
      const step = (done: number): void => {
        if (done >= length) return resolve();
        const n = Math.min(zeros.length, length - done);
        writeFully(this.fd, zeros.subarray(0, n), offset + done, (err) => (err ? reject(err) : step(done + n)));
      };
      step(0);
    });
  }

  /**
   * Become writable in place (a table asked for read-write after another opened the device
   * read-only). The object stays the same, so everything keyed by device identity still matches.
   */
  async upgradeToReadWrite(): Promise<void> {
    if (!this.readOnly) return;
    const flags = fs.constants.O_RDWR | (this.direct ? fs.constants.O_DIRECT : 0);
    const fd = await new Promise<number>((resolve, reject) =>
      fs.open(this.path, flags, (err, f) => (err ? reject(err) : resolve(f))),
    );
    this.retiredFds.push(this.fd);
    this.fd = fd;
    this.readOnly = false;
  }

  async close(): Promise<void> {
    // Nothing may reach a descriptor number after it was closed (and perhaps reused).
    this.plug?.unplug();
    const fds = [this.fd, ...this.retiredFds.splice(0)].filter((fd) => fd >= 0);
    this.fd = -1;
    for (const fd of fds) {
      await new Promise<void>((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
    }
  }

  toString(): string {
    return `${this.constructor.name}(${this.displayName})`;
  }
}

function settle(p: Promise<void>, done: Done): void {
  p.then(
    () => done(null),
    (err: NodeJS.ErrnoException) => done(err),
  );
}

let zeros: Buffer | null = null;
/** 1 MiB of zeros, aligned so O_DIRECT writes can use it as is. Never written to. */
function zeroBuffer(): Buffer {
  zeros ??= alignedBuffer(1 << 20).fill(0);
  return zeros;
}
