/**
 * What `npm run xfstests` checks before it makes anything: the xfstests checkout (a checkout, and
 * built), this machine (root, loop devices, FUSE, the tools) and the udm build it will run.
 */
import fs from "node:fs";
import path from "node:path";
import { which } from "../support/tools.js";

/** Why `dir` cannot be run (not a checkout, not built), or null. */
export function xfstestsProblem(dir: string): string | null {
  if (!fs.existsSync(dir)) return `PATH_TO_XFSTESTS ${dir}: no such directory`;
  const missing = (files: string[]) => files.filter((f) => !fs.existsSync(path.join(dir, f)));
  const source = missing(["check", "common/rc", "common/dmflakey", "tests/generic"]);
  if (source.length > 0)
    return `${dir} is not an xfstests checkout (no ${source.join(", ")}); get one with: git clone https://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git`;
  const built = missing(["ltp/fsstress", "ltp/fsx", "src/log-writes/replay-log", "src/godown"]);
  if (built.length > 0)
    return `${dir} is an xfstests checkout, but it is not built (no ${built.join(", ")}): run \`make\` there (its README lists the build dependencies; docs/testing.md, "xfstests")`;
  return null;
}

/** Why this machine cannot run it, or null. */
export function systemProblem(): string | null {
  if (process.getuid?.() !== 0) return "needs root (loop devices, mounts, FUSE)";
  if (!fs.existsSync("/dev/loop-control")) return "no /dev/loop-control (the loop module)";
  const tools = ["losetup", "mkfs.ext4", "e2fsck", "mkfs.xfs", "mount", "umount", "blockdev", "xfs_io"];
  if (!fs.existsSync("/dev/nbd0")) tools.push("nbdfuse", "fusermount3");
  const missing = tools.filter((t) => !which(t));
  if (missing.length > 0)
    return `missing tools: ${missing.join(", ")} (Debian: apt-get install util-linux e2fsprogs xfsprogs libnbd-bin fuse3)`;
  if (!fs.existsSync("/dev/nbd0") && !fs.existsSync("/dev/fuse")) return "no /dev/fuse (the fuse module)";
  return null;
}

/** Sources newer than their build in dist/ (the run uses dist/, so these would not be tested). */
export function staleBuild(udmRoot: string): string[] {
  const stale: string[] = [];
  const walk = (rel: string) => {
    const full = path.join(udmRoot, rel);
    if (!fs.existsSync(full)) return;
    if (fs.statSync(full).isDirectory()) {
      for (const e of fs.readdirSync(full)) walk(path.join(rel, e));
    } else if (rel.endsWith(".ts") && !rel.endsWith(".d.ts")) {
      const js = fs.statSync(path.join(udmRoot, "dist", rel.replace(/\.ts$/, ".js")), { throwIfNoEntry: false });
      if (!js || js.mtimeMs < fs.statSync(full).mtimeMs) stale.push(rel);
    }
  };
  for (const rel of ["index.ts", "core", "targets", "nbd", "dmsetup"]) walk(rel);
  return stale;
}
