/** One bio at a time against a BlockDevice, for tests of devices (the NBD client's, for one). */
import { type Bio, BioError, type BioStatus, readBio, submitAndWait } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";

/** The bio's status: "ok" or its error. */
export async function bioStatus(dev: BlockDevice, bio: Bio): Promise<BioStatus> {
  try {
    await submitAndWait(dev, bio);
    return "ok";
  } catch (err) {
    if (err instanceof BioError) return err.status;
    throw err;
  }
}

/** `bytes` read from `sector` (the buffer starts as 0xee, so unread bytes show). */
export async function readBytes(dev: BlockDevice, sector: number, bytes: number): Promise<Buffer> {
  const buf = Buffer.alloc(bytes, 0xee);
  await submitAndWait(dev, readBio(sector, buf));
  return buf;
}
