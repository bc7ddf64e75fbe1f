/**
 * KernelBlockDevice: a block device node (/dev/loop0, /dev/sdb1, /dev/dm-3) as a backing device.
 * Reads and writes go through the page cache (or O_DIRECT) like a file; size, block size,
 * discard and write-zeroes come from the block-layer ioctls.
 */
import fs from "node:fs";
import path from "node:path";
import { SECTOR_SIZE } from "../bio.js";
import { blkDiscardAsync, blkGetSize64, blkSszGet, blkZeroOutAsync } from "../sys/block.js";
import type { OpenOptions } from "./block-device.js";
import { FdDevice, initFromOptions } from "./fd-device.js";
import { openBacking } from "./file-device.js";

export interface Devno {
  major: number;
  minor: number;
}

/** Split a dev_t the way glibc's gnu_dev_major/gnu_dev_minor do (12-bit major, 20-bit minor). */
export function decodeDevno(rdev: bigint | number): Devno {
  const d = BigInt(rdev);
  const major = ((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn);
  const minor = (d & 0xffn) | ((d >> 12n) & ~0xffn);
  return { major: Number(major), minor: Number(minor) };
}

async function readSysfs(file: string): Promise<string | null> {
  try {
    return await fs.promises.readFile(file, "utf8");
  } catch {
    return null;
  }
}

/** The kernel's name for a block device number ("loop0", "dm-3"), from sysfs; null if unknown. */
export async function kernelDevName({ major, minor }: Devno): Promise<string | null> {
  const uevent = await readSysfs(`/sys/dev/block/${major}:${minor}/uevent`);
  return uevent?.match(/^DEVNAME=(.+)$/m)?.[1] ?? null;
}

/** discard_max_bytes > 0 means the queue discards; partitions keep their queue in the parent. */
async function queueDiscards({ major, minor }: Devno): Promise<boolean> {
  const dir = `/sys/dev/block/${major}:${minor}`;
  const value =
    (await readSysfs(`${dir}/queue/discard_max_bytes`)) ?? (await readSysfs(`${dir}/../queue/discard_max_bytes`));
  // Unknown: let BLKDISCARD itself answer EOPNOTSUPP.
  return value === null || Number(value) > 0;
}

/**
 * Open with O_EXCL: for a block device that is the kernel's exclusive claim (blkdev_open with
 * O_EXCL claims with the open file as holder), which a mount or another claimer's open refuses
 * with EBUSY, and which refuses them while held.
 */
async function openClaimed(node: string, opts: OpenOptions): Promise<number> {
  try {
    return await openBacking(node, opts, fs.constants.O_EXCL);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EBUSY") throw err;
    throw Object.assign(
      new Error(`${node}: device is busy: it is mounted, or another program or table holds it exclusively`),
      { code: "EBUSY", cause: err },
    );
  }
}

export class KernelBlockDevice extends FdDevice {
  static async open(node: string, opts: OpenOptions): Promise<KernelBlockDevice> {
    const abs = path.resolve(node);
    const fd = opts.exclusive ? await openClaimed(abs, opts) : await openBacking(abs, opts);
    try {
      const st = await new Promise<fs.BigIntStats>((resolve, reject) =>
        fs.fstat(fd, { bigint: true }, (err, s) => (err ? reject(err) : resolve(s))),
      );
      if (!st.isBlockDevice()) {
        throw Object.assign(new Error(`${abs}: not a block device`), { code: "ENOTBLK" });
      }
      const devno = decodeDevno(st.rdev);
      const name = (await kernelDevName(devno)) ?? path.basename(fs.realpathSync(abs));
      return new KernelBlockDevice(fd, abs, name, devno, opts, await queueDiscards(devno));
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  private constructor(fd: number, node: string, name: string, devno: Devno, opts: OpenOptions, discards: boolean) {
    super({
      fd,
      path: node,
      tableName: `${devno.major}:${devno.minor}`,
      displayName: name,
      ...initFromOptions(opts),
      sizeSectors: Math.floor(blkGetSize64(fd) / SECTOR_SIZE),
      logicalBlockSize: blkSszGet(fd),
      supportsDiscard: discards,
      // BLKZEROOUT falls back to writing zeros inside the kernel, so it always works.
      supportsWriteZeroes: true,
      devno,
    });
  }

  async refreshSize(): Promise<number> {
    this.size = Math.floor(blkGetSize64(this.fd) / SECTOR_SIZE);
    return this.size;
  }

  protected discardRange(offset: number, length: number): Promise<void> {
    return blkDiscardAsync(this.fd, offset, length);
  }

  /** BLKZEROOUT never unmaps (BLKDEV_ZERO_NOUNMAP), which satisfies NOUNMAP and plain requests. */
  protected zeroRange(offset: number, length: number): Promise<void> {
    return blkZeroOutAsync(this.fd, offset, length);
  }
}
