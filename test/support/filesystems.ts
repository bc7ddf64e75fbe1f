/**
 * The filesystems the root tests put on udm devices (ext4, XFS): how to make one, check it
 * read-only, and mount a snapshot of it next to the original.
 */
import { expect } from "vitest";
import { sh, tool, type ToolResult } from "./tools.js";
import { MiB } from "./units.js";

export interface FsKind {
  name: "ext4" | "xfs";
  /** Tools it needs besides BASE_TOOLS. */
  tools: string[];
  /** Smallest sensible device for it. */
  minBytes: number;
  mkfs(dev: string): Promise<void>;
  /** A read-only check that must exit 0 on a clean filesystem; returns its output. */
  check(dev: string): Promise<ToolResult>;
  /** Mount options for a second copy of the same filesystem (a snapshot) next to the original. */
  snapshotMountOptions(readOnly: boolean): string[];
  /**
   * Whether a snapshot of the frozen filesystem needs its log replayed (a read-write mount and
   * unmount) before the read-only check can be clean. ext4's freeze leaves a clean journal; XFS's
   * only covers its log, and its lazy superblock counters are settled by log recovery.
   */
  replayLogBeforeCheck: boolean;
}

export const EXT4: FsKind = {
  name: "ext4",
  tools: ["mkfs.ext4", "e2fsck", "fsfreeze"],
  minBytes: 64 * MiB,
  // No lazy initialisation: a background thread would keep writing after mount.
  mkfs: async (dev) =>
    void (await sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)),
  check: (dev) => tool("e2fsck", ["-fn", dev]),
  snapshotMountOptions: (readOnly) => (readOnly ? ["ro"] : []),
  replayLogBeforeCheck: false,
};

export const XFS: FsKind = {
  name: "xfs",
  tools: ["mkfs.xfs", "xfs_repair", "fsfreeze"],
  minBytes: 320 * MiB, // mkfs.xfs refuses filesystems under 300 MB
  mkfs: async (dev) => void (await sh("mkfs.xfs", "-q", "-f", dev)),
  check: (dev) => tool("xfs_repair", ["-n", dev]),
  // The snapshot has the origin's UUID.
  snapshotMountOptions: (readOnly) => ["nouuid", ...(readOnly ? ["ro"] : [])],
  replayLogBeforeCheck: true,
};

/** Expect `kind`'s read-only check of `dev` to pass. */
export async function expectClean(kind: FsKind, dev: string): Promise<void> {
  const r = await kind.check(dev);
  expect(r.code, `${kind.name} check of ${dev}:\n${r.stdout}${r.stderr}`).toBe(0);
}
