/**
 * Devices survive a daemon that is killed (issue 16 item 4): after kill -9, a new udmd on the run
 * directory brings back every device under its name and minor with its tables, data and state,
 * lower devices first: linear over striped, a snapshot origin with two snapshots, one of them
 * being merged back, which carries on after the restart and finishes.
 */
import path from "node:path";
import { describe, expect, it } from "vitest";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { useDaemon } from "../support/daemon.js";
import { WireClient } from "../support/nbd-client.js";
import { pattern } from "../../testing/memory-backing.js";
import { cli, createSnapshot, makeFile } from "../support/udmd-tools.js";

const MiB = 1024 * 1024;
const SECTORS = (8 * MiB) / 512;

const env = useDaemon("udm-restore-");

async function io<T>(name: string, fn: (c: WireClient) => Promise<T>): Promise<T> {
  const client = await WireClient.connect(runPaths(env.dir).nbd, name);
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
  const m = /snapshot-merge (\d+)\/\d+ (\d+)/.exec(await cli(env.dir, "status", "base"));
  if (!m) throw new Error("base is not merging");
  return Number(m[1]) - Number(m[2]);
}

describe("udmd restarted after kill -9", () => {
  it("restores a stack with a merge in progress: tables, minors, data, and the merge finishes", async () => {
    const f = (n: string) => path.join(env.files, n);
    for (const n of ["d0", "d1"]) makeFile(f(n), 4 * MiB);
    const before = pattern(1, 8 * MiB);
    makeFile(f("origin.img"), before);
    for (const n of ["cow1", "cow2"]) makeFile(f(n), 8 * MiB);

    await cli(env.dir, "create", "stripe", "--table", `0 ${SECTORS} striped 2 64 ${f("d0")} 0 ${f("d1")} 0`);
    await cli(env.dir, "create", "lin", "--table", `0 ${SECTORS} linear /dev/mapper/stripe 0`, "-u", "UDM-lin");
    // Writes to the origin file are slowed, so that the merge is still running at the kill.
    await cli(
      env.dir,
      "create",
      "slow",
      "--table",
      `0 ${SECTORS} delay ${f("origin.img")} 0 0 ${f("origin.img")} 0 25`,
    );
    await cli(env.dir, "create", "base", "--table", `0 ${SECTORS} snapshot-origin /dev/mapper/slow`);
    await createSnapshot(env.dir, "base", "snap1", `0 ${SECTORS} snapshot /dev/mapper/slow ${f("cow1")} P 8`);
    // 48 scattered 4 KiB blocks change after snap1: the merge has that many chunks to copy back.
    const changed = Array.from({ length: 48 }, (_, i) => i * 37 * 4096);
    for (const at of changed) await write("base", at, pattern(2 + at, 4096));
    await createSnapshot(env.dir, "base", "snap2", `0 ${SECTORS} snapshot /dev/mapper/slow ${f("cow2")} P 16`);
    const atSnap2 = await read("base", 0, 8 * MiB);
    await write("lin", 12345 * 512, pattern(3, 65536));
    await cli(env.dir, "create", "spare", "--notable");
    await cli(env.dir, "suspend", "lin");

    // The merge of snap1 (docs/snapshot.md, "Merging a snapshot back").
    await cli(env.dir, "reload", "base", "--table", `0 ${SECTORS} snapshot-merge /dev/mapper/slow ${f("cow1")} P 8`);
    await cli(env.dir, "suspend", "snap1");
    await cli(env.dir, "resume", "base");
    await cli(env.dir, "remove", "snap1");
    const total = 48 * 8; // sectors: 48 chunks of 8
    expect(await mergeLeft()).toBeLessThanOrEqual(total);
    while ((await mergeLeft()) === total) await new Promise((r) => setTimeout(r, 20));
    const tables = await cli(env.dir, "table");
    const info = await cli(env.dir, "info", "-c", "--noheadings", "-o", "name,minor,attr,uuid");

    expect(await env.daemon.stop("SIGKILL")).toBe(null);
    await env.restart();
    expect(env.daemon.stderr()).toContain('"devices restored"');
    expect(await cli(env.dir, "table")).toBe(tables);
    expect(await cli(env.dir, "info", "-c", "--noheadings", "-o", "name,minor,attr,uuid")).toBe(info);

    await cli(env.dir, "resume", "lin");
    expect((await read("lin", 12345 * 512, 65536)).equals(pattern(3, 65536))).toBe(true);
    // The merge goes on from where the killed daemon left it, and finishes.
    const left = await mergeLeft();
    expect(left).toBeGreaterThan(0);
    expect(left).toBeLessThan(total);
    await cli(
      env.dir,
      "wait",
      "base",
      (await cli(env.dir, "info", "-c", "--noheadings", "-o", "events", "base")).trim(),
    );
    expect(await mergeLeft()).toBe(0);
    expect((await read("base", 0, 8 * MiB)).equals(before)).toBe(true);
    expect((await read("slow", 0, 8 * MiB)).equals(before)).toBe(true);
    expect((await read("snap2", 0, 8 * MiB)).equals(atSnap2)).toBe(true);
  }, 60_000);
});
