/**
 * A reload (suspend, load, resume through udmsetup) while real NBD clients stream verified writes
 * and reads through udmd: no client error, no lost write.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { udmsetup, useDaemon } from "../support/daemon.js";
import { missingTools } from "../support/requirements.js";
import { toolOk } from "../support/tools.js";

const missing = missingTools("reload-under-io", ["qemu-io"]);

const env = useDaemon("udm-reload-");

describe.skipIf(missing.length > 0)("reload under NBD load", () => {
  it("clients see no error and every write lands while the table is swapped repeatedly", async () => {
    const disk = path.join(env.files, "disk.img");
    fs.writeFileSync(disk, "");
    fs.truncateSync(disk, 16 * 1024 * 1024);
    const table = `0 32768 linear ${disk} 0`;
    expect((await udmsetup(env.dir, ["create", "vol", "--table", table])).code).toBe(0);
    const uri = `nbd+unix:///vol?socket=${env.dir}/nbd.sock`;

    // Three clients, each writing then verifying 128 x 4 KiB patterns in its own 4 MiB region.
    const clients = [0, 1, 2].map((c) => {
      const cmds: string[] = [];
      const at = (i: number) => c * 4 * 1048576 + i * 4096;
      for (let i = 0; i < 128; i++) cmds.push("-c", `write -P ${(c * 128 + i) % 251} ${at(i)} 4k`);
      for (let i = 0; i < 128; i++) cmds.push("-c", `read -P ${(c * 128 + i) % 251} ${at(i)} 4k`);
      return toolOk("qemu-io", ["-f", "raw", uri, ...cmds]);
    });
    let reloads = 0;
    const reloading = (async () => {
      for (let i = 0; i < 8; i++) {
        for (const args of [
          ["suspend", "vol"],
          ["reload", "vol", "--table", table],
          ["resume", "vol"],
        ]) {
          const r = await udmsetup(env.dir, args);
          expect(r.stderr).toBe("");
        }
        reloads++;
      }
    })();
    const results = await Promise.all(clients);
    await reloading;
    expect(reloads).toBe(8);
    for (const { stdout, stderr } of results) {
      expect(stderr).toBe("");
      expect(stdout).not.toMatch(/fail|error|Pattern verification/i);
      expect(stdout.match(/^wrote 4096\/4096/gm)).toHaveLength(128);
      expect(stdout.match(/^read 4096\/4096/gm)).toHaveLength(128);
    }
    // Every write is in the backing file.
    const data = fs.readFileSync(disk);
    for (let c = 0; c < 3; c++) {
      for (let i = 0; i < 128; i++) {
        const off = c * 4 * 1048576 + i * 4096;
        expect(data.subarray(off, off + 4096).every((b) => b === (c * 128 + i) % 251)).toBe(true);
      }
    }
    expect((await udmsetup(env.dir, ["info", "-c", "--noheadings", "-o", "name,attr,open", "vol"])).stdout).toBe(
      "vol:L--w:0\n",
    );
  });
});
