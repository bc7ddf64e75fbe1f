/**
 * udmsetup as scripts use it, where scripts go wrong: output into a pipe whose reader has left
 * (`udmsetup info | head -1`).
 */
import { spawn } from "node:child_process";
import { describe, expect, it } from "vitest";
import { UDMSETUP } from "../support/daemon.js";

describe("udmsetup output", () => {
  it("ends quietly with a SIGPIPE status when its reader has gone (EPIPE), like dmsetup", async () => {
    const child = spawn(process.execPath, [UDMSETUP, "--help"], { stdio: ["ignore", "pipe", "pipe"] });
    child.stdout.destroy(); // the only reader of the pipe is gone before anything is written
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const code = await new Promise<number | null>((resolve) => child.on("close", (c) => resolve(c)));
    expect(stderr).toBe("");
    expect(code).toBe(128 + 13);
  });
});
