/**
 * Devices survive a daemon that is killed (issue 16 item 4): after kill -9, a new udmd on the run
 * directory brings back every device under its name and minor with its tables, data and state,
 * lower devices first: linear over striped, a snapshot origin with two snapshots, one of them
 * being merged back, which carries on after the restart and finishes.
 */
import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { type RunningDaemon, startDaemon, tempDir } from "../support/daemon.js";
import { WireClient } from "../support/nbd-client.js";
import { pattern } from "../support/memory-backing.js";
import { cli, createSnapshot, makeFile } from "../support/udmd-tools.js";

const MiB = 1024 * 1024;
const SECTORS = (8 * MiB) / 512;

let dir: string;
let files: string;
let daemon: RunningDaemon | undefined;
afterEach(async () => {
  await daemon?.stop();
  for (const d of [dir, files]) fs.rmSync(d, { recursive: true, force: true });
});

async function io<T>(name: string, fn: (c: WireClient) => Promise<T>): Promise<T> {
  const client = await WireClient.connect(runPaths(dir).nbd, name);
  try {
    return await fn(client);
  } finally {
    await client.disconnect();
  }
}

async function write(name: string, offset: number, data: Buffer): Promise<void> {
  await io(name, async (c) => {
    expect((await c.write(offset, data)).error).toBe(0);
    expect((await c.flush()).error).toBe(0);
  });
}

async function read(name: string, offset: number, length: number): Promise<Buffer> {
  return io(name, async (c) => {
    const r = await c.read(offset, length);
    expect(r.error).toBe(0);
    return r.data!;
  });
}

/** `<allocated>/<total> <metadata>` of a snapshot-merge status line. */
async function mergeLeft(): Promise<number> {
  const m = /snapshot-merge (\d+)\/\d+ (\d+)/.exec(await cli(dir, "status", "base"));
  if (!m) throw new Error("base is not merging");
  return Number(m[1]) - Number(m[2]);
}

describe("udmd restarted after kill -9", () => {
  it("restores a stack with a merge in progress: tables, minors, data, and the merge finishes", async () => {
    dir = tempDir();
    files = tempDir("udm-restore-");
    const f = (n: string) => path.join(files, n);
    for (const n of ["d0", "d1"]) makeFile(f(n), 4 * MiB);
    const before = pattern(1, 8 * MiB);
    makeFile(f("origin.img"), before);
    for (const n of ["cow1", "cow2"]) makeFile(f(n), 8 * MiB);
    daemon = await startDaemon(dir);

    await cli(dir, "create", "stripe", "--table", `0 ${SECTORS} striped 2 64 ${f("d0")} 0 ${f("d1")} 0`);
    await cli(dir, "create", "lin", "--table", `0 ${SECTORS} linear /dev/mapper/stripe 0`, "-u", "UDM-lin");
    // Writes to the origin file are slowed, so that the merge is still running at the kill.
    await cli(dir, "create", "slow", "--table", `0 ${SECTORS} delay ${f("origin.img")} 0 0 ${f("origin.img")} 0 25`);
    await cli(dir, "create", "base", "--table", `0 ${SECTORS} snapshot-origin /dev/mapper/slow`);
    await createSnapshot(dir, "base", "snap1", `0 ${SECTORS} snapshot /dev/mapper/slow ${f("cow1")} P 8`);
    // 48 scattered 4 KiB blocks change after snap1: the merge has that many chunks to copy back.
    const changed = Array.from({ length: 48 }, (_, i) => i * 37 * 4096);
    for (const at of changed) await write("base", at, pattern(2 + at, 4096));
    await createSnapshot(dir, "base", "snap2", `0 ${SECTORS} snapshot /dev/mapper/slow ${f("cow2")} P 16`);
    const atSnap2 = await read("base", 0, 8 * MiB);
    await write("lin", 12345 * 512, pattern(3, 65536));
    await cli(dir, "create", "spare", "--notable");
    await cli(dir, "suspend", "lin");

    // The merge of snap1 (docs/snapshot.md, "Merging a snapshot back").
    await cli(dir, "reload", "base", "--table", `0 ${SECTORS} snapshot-merge /dev/mapper/slow ${f("cow1")} P 8`);
    await cli(dir, "suspend", "snap1");
    await cli(dir, "resume", "base");
    await cli(dir, "remove", "snap1");
    const total = 48 * 8; // sectors: 48 chunks of 8
    expect(await mergeLeft()).toBeLessThanOrEqual(total);
    while ((await mergeLeft()) === total) await new Promise((r) => setTimeout(r, 20));
    const tables = await cli(dir, "table");
    const info = await cli(dir, "info", "-c", "--noheadings", "-o", "name,minor,attr,uuid");

    expect(await daemon.stop("SIGKILL")).toBe(null);
    daemon = await startDaemon(dir);
    expect(daemon.stderr()).toContain('"devices restored"');
    expect(await cli(dir, "table")).toBe(tables);
    expect(await cli(dir, "info", "-c", "--noheadings", "-o", "name,minor,attr,uuid")).toBe(info);

    await cli(dir, "resume", "lin");
    expect((await read("lin", 12345 * 512, 65536)).equals(pattern(3, 65536))).toBe(true);
    // The merge goes on from where the killed daemon left it, and finishes.
    const left = await mergeLeft();
    expect(left).toBeGreaterThan(0);
    expect(left).toBeLessThan(total);
    await cli(dir, "wait", "base", (await cli(dir, "info", "-c", "--noheadings", "-o", "events", "base")).trim());
    expect(await mergeLeft()).toBe(0);
    expect((await read("base", 0, 8 * MiB)).equals(before)).toBe(true);
    expect((await read("slow", 0, 8 * MiB)).equals(before)).toBe(true);
    expect((await read("snap2", 0, 8 * MiB)).equals(atSnap2)).toBe(true);
  }, 60_000);
});
