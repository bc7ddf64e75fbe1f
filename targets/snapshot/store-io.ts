/**
 * Shared pieces of the exception stores: the error class and whole-chunk I/O on the COW device.
 */
import { Bio, BioError, submitAndWait } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { chunkBytes } from "./cow-format.js";

/**
 * A store failure: `message` is the detailed reason the kernel would log ("Chunk size is not a
 * power of 2", "Invalid or corrupt snapshot"), `errno` what the constructor returns.
 */
export class StoreError extends Error {
  constructor(
    message: string,
    readonly errno: string = "EINVAL",
  ) {
    super(message);
    this.name = "StoreError";
  }
}

/** Read chunk `chunk` (whole chunk) into a new buffer; I/O errors become StoreError(EIO). */
export async function readChunk(cow: BlockDevice, chunkSize: number, chunk: number): Promise<Buffer> {
  const buf = Buffer.alloc(chunkBytes(chunkSize));
  await io(cow, new Bio("read", chunk * chunkSize, chunkSize, buf, 0, null), `read of chunk ${chunk}`);
  return buf;
}

/** Write `data` (one chunk) at chunk `chunk` with `flags` (BioFlags). */
export async function writeChunk(
  cow: BlockDevice,
  chunkSize: number,
  chunk: number,
  data: Buffer,
  flags: number,
): Promise<void> {
  await io(cow, new Bio("write", chunk * chunkSize, chunkSize, data, flags, null), `write of chunk ${chunk}`);
}

async function io(cow: BlockDevice, bio: Bio, what: string): Promise<void> {
  try {
    await submitAndWait(cow, bio);
  } catch (err) {
    const errno = err instanceof BioError ? err.status : "EIO";
    throw new StoreError(`${cow.displayName}: ${what} failed: ${errno}`, errno === "ok" ? "EIO" : errno);
  }
}
