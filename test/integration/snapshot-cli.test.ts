/**
 * Snapshots the way a user takes them: the built udmd and udmsetup over plain files, with real NBD
 * clients (qemu-io, nbdcopy) doing the I/O. The documented sequence (docs/snapshot.md): zero the
 * start of the COW file, suspend the origin, create the snapshot, resume the origin. Then origin
 * writes over NBD leave the snapshot's data as it was, `udmsetup status` prints the kernel's
 * `<allocated>/<total> <metadata>` lines, and the COW file survives a daemon restart.
 *
 * Tests whose tool is missing are skipped with a printed reason, unless UDM_REQUIRE_ROOT_TESTS=1
 * makes that a failure (as in nbd.test.ts).
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { useDaemon } from "../support/daemon.js";
import { cli } from "../support/udmd-tools.js";
import { pattern } from "../../testing/memory-backing.js";
import { missingTools } from "../support/requirements.js";
import { sh } from "../support/tools.js";

const MiB = 1024 * 1024;
const TOOLS = ["qemu-io", "nbdcopy"] as const;

const missing = missingTools("snapshot CLI tests", TOOLS);

const env = useDaemon("udm-snapcli-");

/** udmsetup on this test's daemon, expecting success with nothing on stderr; returns stdout. */
const ok = (...args: string[]) => cli(env.dir, ...args);

const uri = (name: string) => `nbd+unix:///${name}?socket=${env.dir}/nbd.sock`;

