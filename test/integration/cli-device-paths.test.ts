/**
 * A device named by a path, as dmsetup takes one wherever a device name goes (libdm-common.c:
 * dm_task_set_name): `/dev/mapper/NAME` (here $UDM_DEV_DIR/NAME) names NAME, whether or not the
 * device is attached; a node elsewhere names the device whose link in the device directory is the
 * same block device; anything else is "Device PATH not found". xfstests' thin tests send their
 * pool messages as `dmsetup message /dev/mapper/POOL 0 create_thin N`.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { udmsetup, useDaemon } from "../support/daemon.js";
import { cli } from "../support/udmd-tools.js";

const env = useDaemon("udm-devpaths-");

/** Some block device node in /dev, for the link-by-device-number case. */
function someBlockDevice(): string | null {
  for (const name of fs.readdirSync("/dev").sort()) {
    const p = path.join("/dev", name);
    try {
      if (fs.statSync(p).isBlockDevice()) return p;
    } catch {
      // vanished, or not ours to stat
    }
  }
  return null;
}

describe("device names given as paths", () => {
  it("DEV_DIR/NAME names NAME; a path to the same block device names the device linked to it; others are not found", async () => {
    const devDir = path.join(env.files, "dev");
    fs.mkdirSync(devDir, { recursive: true });
    const run = (...args: string[]) => udmsetup(env.dir, args, undefined, { UDM_DEV_DIR: devDir });
    await cli(env.dir, "create", "zeros", "--table", "0 8 zero");

    // Not attached: no node, the last component is the name.
    let r = await run("status", path.join(devDir, "zeros"));
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe("0 8 zero \n");
    r = await run("message", path.join(devDir, "zeros"), "0", "hello");
    expect(r.stderr).toContain("message ioctl on"); // zero takes no messages: it got this far
    expect(r.stderr).not.toContain("not found");

    // Elsewhere and not a block device: libdm's words.
    const elsewhere = path.join(env.files, "zeros");
    fs.writeFileSync(elsewhere, "");
    r = await run("info", elsewhere);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`Device ${elsewhere} not found\nCommand failed.\n`);
    r = await run("info", "/nonexistent/zeros");
    expect(r.stderr).toBe("Device /nonexistent/zeros not found\nCommand failed.\n");

    // A node that is the block device DEV_DIR/zeros links to names "zeros", whatever it is called.
    const block = someBlockDevice();
    if (block === null) {
      console.warn("device paths: no block device node in /dev; the device-number case is not checked");
      return;
    }
    fs.symlinkSync(block, path.join(devDir, "zeros"));
    r = await run("status", block);
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe("0 8 zero \n");
    fs.unlinkSync(path.join(devDir, "zeros"));
    fs.symlinkSync(block, path.join(devDir, "other-name"));
    await cli(env.dir, "create", "other-name", "--table", "0 16 zero");
    r = await run("status", block);
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe("0 16 zero \n");
  });
});
