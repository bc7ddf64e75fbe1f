/**
 * Thin provisioning the way a user drives it: the built udmd and udmsetup over plain files, with
 * qemu-io doing I/O over NBD. `udmsetup targets` lists thin-pool and thin with the kernel's
 * version; a pool is created on a metadata file and a data file, `udmsetup message` creates a thin
 * volume and a snapshot of it (the origin suspended around it, as with the kernel), writes and
 * reads go through both, `udmsetup status` prints the kernel's lines, crossing the low water mark
 * raises one event (`udmsetup wait` returns, `info` counts it), a reload grows the pool to its
 * grown data file, and after everything is
 * removed the metadata file passes thin_check and thin_dump shows the mappings.
 *
 * Tests whose tool is missing are skipped with a printed reason, unless UDM_REQUIRE_ROOT_TESTS=1
 * makes that a failure.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { udmsetup, useDaemon } from "../support/daemon.js";
import { cli, makeFile } from "../support/udmd-tools.js";
import { missingTools } from "../support/requirements.js";
import { sh, toolOk } from "../support/tools.js";

const MiB = 1024 * 1024;
const TOOLS = ["qemu-io", "thin_check", "thin_dump"] as const;
const missing = missingTools("thin CLI tests", TOOLS);

const env = useDaemon("udm-thincli-");
const ok = (...args: string[]) => cli(env.dir, ...args);
const uri = (name: string) => `nbd+unix:///${name}?socket=${env.dir}/nbd.sock`;
const qemuIo = (name: string, ...cmds: string[]) =>
  sh("qemu-io", "-f", "raw", uri(name), ...cmds.flatMap((c) => ["-c", c]));

describe("thin targets in udmsetup targets", () => {
  it("lists thin and thin-pool with the kernel's version, newest first", async () => {
    const out = await ok("targets");
    expect(out.startsWith("thin             v1.23.0\nthin-pool        v1.23.0\nlog-writes ")).toBe(true);
  });
});

describe.skipIf(missing.length > 0)("thin pools through udmd, udmsetup and NBD", () => {
  it("creates a pool, a thin volume and a snapshot by messages; I/O and status lines; everything removed; thin_check passes", async () => {
    const meta = makeFile(path.join(env.files, "meta.img"), 4 * MiB); // 1024 metadata blocks
    const data = makeFile(path.join(env.files, "data.img"), 64 * MiB); // 1024 data blocks of 64 KiB
    // Low water mark 1010 blocks: the 15th allocation finds 1010 free and raises the event.
    await ok("create", "pool", "--table", `0 131072 thin-pool ${meta} ${data} 128 1010`);
    expect(await ok("table", "pool")).toBe(`0 131072 thin-pool ${meta} ${data} 128 1010 0 \n`);
    // The metadata low water mark: a quarter of 1024 blocks.
    expect(await ok("status", "pool")).toMatch(
      /^0 131072 thin-pool 0 \d+\/1024 0\/1024 - rw discard_passdown queue_if_no_space - 256 \n$/,
    );

    await ok("message", "pool", "0", "create_thin", "1");
    // A volume larger than the pool: 100 MiB over 64 MiB of data.
    await ok("create", "vol", "--table", "0 204800 thin /dev/mapper/pool 1");
    expect(await ok("status", "vol")).toBe("0 204800 thin 0 -\n");
    expect(await ok("info", "pool")).toMatch(/^Event number: +0$/m);
    // udmsetup wait returns once the pool's event number moves past 0.
    const waiting = ok("wait", "pool", "0");
    expect(await qemuIo("vol", "write -P 0xab 0 1M")).toMatch(/wrote 1048576\/1048576 bytes/);
    await waiting;
    expect(await ok("info", "pool")).toMatch(/^Event number: +1$/m);
    expect(await ok("status", "vol")).toBe("0 204800 thin 2048 2047\n");
    expect(await ok("status", "pool")).toMatch(/ 16\/1024 - rw /);

    // A snapshot: the origin is suspended around the message, as with the kernel.
    await ok("suspend", "vol");
    await ok("message", "pool", "0", "create_snap", "2", "1");
    await ok("resume", "vol");
    await ok("create", "snap", "--table", "0 204800 thin /dev/mapper/pool 2");
    expect(await ok("status", "snap")).toBe("0 204800 thin 2048 2047\n");
    // One write to the origin breaks the sharing of one block: one more data block.
    await qemuIo("vol", "write -P 0xcd 0 64k");
    expect(await ok("status", "pool")).toMatch(/ 17\/1024 - rw /);
    expect(await qemuIo("snap", "read -P 0xab 0 1M")).toMatch(/read 1048576\/1048576 bytes/);
    const volRead = await qemuIo("vol", "read -P 0xcd 0 64k", "read -P 0xab 64k 960k", "read -P 0 1M 1M");
    expect(volRead).not.toMatch(/Pattern verification failed/);
    expect(volRead.match(/^read \d+\/\d+ bytes/gm)).toHaveLength(3);

    await ok("message", "pool", "0", "set_transaction_id", "0", "1");
    expect(await ok("status", "pool")).toMatch(/^0 131072 thin-pool 1 /);
    // The data file grows; a reload reads its size again and the pool grows to it.
    fs.truncateSync(data, 128 * MiB);
    await ok("reload", "pool", "--table", `0 262144 thin-pool ${meta} ${data} 128 1010`);
    await ok("resume", "pool");
    expect(await ok("status", "pool")).toMatch(/^0 262144 thin-pool 1 \d+\/1024 17\/2048 - rw /);
    // An open thin device cannot be deleted.
    const busy = await udmsetup(env.dir, ["message", "pool", "0", "delete", "2"]);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toMatch(/Device or resource busy/);
    await ok("remove", "snap");
    await ok("message", "pool", "0", "delete", "2");
    await ok("remove", "vol");
    await ok("remove", "pool");
    expect(await ok("ls")).toBe("No devices found\n");

    await toolOk("thin_check", [meta]);
    const dump = await sh("thin_dump", meta);
    expect(dump).toMatch(
      /<superblock uuid="" time="1" transaction="1" [^>]*data_block_size="128" nr_data_blocks="2048">/,
    );
    expect(dump).not.toMatch(/dev_id="2"/);
    expect(dump).toMatch(/<device dev_id="1" mapped_blocks="16" /);
    // The origin's block 0 moved to a new data block; blocks 1..15 are where the first write put them.
    const origin0 = /<single_mapping origin_block="0" data_block="(\d+)" time="1"\/>/.exec(dump);
    expect(origin0).not.toBeNull();
    const dataFile = fs.readFileSync(data);
    const at = Number(origin0![1]) * 64 * 1024;
    expect(dataFile.subarray(at, at + 64 * 1024).every((b) => b === 0xcd)).toBe(true);
    // About thirty udmsetup and qemu-io runs, a second each on a loaded machine.
  }, 120_000);
});