describe.skipIf(missing.length > 0)("snapshots through udmd, udmsetup and NBD", () => {
  it("origin writes over NBD leave the snapshot's data as it was; status lines are the kernel's; the COW survives a restart", async () => {
    const originFile = path.join(env.files, "origin.img");
    const cowFile = path.join(env.files, "cow.img");
    // 16384 sectors: 1 MiB of 0x11 (so qemu-io can check it with read -P), then varied bytes.
    const originData = Buffer.concat([Buffer.alloc(MiB, 0x11), pattern(11, 7 * MiB)]);
    fs.writeFileSync(originFile, originData);
    fs.writeFileSync(cowFile, "");
    fs.truncateSync(cowFile, 4 * MiB); // 8192 sectors
    // Step 1: the COW device must start with zeros (a new store), at least its first chunk.
    const fd = fs.openSync(cowFile, "r+");
    fs.writeSync(fd, Buffer.alloc(4096), 0, 4096, 0);
    fs.closeSync(fd);

    await ok("create", "base", "--table", `0 16384 snapshot-origin ${originFile}`);
    // Steps 2–4: suspend the origin, create the snapshot, resume the origin.
    await ok("suspend", "base");
    await ok("create", "snap", "--table", `0 16384 snapshot ${originFile} ${cowFile} P 8`);
    await ok("resume", "base");
    expect(await ok("status", "snap")).toBe("0 16384 snapshot 16/8192 16\n");

    // 64 KiB over NBD at the start of the origin: 16 chunks copied first.
    expect(await sh("qemu-io", "-f", "raw", uri("base"), "-c", "write -P 0xab 0 64k")).toMatch(
      /wrote 65536\/65536 bytes/,
    );
    expect(await ok("status", "snap")).toBe(`0 16384 snapshot ${(2 + 16) * 8}/8192 16\n`);
    expect(
      fs
        .readFileSync(originFile)
        .subarray(0, 65536)
        .every((b) => b === 0xab),
    ).toBe(true);

    // The snapshot still reads the old data: a range with qemu-io's pattern check, everything with nbdcopy.
    expect(await sh("qemu-io", "-r", "-f", "raw", uri("snap"), "-c", "read -P 0x11 0 64k")).toMatch(
      /read 65536\/65536 bytes/,
    );
    const copy = path.join(env.files, "snap.img");
    await sh("nbdcopy", uri("snap"), copy);
    expect(fs.readFileSync(copy).equals(originData)).toBe(true);
    // Rewriting chunks the snapshot already has copies nothing more.
    await sh("qemu-io", "-f", "raw", uri("base"), "-c", "write -P 0x5a 0 64k");
    expect(await ok("status", "snap")).toBe(`0 16384 snapshot ${(2 + 16) * 8}/8192 16\n`);
    await sh("qemu-io", "-f", "raw", uri("base"), "-c", "write -P 0x5a 1M 64k");
    await sh("nbdcopy", uri("snap"), copy);
    expect(fs.readFileSync(copy).equals(originData)).toBe(true);

    // A write to the snapshot goes to the COW file and leaves the origin alone.
    const out = await sh("qemu-io", "-f", "raw", uri("snap"), "-c", "write -P 0xcd 2M 8k", "-c", "read -P 0xcd 2M 8k");
    expect(out).toMatch(/read 8192\/8192 bytes/);
    expect(
      fs
        .readFileSync(originFile)
        .subarray(2 * MiB, 2 * MiB + 8192)
        .equals(originData.subarray(2 * MiB, 2 * MiB + 8192)),
    ).toBe(true);
    const allocated = (2 + 16 + 16 + 2) * 8;
    expect(await ok("status")).toBe(`base: 0 16384 snapshot-origin \nsnap: 0 16384 snapshot ${allocated}/8192 16\n`);
    expect(await ok("table", "snap")).toBe(`0 16384 snapshot ${originFile} ${cowFile} P 8\n`);
    const targets = await ok("targets");
    expect(targets.split("\n")).toEqual(
      expect.arrayContaining(["snapshot-origin  v1.9.0", "snapshot         v1.16.0"]),
    );

    // The COW file is a kernel-format image: "SnAp", valid, version 1, chunk size 8.
    const header = fs.readFileSync(cowFile).subarray(0, 16).toString("hex");
    expect(header).toBe("536e4170" + "01000000" + "01000000" + "08000000");

    // Restart the daemon and re-activate: the chunk size comes from the header (P 0).
    await ok("remove", "snap");
    await ok("remove", "base");
    await env.restart();
    await ok("create", "base", "--table", `0 16384 snapshot-origin ${originFile}`);
    await ok("suspend", "base");
    await ok("create", "snap", "--table", `0 16384 snapshot ${originFile} ${cowFile} P 0`);
    await ok("resume", "base");
    expect(await ok("table", "snap")).toBe(`0 16384 snapshot ${originFile} ${cowFile} P 8\n`);
    expect(await ok("status", "snap")).toBe(`0 16384 snapshot ${allocated}/8192 16\n`);
    await sh("nbdcopy", uri("snap"), copy);
    const expected = Buffer.from(originData);
    expected.fill(0xcd, 2 * MiB, 2 * MiB + 8192);
    expect(fs.readFileSync(copy).equals(expected)).toBe(true);
  });

  it("a full COW file invalidates the snapshot: status Invalid, the origin keeps taking writes", async () => {
    const originFile = path.join(env.files, "origin.img");
    const cowFile = path.join(env.files, "cow.img");
    fs.writeFileSync(originFile, Buffer.alloc(4 * MiB, 0x22));
    fs.writeFileSync(cowFile, Buffer.alloc(32 * 4096)); // header + area 0 + 30 data chunks
    await ok("create", "base", "--table", `0 8192 snapshot-origin ${originFile}`);
    await ok("suspend", "base");
    await ok("create", "snap", "--table", `0 8192 snapshot ${originFile} ${cowFile} P 8`);
    await ok("resume", "base");
    const out = await sh(
      "qemu-io",
      "-f",
      "raw",
      uri("base"),
      "-c",
      "write -P 0x33 0 256k",
      "-c",
      "read -P 0x33 0 256k",
    );
    expect(out).toMatch(/read 262144\/262144 bytes/);
    expect(await ok("status", "snap")).toBe("0 8192 snapshot Invalid\n");
    expect(await ok("info", "snap")).toMatch(/^Event number: +1$/m); // the invalidation raised an event
    expect(fs.readFileSync(cowFile).subarray(0, 16).toString("hex")).toBe(
      "536e4170" + "00000000" + "01000000" + "08000000",
    );
  });
});
