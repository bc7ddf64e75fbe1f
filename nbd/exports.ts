/**
 * What an export is to the NBD server: the device contract, where exports come from, how a
 * device's capabilities become transmission flags, and how bio statuses become NBD errors.
 */
import { type BioSink, type BioStatus, SECTOR_SIZE } from "../core/bio.js";
import type { DeviceMapper } from "../core/device-mapper.js";
import { NbdErrno, TransmissionFlags } from "./protocol.js";

/** What the server needs from an exported device. A MappedDevice satisfies it as is. */
export interface ExportDevice extends BioSink {
  readonly sizeSectors: number;
  readonly readOnly: boolean;
  readonly supportsDiscard: boolean;
  readonly supportsWriteZeroes: boolean;
  /**
   * Write-zeroes is known to be much cheaper than writing zeros (NBD_CMD_FLAG_FAST_ZERO may
   * proceed). Absent or false: FAST_ZERO requests fail at once with ENOTSUP, as proto.md asks
   * of a server that cannot tell in advance.
   */
  readonly fastZeroes?: boolean;
  /** Called when a connection enters transmission on this device... */
  open(): void;
  /** ...and when that connection is gone. */
  close(): void | Promise<void>;
}

/** Where exports come from; names are what clients put in NBD_OPT_GO / EXPORT_NAME. */
export interface ExportProvider {
  list(): string[];
  get(name: string): ExportDevice | undefined;
}

/** An ExportProvider over a DeviceMapper: every mapped device, under its dm name. */
export function deviceMapperExports(dm: Pick<DeviceMapper, "list" | "has" | "device">): ExportProvider {
  return {
    list: () => dm.list(),
    get: (name): ExportDevice | undefined => (name !== "" && dm.has(name) ? dm.device(name) : undefined),
  };
}

export interface FoundExport {
  /** Canonical name (what NBD_OPT_LIST shows), even when the client asked for "". */
  name: string;
  device: ExportDevice;
}

/** The export for `name`; "" (the default export) means the only export when there is one. */
export function resolveExport(exports: ExportProvider, name: string): FoundExport | null {
  const direct = exports.get(name);
  if (direct) return { name, device: direct };
  if (name !== "") return null;
  const all = exports.list();
  if (all.length !== 1) return null;
  const device = exports.get(all[0]!);
  return device ? { name: all[0]!, device } : null;
}

/**
 * Block size constraints we advertise (NBD_INFO_BLOCK_SIZE): the core addresses 512-byte sectors,
 * so requests must be sector-aligned and unaligned ones get EINVAL; clients (qemu, libnbd, the
 * kernel) do their own read-modify-write given this minimum. See README.md here for why.
 */
export const MIN_BLOCK_SIZE = SECTOR_SIZE;
export const PREFERRED_BLOCK_SIZE = 4096;

export function exportSizeBytes(device: ExportDevice): number {
  return device.sizeSectors * SECTOR_SIZE;
}

export function transmissionFlags(device: ExportDevice, structured: boolean): number {
  const T = TransmissionFlags;
  // One device object serves every connection, and a flush reaches its backing files: the
  // effects of FLUSH/FUA are visible to all connections, which is what CAN_MULTI_CONN promises.
  let flags = T.HAS_FLAGS | T.SEND_FLUSH | T.SEND_FUA | T.CAN_MULTI_CONN | T.SEND_CACHE;
  if (device.readOnly) flags |= T.READ_ONLY;
  else {
    if (device.supportsDiscard) flags |= T.SEND_TRIM;
    // Offered whatever the table: where it cannot zero, the server writes zeros (zero-fill.ts).
    flags |= T.SEND_WRITE_ZEROES | T.SEND_FAST_ZERO;
  }
  // Reads are always answered in one chunk, so "don't fragment" is free to honour.
  if (structured) flags |= T.SEND_DF;
  return flags;
}

/** Bio status → NBD error value (the protocol's fixed set, not host errno numbers). */
export function nbdErrorFor(status: BioStatus): number {
  switch (status) {
    case "EPERM":
      return NbdErrno.EPERM;
    case "ENOSPC":
      return NbdErrno.ENOSPC;
    case "EINVAL":
      return NbdErrno.EINVAL;
    case "EOPNOTSUPP":
      return NbdErrno.ENOTSUP;
    case "ENXIO":
      // The device was removed under us: ESHUTDOWN makes the client disconnect cleanly.
      return NbdErrno.ESHUTDOWN;
    default:
      return NbdErrno.EIO;
  }
}
