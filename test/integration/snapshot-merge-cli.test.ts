/**
 * snapshot-merge the way a user runs it: the built udmd and udmsetup (dist/) over plain files,
 * qemu-io and nbdcopy doing the I/O over NBD.
 *
 * - `udmsetup merge ORIGIN SNAPSHOT` does the LVM-style sequence (hand over, reload, resume),
 *   follows the merge (plain lines when stdout is not a terminal, a progress bar when it is) and
 *   ends with the origin's new snapshot-origin table;
 * - the documented sequence by hand (docs/snapshot.md): reload the origin with snapshot-merge,
 *   suspend the snapshot, resume the origin, `udmsetup wait`, check the status, reload as
 *   snapshot-origin.
 *
 * Tests whose tool is missing are skipped with a printed reason, unless UDM_REQUIRE_ROOT_TESTS=1
 * makes that a failure (as in snapshot-cli.test.ts).
 */
import fs from "node:fs";
import path from "node:path";
import { beforeEach, describe, expect, it } from "vitest";
import { readCowImage } from "../../targets/snapshot/cow-image.js";
import { UDMSETUP, udmsetup, useDaemon } from "../support/daemon.js";
import { cli } from "../support/udmd-tools.js";
import { pattern } from "../../testing/memory-backing.js";
import { missingTools } from "../support/requirements.js";
import { sh, which } from "../support/tools.js";

const MiB = 1024 * 1024;
const TOOLS = ["qemu-io", "nbdcopy"] as const;

const missing = missingTools("snapshot-merge CLI tests", TOOLS);
const haveScript = which("script") !== undefined;

const env = useDaemon("udm-mergecli-");
let originFile: string;
let cowFile: string;
const SECTORS = 16384; // 8 MiB

beforeEach(() => {
  originFile = path.join(env.files, "origin.img");
  cowFile = path.join(env.files, "cow.img");
  fs.writeFileSync(originFile, Buffer.concat([Buffer.alloc(MiB, 0x11), pattern(21, 7 * MiB)]));
  fs.writeFileSync(cowFile, "");
  fs.truncateSync(cowFile, 4 * MiB); // zero: a new store
});

/** udmsetup on this test's daemon, expecting success with nothing on stderr; returns stdout. */
const ok = (...args: string[]) => cli(env.dir, ...args);

const uri = (name: string) => `nbd+unix:///${name}?socket=${env.dir}/nbd.sock`;

/**
 * base (snapshot-origin) and snap (P 8), taken the documented way; then 1 MiB written to the
 * origin (256 chunks copied) and 512 KiB to the snapshot (128 chunks). Returns the snapshot's
 * content, read over NBD.
 */
async function snapshotWithChanges(): Promise<Buffer> {
  await ok("create", "base", "--table", `0 ${SECTORS} snapshot-origin ${originFile}`);
  await ok("suspend", "base");
  await ok("create", "snap", "--table", `0 ${SECTORS} snapshot ${originFile} ${cowFile} P 8`);
  await ok("resume", "base");
  await sh("qemu-io", "-f", "raw", uri("base"), "-c", "write -P 0xab 0 1M");
  await sh("qemu-io", "-f", "raw", uri("snap"), "-c", "write -P 0xcd 2M 512k");
  expect(await ok("status", "snap")).toBe(`0 ${SECTORS} snapshot ${(2 + 384 + 1) * 8}/8192 ${3 * 8}\n`);
  const copy = path.join(env.files, "snap-view.img");
  await sh("nbdcopy", uri("snap"), copy);
  const view = fs.readFileSync(copy);
  fs.rmSync(copy);
  const want = Buffer.concat([Buffer.alloc(MiB, 0x11), pattern(21, 7 * MiB)]);
  want.fill(0xcd, 2 * MiB, 2 * MiB + 512 * 1024);
  expect(view.equals(want)).toBe(true);
  return view;
}

