/**
 * thin_check from thin-provisioning-tools (written by dm-thin's authors, no part of udm) on a crash
 * point's metadata: the image goes to a file and thin_check must exit with status 0.
 */
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { readAll } from "../crash/ram-disks.js";

const SEARCH_PATH = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

/** The thin_check executable, or null when it is not installed. */
export function findThinCheck(): string | null {
  const dirs = [...(process.env.PATH ?? "").split(path.delimiter).filter(Boolean), ...SEARCH_PATH];
  for (const dir of dirs) {
    const file = path.join(dir, "thin_check");
    try {
      fs.accessSync(file, fs.constants.X_OK);
      return file;
    } catch {
      // not here
    }
  }
  return null;
}

export class ThinCheckTool {
  private readonly dir: string;
  private seq = 0;

  constructor(readonly executable: string) {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-thin-crash-"));
  }

  /** thin_check's complaints about `metadata` (empty when it exits with 0). */
  async check(metadata: BlockDevice): Promise<string[]> {
    const file = path.join(this.dir, `meta-${this.seq++}.img`);
    fs.writeFileSync(file, await readAll(metadata, metadata.sizeSectors));
    try {
      const { code, output } = await run(this.executable, [file]);
      if (code === 0) return [];
      const lines = output.split("\n").filter((line) => line.trim() !== "");
      return [`thin_check exits with ${code}: ${lines.slice(0, 6).join(" | ")}`];
    } finally {
      fs.rmSync(file, { force: true });
    }
  }

  close(): void {
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

function run(file: string, args: string[]): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { maxBuffer: 1 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === "number" ? err.code : -1) : 0;
      resolve({ code, output: `${stdout}${stderr}` });
    });
  });
}
