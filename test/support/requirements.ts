/**
 * What a test file needs (root, loop devices, FUSE, system tools) and what it does when that is
 * missing: skip with the reason printed, or, when UDM_REQUIRE_ROOT_TESTS=1 (CI), fail with it.
 * A skip in CI would hide a missing package; a failure names it.
 *
 *   const skipReason = rootUnavailableReason(["fio"]);
 *   skipOrFail("root linear tests", skipReason);
 *   describe.skipIf(skipReason !== null)(...);
 */
import fs from "node:fs";
import { it } from "vitest";
import { which } from "./tools.js";

/** UDM_REQUIRE_ROOT_TESTS=1: every root- or tool-dependent test must run (CI sets it). */
export const REQUIRED = process.env.UDM_REQUIRE_ROOT_TESTS === "1";

/** The tools every root test uses (attach needs nbdfuse + fusermount3, checks need losetup). */
export const BASE_TOOLS = ["nbdfuse", "fusermount3", "mount", "umount", "losetup"];

const DEBIAN_PACKAGES: Record<string, string> = {
  nbdfuse: "libnbd-bin",
  nbdcopy: "libnbd-bin",
  nbdinfo: "libnbd-bin",
  "qemu-io": "qemu-utils",
  fusermount3: "fuse3",
  "mkfs.ext4": "e2fsprogs",
  e2fsck: "e2fsprogs",
  debugfs: "e2fsprogs",
  fsfreeze: "util-linux",
  losetup: "util-linux",
  script: "bsdutils",
  mount: "mount",
  umount: "mount",
  fio: "fio",
  strace: "strace",
  "mkfs.xfs": "xfsprogs",
  xfs_repair: "xfsprogs",
  "systemd-socket-activate": "systemd",
};

/** Why `tools` cannot be run here (which are missing, and the Debian packages that have them), or null. */
export function missingToolsReason(tools: readonly string[]): string | null {
  const missing = [...new Set(tools)].filter((t) => !which(t));
  if (missing.length === 0) return null;
  const packages = [...new Set(missing.map((t) => DEBIAN_PACKAGES[t] ?? t))];
  return `${missing.join(", ")} not installed (Debian: apt-get install ${packages.join(" ")})`;
}

/** Why the root tests needing `tools` (besides BASE_TOOLS) cannot run here, or null if they can. */
export function rootUnavailableReason(tools: readonly string[]): string | null {
  if (process.platform !== "linux") return `needs Linux (this is ${process.platform})`;
  if (process.getuid?.() !== 0) return "needs root (loop devices, mounts, FUSE)";
  for (const dev of ["/dev/loop-control", "/dev/fuse"]) if (!fs.existsSync(dev)) return `${dev} is missing`;
  return missingToolsReason([...BASE_TOOLS, ...tools]);
}

/**
 * `suite` cannot run here for `reason` (null: it can): print why it is skipped. With
 * UDM_REQUIRE_ROOT_TESTS=1 the skip is a failure: a test that fails with the reason is registered
 * where this is called (only then, so a normal run shows no extra test). Returns whether the
 * suite's own tests must be skipped.
 */
export function skipOrFail(suite: string, reason: string | null): boolean {
  if (reason === null) return false;
  console.warn(`${suite} ${REQUIRED ? "REQUIRED but cannot run" : "skipped"}: ${reason}`);
  if (REQUIRED) {
    it(`${suite} must run (UDM_REQUIRE_ROOT_TESTS=1)`, () => {
      throw new Error(`UDM_REQUIRE_ROOT_TESTS=1 but ${suite} cannot run: ${reason}`);
    });
  }
  return true;
}

/**
 * The tools of `tools` that are not installed (empty when all are), for files whose tests each
 * need some of them; `skipOrFail` for the missing ones. Call at a test file's top level.
 */
export function missingTools<T extends string>(suite: string, tools: readonly T[]): T[] {
  const missing = tools.filter((t) => !which(t));
  skipOrFail(suite, missingToolsReason(missing));
  return missing;
}
