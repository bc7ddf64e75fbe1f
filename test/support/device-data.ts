/**
 * Data with known contents, and reading it back from a device or file to compare: deterministic
 * pseudo-random bytes, their sha256, a device's digest, bytes at an offset.
 */
import crypto from "node:crypto";
import fs from "node:fs";
import { MiB } from "./units.js";

/** `bytes` of deterministic pseudo-random data for `key` (AES-CTR keystream). */
export function patternBytes(key: string, bytes: number): Buffer {
  const k = crypto.createHash("sha256").update(key).digest();
  const cipher = crypto.createCipheriv("aes-256-ctr", k, Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(bytes)), cipher.final()]);
}

export const sha256 = (b: Buffer) => crypto.createHash("sha256").update(b).digest("hex");

/** sha256 of the first `bytes` (default: all) of a device or file, read in 4 MiB steps. */
export function digestDevice(dev: string, bytes?: number): string {
  const fd = fs.openSync(dev, "r");
  try {
    const h = crypto.createHash("sha256");
    const buf = Buffer.alloc(4 * MiB);
    for (let pos = 0; bytes === undefined || pos < bytes;) {
      const n = fs.readSync(fd, buf, 0, bytes === undefined ? buf.length : Math.min(buf.length, bytes - pos), pos);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
      pos += n;
    }
    return h.digest("hex");
  } finally {
    fs.closeSync(fd);
  }
}

/** `length` bytes of `dev` (a device or file) at byte offset `pos`. */
export function readAt(dev: string, pos: number, length: number): Buffer {
  const fd = fs.openSync(dev, "r");
  try {
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, buf, done, length - done, pos + done);
      if (n === 0) break;
      done += n;
    }
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}
