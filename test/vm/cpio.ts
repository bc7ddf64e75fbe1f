/**
 * A writer for the cpio "newc" format the kernel unpacks as an initramfs
 * (Documentation/driver-api/early-userspace/buffer-format.rst). Written here rather than run
 * through cpio(1) so that the archive can hold device nodes and root-owned files when built by
 * an unprivileged user, and so that the same inputs give the same bytes.
 */

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

export type CpioEntry =
  | { type: "dir"; path: string; mode?: number }
  | { type: "file"; path: string; data: Buffer; mode?: number }
  | { type: "symlink"; path: string; target: string }
  | { type: "chardev"; path: string; major: number; minor: number; mode?: number };

function hex8(n: number): string {
  return n.toString(16).padStart(8, "0");
}

function pad4(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}

function record(ino: number, mode: number, name: string, data: Buffer, rdev = { major: 0, minor: 0 }): Buffer[] {
  const nameBytes = Buffer.from(`${name}\0`);
  const fields = [ino, mode, 0, 0, 1, 0, data.length, 0, 0, rdev.major, rdev.minor, nameBytes.length, 0];
  const header = Buffer.from(`070701${fields.map(hex8).join("")}`);
  return [header, nameBytes, pad4(header.length + nameBytes.length), data, pad4(data.length)];
}

/** The archive: parent directories must come before what they hold (the kernel does not create them). */
export function cpioArchive(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  for (const e of entries) {
    const name = e.path.replace(/^\/+/, "");
    switch (e.type) {
      case "dir":
        parts.push(...record(ino++, S_IFDIR | (e.mode ?? 0o755), name, Buffer.alloc(0)));
        break;
      case "file":
        parts.push(...record(ino++, S_IFREG | (e.mode ?? 0o644), name, e.data));
        break;
      case "symlink":
        parts.push(...record(ino++, S_IFLNK | 0o777, name, Buffer.from(e.target)));
        break;
      case "chardev":
        parts.push(...record(ino++, S_IFCHR | (e.mode ?? 0o600), name, Buffer.alloc(0), e));
        break;
    }
  }
  parts.push(...record(0, 0, "TRAILER!!!", Buffer.alloc(0)));
  return Buffer.concat(parts);
}
