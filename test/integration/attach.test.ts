/**
 * `udmsetup attach` / `detach` and `udmd --auto-attach` against a real udmd: a linear device over
 * a sparse file becomes a kernel block device (here nbdfuse + a loop device; /dev/nbdN where the
 * kernel has nbd), gets an ext4 filesystem and a mount, and the filesystem is then checked in the
 * backing file. Needs root, /dev/fuse, nbdfuse and e2fsprogs; otherwise skipped with a printed
 * reason, unless UDM_REQUIRE_ROOT_TESTS=1 makes that a failure.
 * Cleanup (test/support/attach-env.ts) checks that nothing of an attachment is left.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { attachedDevicePattern, MiB, useAttachEnv } from "../support/attach-env.js";
import { rootUnavailableReason, skipOrFail } from "../support/requirements.js";
import { pidsOf } from "../support/system-state.js";
import { sh } from "../support/tools.js";

const SUITE = "attach tests";
const skipReason = rootUnavailableReason(["mkfs.ext4", "e2fsck", "debugfs"]);
skipOrFail(SUITE, skipReason);

describe.skipIf(skipReason !== null)("udmsetup attach / detach", () => {
  const env = useAttachEnv("udm-attach-");
  const run = env.run;

  it("rename moves the symlink to the new name; detach and remove work under it", async () => {
    process.env.UDM_DEV_DIR = env.devDir;
    await env.start();
    expect(await run("create", env.name, "--table", `0 ${(64 * MiB) / 512} linear ${env.img} 0`)).toMatchObject({
      code: 0,
    });
    const dev = (await run("attach", env.name)).stdout.trim();
    const renamed = `${env.name}r`;
    expect(await run("rename", env.name, renamed)).toMatchObject({ code: 0 });
    expect(fs.readlinkSync(path.join(env.devDir, renamed))).toBe(dev);
    expect(fs.existsSync(path.join(env.devDir, env.name))).toBe(false);
    expect(JSON.parse((await run("--json", "info", renamed)).stdout).attached).toBe(dev);
    expect(await run("remove", renamed)).toMatchObject({ code: 1, stderr: expect.stringContaining("attached") });
    expect(await run("detach", renamed)).toMatchObject({ code: 0, stderr: "" });
    expect(fs.existsSync(path.join(env.devDir, renamed))).toBe(false);
    expect(await run("remove", renamed)).toMatchObject({ code: 0 });
  });

  it("attach prints a device for mkfs and mount; detach refuses while mounted; the data lands in the backing file", async () => {
    process.env.UDM_DEV_DIR = env.devDir;
    await env.start();
    expect(await run("create", env.name, "--table", `0 ${(64 * MiB) / 512} linear ${env.img} 0`)).toMatchObject({
      code: 0,
    });

    const attached = await run("attach", env.name);
    expect(attached).toMatchObject({ code: 0, stderr: "" });
    const dev = attached.stdout.trim();
    expect(dev).toMatch(attachedDevicePattern);
    const link = path.join(env.devDir, env.name);
    expect(fs.readlinkSync(link)).toBe(dev);
    expect(fs.statSync(env.devDir).mode & 0o777).toBe(0o755);
    expect(JSON.parse((await run("--json", "info", env.name)).stdout).attached).toBe(dev);
    expect((await run("attach", env.name)).stdout).toBe(`${dev}\n`); // again: same device

    await sh("mkfs.ext4", "-q", link);
    await sh("mount", link, env.mnt);
    const text = "written through udm\n";
    const blob = Buffer.alloc(3 * MiB + 512);
    for (let i = 0; i < blob.length; i++) blob[i] = (i * 31 + (i >> 9)) & 0xff;
    fs.writeFileSync(path.join(env.mnt, "hello.txt"), text);
    fs.writeFileSync(path.join(env.mnt, "blob.bin"), blob);
    await sh("sync");

    const busy = await run("detach", env.name);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toContain(`is mounted on ${env.mnt}`);
    expect(busy.stderr).toContain(`device-mapper: detach ioctl on ${env.name}  failed: Device or resource busy\n`);
    expect(fs.readlinkSync(link)).toBe(dev);

    await sh("umount", env.mnt);
    expect(await run("detach", env.name)).toEqual({ code: 0, stdout: "", stderr: "" });
    expect(fs.existsSync(link)).toBe(false);
    expect(JSON.parse((await run("--json", "info", env.name)).stdout).attached).toBeUndefined();
    expect(env.loops()).toEqual([]);
    expect(fs.readdirSync(env.runDir).sort()).toEqual([
      "attach.sock",
      "control",
      "devices.json",
      "nbd.sock",
      "udmd.lock",
      "udmd.pid",
    ]); // fuse/ is gone
    expect(await run("remove", env.name)).toMatchObject({ code: 0 });

    // The filesystem, read from the backing file without udm.
    await sh("e2fsck", "-fn", env.img);
    expect(await sh("debugfs", "-R", "cat /hello.txt", env.img)).toBe(text);
    const dumped = path.join(env.files, "blob.out");
    await sh("debugfs", "-R", `dump /blob.bin ${dumped}`, env.img);
    expect(fs.readFileSync(dumped).equals(blob)).toBe(true);
  }, 60_000);

  it("a device attached when udmd was killed is attached again by the next udmd; nothing of the old attachment is left", async () => {
    process.env.UDM_DEV_DIR = env.devDir;
    await env.start();
    expect(await run("create", env.name, "--table", `0 ${(64 * MiB) / 512} linear ${env.img} 0`)).toMatchObject({
      code: 0,
    });
    expect((await run("attach", env.name)).code).toBe(0);
    const link = path.join(env.devDir, env.name);
    await sh("mkfs.ext4", "-q", link);

    expect(await env.daemon!.stop("SIGKILL")).toBe(null);
    await env.start();
    const dev = JSON.parse((await run("--json", "info", env.name)).stdout).attached as string | undefined;
    expect(dev).toMatch(attachedDevicePattern);
    expect(fs.readlinkSync(link)).toBe(dev);
    // One nbdfuse and one loop device: the new daemon's; the killed daemon's are gone.
    expect(pidsOf("nbdfuse", env.runDir)).toHaveLength(attachedDevicePattern.source.includes("nbd") ? 0 : 1);
    expect(env.loops()).toEqual(attachedDevicePattern.source.includes("nbd") ? [] : [dev]);
    // The filesystem made through the old attachment is there through the new one.
    await sh("mount", link, env.mnt);
    await sh("umount", env.mnt);
  });

  it("remove refuses while attached, and remove --force detaches first", async () => {
    await env.start(["--dev-dir", env.devDir]);
    await run("create", env.name, "--table", `0 2048 linear ${env.img} 0`);
    const dev = (await run("attach", env.name)).stdout.trim();
    expect(dev).toMatch(attachedDevicePattern);
    const refused = await run("remove", env.name);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain(`${env.name}: attached as ${dev} (detach it first)\n`);
    // udmsetup -U/-G/-M change the node; the next device bound to it must not inherit that.
    const before = fs.statSync(dev);
    fs.chmodSync(dev, 0o666);
    fs.chownSync(dev, 4321, 4321);
    expect(await run("remove", "--force", env.name)).toMatchObject({ code: 0 });
    const after = fs.statSync(dev);
    expect([after.uid, after.gid, after.mode & 0o7777]).toEqual([before.uid, before.gid, before.mode & 0o7777]);
    expect(fs.existsSync(path.join(env.devDir, env.name))).toBe(false);
    expect(env.loops()).toEqual([]);
    expect((await run("ls")).stdout).toBe("No devices found\n");
  });

  it.each([
    ["udmd --auto-attach", ["--auto-attach"], {}],
    ["UDM_AUTO_ATTACH=1", [], { UDM_AUTO_ATTACH: "1" }],
  ])("%s: create attaches, remove detaches", async (_label, args, vars) => {
    Object.assign(process.env, vars, { UDM_DEV_DIR: env.devDir });
    await env.start(args);
    const link = path.join(env.devDir, env.name);
    expect(await run("create", env.name, "--table", `0 2048 linear ${env.img} 0`)).toMatchObject({ code: 0 });
    expect(fs.readlinkSync(link)).toMatch(attachedDevicePattern);
    expect(fs.statSync(link).isBlockDevice()).toBe(true);
    expect(fs.readFileSync(`/sys/block/${path.basename(fs.readlinkSync(link))}/size`, "utf8")).toBe("2048\n");
    expect(await run("remove", env.name)).toEqual({ code: 0, stdout: "", stderr: "" });
    expect(fs.existsSync(link)).toBe(false);
    expect(env.loops()).toEqual([]);
  });
});