describe.skipIf(missing.length > 0)("snapshot-merge through udmd and udmsetup", () => {
  it("udmsetup merge: hands over, reloads, resumes, prints progress lines and the origin's new table", async () => {
    const view = await snapshotWithChanges();
    const out = await ok("merge", "base", "snap");
    const lines = out.trimEnd().split("\n");
    expect(lines[0]).toBe("base: merging snap (384 chunks)");
    expect(lines[1]).toMatch(/^base: \d+% merged \(\d+ of 384 chunks left\)$/);
    expect(lines.slice(-3)).toEqual([
      "base: 100% merged (0 of 384 chunks left)",
      "base: merge complete",
      `0 ${SECTORS} snapshot-origin ${originFile}`,
    ]);
    // The snapshot device is gone, the origin is a plain snapshot-origin again and holds the snapshot's data.
    expect(await ok("ls")).toMatch(/^base\t\(253:\d+\)\n$/);
    expect(await ok("table", "base")).toBe(`0 ${SECTORS} snapshot-origin ${originFile}\n`);
    expect(fs.readFileSync(originFile).equals(view)).toBe(true);
    const copy = path.join(env.files, "base.img");
    await sh("nbdcopy", uri("base"), copy);
    expect(fs.readFileSync(copy).equals(view)).toBe(true);
    // Every record was merged and cleared on disk; the header stays valid.
    const img = await readCowImage(fs.readFileSync(cowFile));
    expect([img.state, img.records.length]).toEqual(["valid", 0]);
  });

  it("the documented sequence by hand: reload, suspend, resume, wait, status, reload as snapshot-origin", async () => {
    const view = await snapshotWithChanges();
    expect(await ok("info", "-c", "-o", "name,events", "--noheadings", "base")).toBe("base:0\n");
    await ok("reload", "base", "--table", `0 ${SECTORS} snapshot-merge ${originFile} ${cowFile} P 8`);
    await ok("suspend", "snap");
    await ok("resume", "base");
    await ok("wait", "base", "0"); // the merge raises the device's event when it is done
    expect(await ok("status", "base")).toBe(`0 ${SECTORS} snapshot-merge 16/8192 16\n`);
    expect(await ok("status", "snap")).toBe(`0 ${SECTORS} snapshot Invalid\n`);
    expect(await ok("info", "-c", "-o", "name,events", "--noheadings", "base")).toBe("base:1\n");
    expect(fs.readFileSync(originFile).equals(view)).toBe(true);
    await ok("reload", "base", "--table", `0 ${SECTORS} snapshot-origin ${originFile}`);
    await ok("resume", "base");
    await ok("remove", "snap");
    const copy = path.join(env.files, "base.img");
    await sh("nbdcopy", uri("base"), copy);
    expect(fs.readFileSync(copy).equals(view)).toBe(true);
  });

  it("refusals: not a snapshot-origin, not a snapshot, a second table on the merging COW", async () => {
    await snapshotWithChanges();
    let r = await udmsetup(env.dir, ["merge", "base", "base"]);
    expect([r.code, r.stderr]).toEqual([1, "base: not a snapshot device\nCommand failed.\n"]);
    await ok("create", "other", "--table", `0 ${SECTORS} zero`);
    r = await udmsetup(env.dir, ["merge", "other", "snap"]);
    expect([r.code, r.stderr]).toEqual([1, "other: not a snapshot-origin device\nCommand failed.\n"]);
    // A second snapshot-merge table on the same COW while the first waits to be resumed.
    await ok("reload", "base", "--table", `0 ${SECTORS} snapshot-merge ${originFile} ${cowFile} P 8`);
    r = await udmsetup(env.dir, [
      "reload",
      "other",
      "--table",
      `0 ${SECTORS} snapshot-merge ${originFile} ${cowFile} P 8`,
    ]);
    expect([r.code, r.stderr]).toEqual([
      1,
      "snapshot-merge: Snapshot cow pairing for exception table handover failed\ndevice-mapper: reload ioctl on other  failed: Invalid argument\nCommand failed.\n",
    ]);
    await ok("clear", "base");
    expect(await ok("table", "base")).toBe(`0 ${SECTORS} snapshot-origin ${originFile}\n`);
  });

  it.skipIf(!haveScript)("on a terminal: a progress bar redrawn in place, then the table", async () => {
    const view = await snapshotWithChanges();
    // script(1) runs udmsetup on a pseudo-terminal.
    const cmd = [process.execPath, UDMSETUP, "--run-dir", env.dir, "--no-autostart", "merge", "base", "snap"]
      .map((a) => `'${a}'`)
      .join(" ");
    const out = (await sh("script", "-qec", cmd, "/dev/null")).replace(/\r\n/g, "\n");
    expect(out).toMatch(/^\rbase: merging \[[#-]{30}\] +\d+% \(\d+\/384 chunks\)/);
    expect(out).toContain(
      `\rbase: merging [${"#".repeat(30)}] 100% (384/384 chunks)\n0 ${SECTORS} snapshot-origin ${originFile}\n`,
    );
    expect(out).not.toContain("merge complete");
    expect(fs.readFileSync(originFile).equals(view)).toBe(true);
  });
});
