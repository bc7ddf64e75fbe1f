/** Small helpers for the runner's RAM disks: COW sizing, whole-device reads, direct writes. */
import { Bio, SECTOR_SIZE, submitAndWait } from "../../core/bio.js";

/**
 * COW sectors for a snapshot of an `originSectors` origin that can never overflow: the header
 * chunk, one metadata area per `exceptionsPerArea` data chunks (16-byte `struct disk_exception`
 * records, dm-snap-persistent.c: area_location), one data chunk per origin chunk, and two chunks
 * of slack.
 */
export function cowSectorsFor(chunkSize: number, originSectors: number): number {
  const chunks = Math.ceil(originSectors / chunkSize);
  const exceptionsPerArea = (chunkSize * SECTOR_SIZE) / 16;
  return chunkSize * (1 + Math.ceil((chunks + 1) / exceptionsPerArea) + chunks + 2);
}

/** A write bio for direct submission to a RAM disk (which completes it synchronously). */
export function markedWrite(sector: number, data: Buffer): Bio {
  const bio = new Bio("write", sector, data.length / SECTOR_SIZE, data, 0, null);
  bio.markInFlight();
  return bio;
}

export async function readAll(device: { submit(bio: Bio): void }, sectors: number): Promise<Buffer> {
  const buffer = Buffer.alloc(sectors * SECTOR_SIZE);
  await submitAndWait(device, new Bio("read", 0, sectors, buffer, 0, null));
  return buffer;
}
