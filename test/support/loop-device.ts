/**
 * Loop devices and sparse backing files for tests that need real kernel block devices (root).
 * The loop-device helper itself lives in the package (dmsetup/attach/loop-device.ts); this module
 * re-exports it and adds sparse files that an exit handler removes if a test leaks them.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

export {
  createLoopDevice,
  LOOP_CONTROL,
  type LoopDevice,
  loopDeviceUnavailableReason,
  type LoopOptions,
} from "../../dmsetup/attach/loop-device.js";

const tempDirs = new Set<string>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const dir of tempDirs) fs.rmSync(dir, { recursive: true, force: true });
  });
}

export interface SparseFile {
  path: string;
  /** Delete the file and its private directory. */
  remove(): Promise<void>;
}

/** A sparse file of `size` bytes (no blocks allocated) in a fresh directory under `dir`. */
export async function withSparseFile(size: number, opts: { dir?: string; name?: string } = {}): Promise<SparseFile> {
  installExitHook();
  const dir = await fs.promises.mkdtemp(path.join(opts.dir ?? os.tmpdir(), "udm-test-"));
  tempDirs.add(dir);
  const file = path.join(dir, opts.name ?? "disk.img");
  await fs.promises.writeFile(file, "");
  await fs.promises.truncate(file, size);
  return {
    path: file,
    remove: async () => {
      tempDirs.delete(dir);
      await fs.promises.rm(dir, { recursive: true, force: true });
    },
  };
}
