/**
 * The contract every underlying device satisfies: files, kernel block devices (loop and others),
 * RAM disks, other mapped devices. Small on purpose (random-access-storage style): a device takes
 * bios and completes them; everything else is description.
 */
import type { Bio, BioSink } from "../bio.js";

export interface BlockDevice extends BioSink {
  /**
   * How tables print this device: `major:minor` for block devices and mapped devices (as the
   * kernel's format_dev_t), the path for regular files, a descriptive name for RAM disks.
   */
  readonly tableName: string;
  /** Name used in kernel-style messages ("loop0", "/tmp/x.img"): `<dev> too small for target`. */
  readonly displayName: string;
  /** Size in 512-byte sectors. May change (a resized file or a reloaded mapped device). */
  readonly sizeSectors: number;
  /** Logical block size in bytes (512 for files). */
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  /** Device number when the device has one (block devices, mapped devices). */
  readonly devno?: { major: number; minor: number };
  /** Whether discard/write-zeroes are supported natively (else the bio fails with EOPNOTSUPP). */
  readonly supportsDiscard: boolean;
  readonly supportsWriteZeroes: boolean;
  /**
   * Take a bio. The device completes it exactly once with `bio.complete(status)`, never
   * synchronously re-entering the caller before `submit` returns is NOT guaranteed: callers must
   * tolerate completion from inside `submit` (RAM disks complete synchronously).
   */
  submit(bio: Bio): void;
  /**
   * Make a read-only device writable without changing its identity (the device manager shares
   * one object per underlying device; targets key on it). Absent: the device is opened anew.
   */
  upgradeToReadWrite?(): Promise<void>;
  /** Release the underlying resource. Pending bios must have completed. */
  close(): Promise<void>;
}

export type OpenMode = "r" | "rw";

/** How file and kernel block devices do their I/O (`createDeviceMapper({ io })`). */
export interface IoOptions {
  /** Open with O_DIRECT where the backing store supports it (bounce-buffered for alignment). Default off. */
  direct?: boolean;
  /**
   * Read page-cache hits in the event loop instead of libuv's thread pool (inline-io.ts).
   * Default on where supported (Linux x86_64); never with `direct`.
   */
  inlineReads?: boolean;
  /**
   * Hold the small buffered writes of one event-loop turn and send those that touch as one
   * pwritev (write-plug.ts). Default on; never with `direct`.
   */
  writePlug?: boolean;
  /**
   * Claim kernel block devices exclusively (open with O_EXCL), as dm_get_device does with its
   * holder: a mounted or otherwise claimed device is refused with EBUSY, and while the table holds
   * it nobody can mount it or claim it. Files are never claimed. Default off here; tables' devices
   * are claimed unless the device mapper is told otherwise (shared-devices.ts).
   */
  exclusive?: boolean;
}

export interface OpenOptions extends IoOptions {
  mode: OpenMode;
}
