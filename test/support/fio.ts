/** fio runs that verify what they wrote. */
import { expect } from "vitest";
import { tool } from "./tools.js";

/**
 * Overwrite every 4 KiB block of the existing file `file` once, in random order, with direct
 * writes (32 in flight), then read each back and check its crc32c. Fails unless fio reports no
 * error and wrote and verified all `bytes`.
 */
export async function fioOverwrite(file: string, bytes: number, opts: { iodepth?: number } = {}): Promise<void> {
  const r = await tool(
    "fio",
    [
      "--name=overwrite",
      `--filename=${file}`,
      `--size=${bytes}`,
      "--rw=randwrite",
      "--bs=4k",
      "--direct=1",
      "--ioengine=libaio",
      `--iodepth=${opts.iodepth ?? 32}`,
      "--overwrite=1",
      "--verify=crc32c",
      "--verify_fatal=1",
      "--randrepeat=1",
      "--output-format=json",
    ],
    { timeoutMs: 120_000 },
  );
  expect(r.code, `fio over ${file}:\n${r.stderr}${r.stdout}`).toBe(0);
  const job = (
    JSON.parse(r.stdout.slice(r.stdout.indexOf("{"))) as {
      jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[];
    }
  ).jobs[0]!;
  expect({ error: job.error, written: job.write.io_bytes, verified: job.read.io_bytes }).toEqual({
    error: 0,
    written: bytes,
    verified: bytes,
  });
}
