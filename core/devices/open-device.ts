/**
 * Resolve a table's device argument (a path or `major:minor`, as dm-table.c: dm_get_device
 * accepts) to an open backing device.
 */
import fs from "node:fs";
import type { BlockDevice, OpenOptions } from "./block-device.js";
import { FileDevice } from "./file-device.js";
import { KernelBlockDevice, decodeDevno, kernelDevName } from "./kernel-block-device.js";

const MAJ_MIN = /^(\d+):(\d+)$/;

function deviceError(code: string, message: string, cause?: unknown): Error {
  return Object.assign(new Error(message, cause ? { cause } : undefined), { code });
}

/** `major:minor` → /dev/<kernel name>, checking the node really is that device. */
async function nodeForDevno(arg: string, major: number, minor: number): Promise<string> {
  const name = await kernelDevName({ major, minor });
  if (!name) throw deviceError("ENODEV", `${arg}: no block device with that number`);
  const node = `/dev/${name}`;
  let st: fs.BigIntStats;
  try {
    st = await fs.promises.stat(node, { bigint: true });
  } catch (err) {
    throw deviceError("ENOENT", `${arg}: block device ${name} has no node ${node}`, err);
  }
  const found = decodeDevno(st.rdev);
  if (!st.isBlockDevice() || found.major !== major || found.minor !== minor) {
    throw deviceError("ENODEV", `${arg}: ${node} is not block device ${major}:${minor}`);
  }
  return node;
}

export async function openBackingDevice(pathOrMajMin: string, opts: OpenOptions): Promise<BlockDevice> {
  const m = MAJ_MIN.exec(pathOrMajMin);
  const file = m ? await nodeForDevno(pathOrMajMin, Number(m[1]), Number(m[2])) : pathOrMajMin;
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ENOTDIR") {
      throw deviceError("ENOENT", `${file}: no such file or block device`, err);
    }
    throw err;
  }
  if (st.isFile()) return FileDevice.open(file, opts);
  if (st.isBlockDevice()) return KernelBlockDevice.open(file, opts);
  throw deviceError("ENODEV", `${file}: not a regular file or block device`);
}
