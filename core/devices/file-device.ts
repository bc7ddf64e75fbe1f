/**
 * FileDevice: a regular file used as a block device (what dm tables call a path argument).
 * Discard punches holes; write-zeroes punches or, with NOUNMAP, zeroes in place (ZERO_RANGE).
 */
import fs from "node:fs";
import path from "node:path";
import { SECTOR_SIZE } from "../bio.js";
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocateAsync } from "../sys/file.js";
import type { OpenOptions } from "./block-device.js";
import { FdDevice, initFromOptions } from "./fd-device.js";

const PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
const ZERO = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;

export function openFd(file: string, flags: number): Promise<number> {
  return new Promise((resolve, reject) => fs.open(file, flags, (err, fd) => (err ? reject(err) : resolve(fd))));
}

export function fstat(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st))));
}

/** open(2) flags for a backing device opened per `opts`. */
export function openFlags(opts: OpenOptions): number {
  const { O_RDONLY, O_RDWR, O_DIRECT } = fs.constants;
  return (opts.mode === "rw" ? O_RDWR : O_RDONLY) | (opts.direct ? O_DIRECT : 0);
}

/** Open (with `extraFlags` added), turning O_DIRECT's EINVAL (tmpfs and friends) into an error that says so. */
export async function openBacking(file: string, opts: OpenOptions, extraFlags = 0): Promise<number> {
  try {
    return await openFd(file, openFlags(opts) | extraFlags);
  } catch (err) {
    if (opts.direct && (err as NodeJS.ErrnoException).code === "EINVAL") {
      throw Object.assign(
        new Error(
          `${file}: the backing store does not support O_DIRECT (open failed with EINVAL); open it without direct I/O`,
        ),
        { code: "EINVAL", cause: err },
      );
    }
    throw err;
  }
}

export class FileDevice extends FdDevice {
  static async open(file: string, opts: OpenOptions): Promise<FileDevice> {
    const abs = path.resolve(file);
    const fd = await openBacking(abs, opts);
    try {
      const st = await fstat(fd);
      if (!st.isFile()) {
        throw Object.assign(new Error(`${abs}: not a regular file`), { code: "EINVAL" });
      }
      return new FileDevice(fd, abs, opts, Math.floor(st.size / SECTOR_SIZE));
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  private constructor(fd: number, abs: string, opts: OpenOptions, sizeSectors: number) {
    super({
      fd,
      path: abs,
      tableName: abs,
      displayName: abs,
      ...initFromOptions(opts),
      sizeSectors,
      logicalBlockSize: SECTOR_SIZE,
      supportsDiscard: true,
      supportsWriteZeroes: true,
    });
  }

  async refreshSize(): Promise<number> {
    this.size = Math.floor((await fstat(this.fd)).size / SECTOR_SIZE);
    return this.size;
  }

  protected discardRange(offset: number, length: number): Promise<void> {
    return fallocateAsync(this.fd, PUNCH, offset, length);
  }

  protected async zeroRange(offset: number, length: number, noUnmap: boolean): Promise<void> {
    try {
      await fallocateAsync(this.fd, noUnmap ? ZERO : PUNCH, offset, length);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EOPNOTSUPP") throw err;
      await this.writeZeroBuffers(offset, length);
    }
  }
}
