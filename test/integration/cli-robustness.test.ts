/**
 * udmsetup as scripts use it, where scripts go wrong: output into a pipe whose reader has left
 * (`udmsetup info | head -1`), stacks removed with remove_all, a daemon stopped while a lower
 * device is suspended under I/O.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { UDMSETUP, udmsetup, useDaemon } from "../support/daemon.js";
import { WireClient } from "../support/nbd-client.js";

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

describe("SIGTERM", () => {
  const env = useDaemon("udm-sigterm-");

  it("finishes shutdown while a lower device is suspended with I/O held: I/O fails, files go, exit 0", async () => {
    const file = path.join(env.files, "disk.img");
    fs.writeFileSync(file, Buffer.alloc(1 << 20));
    expect((await udmsetup(env.dir, ["create", "a", "--table", `0 2048 linear ${file} 0`])).code).toBe(0);
    expect((await udmsetup(env.dir, ["create", "b", "--table", "0 2048 linear /dev/mapper/a 0"])).code).toBe(0);
    expect((await udmsetup(env.dir, ["suspend", "a"])).code).toBe(0);
    const client = await WireClient.connect(runPaths(env.dir).nbd, "b");
    const held = client.write(0, Buffer.alloc(4096, 7)); // waits in a's queue
    const code = await env.daemon.stop("SIGTERM");
    expect(code).toBe(0);
    expect(env.daemon.stderr()).toContain('"udmd stopped"');
    expect(fs.readdirSync(env.dir)).toEqual([]);
    const reply = await held.catch((err: Error) => err);
    expect(reply instanceof Error || reply.error !== 0).toBe(true); // failed, or the connection ended
    client.destroy();
  });
});
