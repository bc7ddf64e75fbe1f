/**
 * NBD WRITE_ZEROES on a device whose table cannot zero (of the built-in targets only linear and
 * striped pass write-zeroes down): the zeros are written as ordinary writes, as the kernel's
 * blkdev_issue_zeroout falls back to blkdev_issue_zero_pages for a device without write-zeroes
 * support (block/blk-lib.c). The effect is the kernel's too: a thin volume provisions the blocks
 * it zeroes, a snapshot copies the chunks.
 *
 * Why the server offers WRITE_ZEROES on such devices at all: a client that is not offered it
 * emulates it, and nbdfuse (libnbd 1.14, Debian 12), which the attach path puts under a loop
 * device, writes its 4 KiB zero buffer at the start of the range again and again instead of
 * across it — BLKZEROOUT on an attached flakey, log-writes, thin or snapshot device left all but
 * the first 4 KiB as it was. FAST_ZERO requests are still refused (writing is not fast).
 */
import { Bio, type BioEndIo, BioFlags, type BioSink, type BioStatus, SECTOR_SIZE } from "../core/bio.js";
import type { ExportDevice } from "./exports.js";

/** Zeros go down in writes of at most this many bytes. */
export const ZERO_FILL_CHUNK = 1024 * 1024;
/** Chunk writes in flight at once for one request. */
const ZERO_FILL_DEPTH = 4;
/**
 * The zeros every zero fill writes from: one buffer for all, never written to (a write's data
 * belongs to the bio and no target changes it; flakey's corrupt_bio_byte works on a copy).
 */
const ZEROS = Buffer.alloc(ZERO_FILL_CHUNK);

/**
 * Serve `bio` (a write-zeroes, in flight): as write-zeroes where the device's table can, else
 * (or when a table loaded since says EOPNOTSUPP) by writing zeros, as blkdev_issue_zeroout
 * retries. `cancelled`: the requester is gone (its connection closed); a zero fill stops there.
 */
export function submitWriteZeroes(device: ExportDevice, bio: Bio, cancelled: () => boolean = () => false): void {
  if (!device.supportsWriteZeroes) return submitZeroFill(device, bio, cancelled);
  const native = new Bio("write-zeroes", bio.sector, bio.sectors, null, bio.flags, {
    bioDone: (n) => (n.status === "EOPNOTSUPP" ? submitZeroFill(device, bio, cancelled) : bio.complete(n.status)),
  });
  native.submitTo(device);
}

/**
 * Completes `bio` (a write-zeroes) by writing zeros over its range to `device`: chunked writes,
 * a few in flight, the first error is the bio's status. A FUA write-zeroes ends with one flush
 * (not a FUA write per chunk); NOUNMAP is what plain writes do anyway. Stops (ENXIO, which the
 * server answers with ESHUTDOWN) once
 * `cancelled` says so.
 */
export function submitZeroFill(device: BioSink, bio: Bio, cancelled: () => boolean = () => false): void {
  const end = bio.sector + bio.sectors;
  const chunkSectors = ZERO_FILL_CHUNK / SECTOR_SIZE;
  let next = bio.sector;
  let inFlight = 0;
  let status: BioStatus = "ok";
  let pumping = false;
  let finished = false;
  const done: BioEndIo = {
    bioDone: (chunk) => {
      inFlight--;
      if (chunk.status !== "ok" && status === "ok") status = chunk.status;
      pump();
    },
  };
  const finish = (): void => {
    finished = true;
    if (status !== "ok" || !bio.isFua) return bio.complete(status);
    const flush = new Bio("flush", 0, 0, null, BioFlags.PREFLUSH, { bioDone: (f) => bio.complete(f.status) });
    flush.submitTo(device);
  };
  // A loop, not recursion, when chunks complete synchronously: a completion inside submitTo
  // only counts down, and this loop goes on.
  const pump = (): void => {
    if (pumping || finished) return;
    pumping = true;
    try {
      for (;;) {
        if (status === "ok" && next < end && cancelled()) status = "ENXIO";
        if (status === "ok" && next < end && inFlight < ZERO_FILL_DEPTH) {
          const sectors = Math.min(chunkSectors, end - next);
          const data = sectors === chunkSectors ? ZEROS : ZEROS.subarray(0, sectors * SECTOR_SIZE);
          const chunk = new Bio("write", next, sectors, data, 0, done);
          next += sectors;
          inFlight++;
          chunk.submitTo(device);
          continue;
        }
        break;
      }
    } finally {
      pumping = false;
    }
    if (inFlight === 0 && (next >= end || status !== "ok")) finish();
  };
  pump();
}
