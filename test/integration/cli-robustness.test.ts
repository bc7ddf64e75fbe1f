/**
 * udmsetup as scripts use it, where scripts go wrong: output into a pipe whose reader has left
 * (`udmsetup info | head -1`), stacks removed with remove_all.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { UDMSETUP, udmsetup, useDaemon } from "../support/daemon.js";

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

describe("remove_all", () => {
  const env = useDaemon("udm-remove-all-");

  it("removes a stack whatever the listing order: passes until one removes nothing", async () => {
    const file = path.join(env.files, "disk.img");
    fs.writeFileSync(file, Buffer.alloc(1 << 20));
    // "a" lists before "b", which holds it: a single pass fails on "a" and stops short.
    expect((await udmsetup(env.dir, ["create", "a", "--table", `0 2048 linear ${file} 0`])).code).toBe(0);
    expect((await udmsetup(env.dir, ["create", "b", "--table", "0 2048 linear /dev/mapper/a 0"])).code).toBe(0);
    expect((await udmsetup(env.dir, ["create", "c", "--table", "0 2048 linear /dev/mapper/b 0"])).code).toBe(0);
    const r = await udmsetup(env.dir, ["remove_all"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect((await udmsetup(env.dir, ["ls"])).stdout).toBe("No devices found\n");
  });
});
