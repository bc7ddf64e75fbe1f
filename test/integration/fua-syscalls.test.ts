/**
 * What FUA and PREFLUSH writes on a file cost in syscalls, seen from outside with strace: a FUA
 * write is one pwritev2 with RWF_DSYNC (durable on return, and unlike a write followed by
 * fdatasync it does not also flush every other dirty page of the COW file); PREFLUSH is one
 * fdatasync before it; a plain write syncs nothing.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { missingTools } from "../support/requirements.js";

const missing = missingTools("FUA syscall test", ["strace"]);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-fua-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

describe.skipIf(missing.length > 0)("FUA writes on a FileDevice", () => {
  it("become pwritev2(RWF_DSYNC); PREFLUSH adds one fdatasync; plain writes sync nothing", () => {
    const file = path.join(dir, "disk.img");
    fs.writeFileSync(file, Buffer.alloc(64 * 1024));
    const trace = path.join(dir, "trace");
    const writer = path.join(import.meta.dirname, "../fixtures/fua-writer.ts");
    execFileSync(
      "strace",
      [
        "-f",
        "-qq",
        "-e",
        "trace=pwritev2,pwrite64,fdatasync,fsync",
        "-o",
        trace,
        process.execPath,
        "--import",
        "tsx",
        writer,
        file,
      ],
      {
        stdio: ["ignore", "ignore", "pipe"],
        timeout: 60_000,
      },
    );
    const calls = fs
      .readFileSync(trace, "utf8")
      .split("\n")
      .map((l) => l.replace(/^\d+\s+/, ""))
      .filter((l) => /^(pwritev2|pwrite64|fdatasync|fsync)\(/.test(l));
    // The data file only (the trace also holds Node's own startup writes, if any, on other fds).
    const fdOf = (l: string) => /^\w+\((\d+)/.exec(l)![1];
    const dataFd = fdOf(calls.find((l) => l.startsWith("pwritev2("))!);
    const onData = calls
      .filter((l) => fdOf(l) === dataFd)
      .map((l) => l.replace(/\[\{iov_base=.*?\}\]/, "[…]").replace(/\s*= .*/, ""));
    expect(onData).toEqual([
      `pwritev2(${dataFd}, […], 1, 4096, RWF_DSYNC)`,
      `fdatasync(${dataFd})`,
      `pwritev2(${dataFd}, […], 1, 8192, RWF_DSYNC)`,
      `pwrite64(${dataFd}, "\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3\\3"..., 4096, 12288)`,
    ]);
    const back = fs.readFileSync(file);
    expect(back.subarray(4096, 8192).every((b) => b === 1)).toBe(true);
    expect(back.subarray(8192, 12288).every((b) => b === 2)).toBe(true);
    expect(back.subarray(12288, 16384).every((b) => b === 3)).toBe(true);
  });
});
