/**
 * A backing file system that runs out of space (a 1 MiB tmpfs under sparse files), as an
 * adversarial user would arrange it (issue 16): writes that do not fit fail with ENOSPC over NBD,
 * every acknowledged write is there, a snapshot whose COW device fills is invalidated while its
 * origin goes on, and the daemon keeps answering.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { NbdErrno } from "../../nbd/protocol.js";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { type RunningDaemon, startDaemon, tempDir } from "../support/daemon.js";
import { WireClient } from "../support/nbd-client.js";
import { pattern } from "../../testing/memory-backing.js";
import { rootUnavailableReason, skipOrFail } from "../support/requirements.js";
import { cli, createSnapshot, makeFile } from "../support/udmd-tools.js";

const MiB = 1024 * 1024;
const skipReason = rootUnavailableReason([]);
skipOrFail("ENOSPC tests", skipReason);

describe.skipIf(skipReason !== null)("a backing file system that fills up", () => {
  let dir: string;
  let files: string;
  let small: string;
  let daemon: RunningDaemon | undefined;

  afterEach(async () => {
    await daemon?.stop();
    daemon = undefined;
    execFileSync("umount", ["-l", small]);
    for (const d of [dir, files]) fs.rmSync(d, { recursive: true, force: true });
  });

  async function setUp(): Promise<void> {
    dir = tempDir();
    files = tempDir("udm-enospc-");
    small = path.join(files, "small");
    fs.mkdirSync(small);
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=1M", "udm-enospc", small]);
    daemon = await startDaemon(dir);
  }

  it("origin writes past the space fail with ENOSPC; the acknowledged ones are all there", async () => {
    await setUp();
    makeFile(path.join(small, "origin.img"), 4 * MiB); // sparse: only 1 MiB can ever be written
    await cli(dir, "create", "base", "--table", `0 8192 linear ${path.join(small, "origin.img")} 0`);
    const client = await WireClient.connect(runPaths(dir).nbd, "base");
    const acked: number[] = [];
    let nospace = 0;
    for (let block = 0; block < 64; block++) {
      const r = await client.write(block * 65536, pattern(block, 65536), 1 /* FUA */);
      if (r.error === 0) acked.push(block);
      else {
        expect(r.error).toBe(NbdErrno.ENOSPC);
        nospace++;
      }
    }
    expect(acked.length).toBeGreaterThan(0);
    expect(nospace).toBeGreaterThan(0);
    for (const block of acked) {
      const r = await client.read(block * 65536, 65536);
      expect(r.data!.equals(pattern(block, 65536)), `block ${block}`).toBe(true);
    }
    await client.disconnect();
    console.log(`enospc: origin: ${acked.length} writes acknowledged, ${nospace} refused with ENOSPC, 0 lost`);
    expect(await cli(dir, "ls")).toBe("base\t(253:0)\n");
  });

  it("a snapshot whose COW file system fills is invalidated; the origin takes every write", async () => {
    await setUp();
    const origin = makeFile(path.join(files, "origin.img"), 4 * MiB);
    const cow = makeFile(path.join(small, "cow.img"), 4 * MiB);
    await cli(dir, "create", "base", "--table", `0 8192 snapshot-origin ${origin}`);
    await createSnapshot(dir, "base", "snap", `0 8192 snapshot ${origin} ${cow} P 8`);
    const client = await WireClient.connect(runPaths(dir).nbd, "base");
    for (let block = 0; block < 64; block++) {
      expect((await client.write(block * 65536, pattern(100 + block, 65536))).error, `block ${block}`).toBe(0);
    }
    expect((await client.flush()).error).toBe(0);
    for (let block = 0; block < 64; block++) {
      const r = await client.read(block * 65536, 65536);
      expect(r.data!.equals(pattern(100 + block, 65536)), `block ${block}`).toBe(true);
    }
    await client.disconnect();
    expect(await cli(dir, "status", "snap")).toBe("0 8192 snapshot Invalid\n");
    console.log("enospc: snapshot: COW full on a 1 MiB tmpfs, snapshot Invalid, 64 origin writes acknowledged, 0 lost");
  });
});
