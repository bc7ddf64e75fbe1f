/**
 * `udmsetup attach` / `detach` and `udmd --auto-attach` against a real udmd: a linear device over
 * a sparse file becomes a kernel block device (here nbdfuse + a loop device; /dev/nbdN where the
 * kernel has nbd), gets an ext4 filesystem and a mount, and the filesystem is then checked in the
 * backing file. Needs root, /dev/fuse, nbdfuse and e2fsprogs; otherwise skipped with a printed
 * reason, unless UDM_REQUIRE_ROOT_TESTS=1 makes that a failure.
 *
 * Cleanup runs whatever happened: mounts, the daemon (which detaches), then any nbdfuse, FUSE
 * mount or loop device a broken daemon left behind; afterEach then checks that none is left.
 */
import fs from "node:fs";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { type RunningDaemon, startDaemon, tempDir, udmsetup } from "../support/daemon.js";
import { rootUnavailableReason, skipOrFail } from "../support/requirements.js";
import { boundLoops, isUnder, killQuietly, mounts, pidsOf } from "../support/system-state.js";
import { sh, tool } from "../support/tools.js";

const MiB = 1024 * 1024;
const SUITE = "attach tests";
const skipReason = rootUnavailableReason(["mkfs.ext4", "e2fsck", "debugfs"]);
skipOrFail(SUITE, skipReason);

const devicePattern = fs.existsSync("/dev/nbd0") ? /^\/dev\/nbd\d+$/ : /^\/dev\/loop\d+$/;

describe.skipIf(skipReason !== null)("udmsetup attach / detach", () => {
  let runDir: string;
  let devDir: string;
  let files: string;
  let mnt: string;
  let img: string;
  let name: string;
  let daemon: RunningDaemon | undefined;
  const savedEnv = { UDM_DEV_DIR: process.env.UDM_DEV_DIR, UDM_AUTO_ATTACH: process.env.UDM_AUTO_ATTACH };
  let serial = 0;

  const run = (...args: string[]) => udmsetup(runDir, args);

  beforeEach(() => {
    runDir = tempDir("udm-attach-run-");
    devDir = path.join(tempDir("udm-attach-dev-"), "udm"); // created by the daemon
    files = tempDir("udm-attach-files-");
    mnt = path.join(files, "mnt");
    fs.mkdirSync(mnt);
    img = path.join(files, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 64 * MiB);
    name = `udmatt${process.pid}x${serial++}`; // unique: leftovers are recognisable by name
  });

  afterEach(async () => {
    const ours = (p: string) => [runDir, files].some((d) => isUnder(p, d));
    // 1. The test's mount, while the daemon still serves its last writes.
    if (mountTargets().includes(mnt) && (await tool("umount", [mnt])).code !== 0) await tool("umount", ["-l", mnt]);
    // 2. The daemon detaches everything on SIGTERM. If it hangs (e.g. in a FUSE request), kill
    //    its nbdfuse first: that aborts the FUSE connection and lets it exit.
    let cleanExit = false;
    if (daemon) {
      const alive = daemon.proc.exitCode === null && daemon.proc.signalCode === null;
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), 20_000)));
      const code = await Promise.race([daemon.stop("SIGTERM"), timeout]);
      clearTimeout(timer);
      if (code === "timeout") {
        for (const pid of pidsOf("nbdfuse", runDir)) killQuietly(pid);
        await daemon.stop("SIGKILL");
      }
      cleanExit = alive && code === 0;
      daemon = undefined;
    }
    // 3. What a broken daemon left behind: its nbdfuse, FUSE mounts, loop devices on them.
    for (const pid of pidsOf("nbdfuse", runDir)) killQuietly(pid);
    for (const target of mountTargets().filter(ours)) await tool("umount", ["-l", target]);
    for (const loop of loopsBackedBy(name)) await tool("losetup", ["-d", loop]);
    for (const [key, value] of Object.entries(savedEnv)) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }

    const leftovers = {
      nbdfuse: pidsOf("nbdfuse", runDir),
      mounts: mountTargets().filter(ours),
      loops: loopsBackedBy(name),
      // A daemon that stopped normally has cleaned its run directory (a killed one cannot).
      runDir: cleanExit ? fs.readdirSync(runDir) : [],
    };
    for (const d of [runDir, path.dirname(devDir), files]) fs.rmSync(d, { recursive: true, force: true });
    expect(leftovers).toEqual({ nbdfuse: [], mounts: [], loops: [], runDir: [] });
  }, 60_000);

  it("rename moves the symlink to the new name; detach and remove work under it", async () => {
    process.env.UDM_DEV_DIR = devDir;
    daemon = await startDaemon(runDir);
    expect(await run("create", name, "--table", `0 ${(64 * MiB) / 512} linear ${img} 0`)).toMatchObject({ code: 0 });
    const dev = (await run("attach", name)).stdout.trim();
    const renamed = `${name}r`;
    expect(await run("rename", name, renamed)).toMatchObject({ code: 0 });
    expect(fs.readlinkSync(path.join(devDir, renamed))).toBe(dev);
    expect(fs.existsSync(path.join(devDir, name))).toBe(false);
    expect(JSON.parse((await run("--json", "info", renamed)).stdout).attached).toBe(dev);
    expect(await run("remove", renamed)).toMatchObject({ code: 1, stderr: expect.stringContaining("attached") });
    expect(await run("detach", renamed)).toMatchObject({ code: 0, stderr: "" });
    expect(fs.existsSync(path.join(devDir, renamed))).toBe(false);
    expect(await run("remove", renamed)).toMatchObject({ code: 0 });
  });

  it("attach prints a device for mkfs and mount; detach refuses while mounted; the data lands in the backing file", async () => {
    process.env.UDM_DEV_DIR = devDir;
    daemon = await startDaemon(runDir);
    expect(await run("create", name, "--table", `0 ${(64 * MiB) / 512} linear ${img} 0`)).toMatchObject({ code: 0 });

    const attached = await run("attach", name);
    expect(attached).toMatchObject({ code: 0, stderr: "" });
    const dev = attached.stdout.trim();
    expect(dev).toMatch(devicePattern);
    const link = path.join(devDir, name);
    expect(fs.readlinkSync(link)).toBe(dev);
    expect(fs.statSync(devDir).mode & 0o777).toBe(0o755);
    expect(JSON.parse((await run("--json", "info", name)).stdout).attached).toBe(dev);
    expect((await run("attach", name)).stdout).toBe(`${dev}\n`); // again: same device

    await sh("mkfs.ext4", "-q", link);
    await sh("mount", link, mnt);
    const text = "written through udm\n";
    const blob = Buffer.alloc(3 * MiB + 512);
    for (let i = 0; i < blob.length; i++) blob[i] = (i * 31 + (i >> 9)) & 0xff;
    fs.writeFileSync(path.join(mnt, "hello.txt"), text);
    fs.writeFileSync(path.join(mnt, "blob.bin"), blob);
    await sh("sync");

    const busy = await run("detach", name);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toContain(`is mounted on ${mnt}`);
    expect(busy.stderr).toContain(`device-mapper: detach ioctl on ${name}  failed: Device or resource busy\n`);
    expect(fs.readlinkSync(link)).toBe(dev);

    await sh("umount", mnt);
    expect(await run("detach", name)).toEqual({ code: 0, stdout: "", stderr: "" });
    expect(fs.existsSync(link)).toBe(false);
    expect(JSON.parse((await run("--json", "info", name)).stdout).attached).toBeUndefined();
    expect(loopsBackedBy(name)).toEqual([]);
    expect(fs.readdirSync(runDir).sort()).toEqual(["control", "devices.json", "nbd.sock", "udmd.lock", "udmd.pid"]); // fuse/ is gone
    expect(await run("remove", name)).toMatchObject({ code: 0 });

    // The filesystem, read from the backing file without udm.
    await sh("e2fsck", "-fn", img);
    expect(await sh("debugfs", "-R", "cat /hello.txt", img)).toBe(text);
    const dumped = path.join(files, "blob.out");
    await sh("debugfs", "-R", `dump /blob.bin ${dumped}`, img);
    expect(fs.readFileSync(dumped).equals(blob)).toBe(true);
  }, 60_000);

  it("a device attached when udmd was killed is attached again by the next udmd; nothing of the old attachment is left", async () => {
    process.env.UDM_DEV_DIR = devDir;
    daemon = await startDaemon(runDir);
    expect(await run("create", name, "--table", `0 ${(64 * MiB) / 512} linear ${img} 0`)).toMatchObject({ code: 0 });
    expect((await run("attach", name)).code).toBe(0);
    const link = path.join(devDir, name);
    await sh("mkfs.ext4", "-q", link);

    expect(await daemon.stop("SIGKILL")).toBe(null);
    daemon = await startDaemon(runDir);
    const dev = JSON.parse((await run("--json", "info", name)).stdout).attached as string | undefined;
    expect(dev).toMatch(devicePattern);
    expect(fs.readlinkSync(link)).toBe(dev);
    // One nbdfuse and one loop device: the new daemon's; the killed daemon's are gone.
    expect(pidsOf("nbdfuse", runDir)).toHaveLength(devicePattern.source.includes("nbd") ? 0 : 1);
    expect(loopsBackedBy(name)).toEqual(devicePattern.source.includes("nbd") ? [] : [dev]);
    // The filesystem made through the old attachment is there through the new one.
    await sh("mount", link, mnt);
    await sh("umount", mnt);
  });

  it("remove refuses while attached, and remove --force detaches first", async () => {
    daemon = await startDaemon(runDir, ["--dev-dir", devDir]);
    await run("create", name, "--table", `0 2048 linear ${img} 0`);
    const dev = (await run("attach", name)).stdout.trim();
    expect(dev).toMatch(devicePattern);
    const refused = await run("remove", name);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain(`${name}: attached as ${dev} (detach it first)\n`);
    expect(await run("remove", "--force", name)).toMatchObject({ code: 0 });
    expect(fs.existsSync(path.join(devDir, name))).toBe(false);
    expect(loopsBackedBy(name)).toEqual([]);
    expect((await run("ls")).stdout).toBe("No devices found\n");
  });

  it.each([
    ["udmd --auto-attach", ["--auto-attach"], {}],
    ["UDM_AUTO_ATTACH=1", [], { UDM_AUTO_ATTACH: "1" }],
  ])("%s: create attaches, remove detaches", async (_label, args, env) => {
    Object.assign(process.env, env, { UDM_DEV_DIR: devDir });
    daemon = await startDaemon(runDir, args);
    const link = path.join(devDir, name);
    expect(await run("create", name, "--table", `0 2048 linear ${img} 0`)).toMatchObject({ code: 0 });
    expect(fs.readlinkSync(link)).toMatch(devicePattern);
    expect(fs.statSync(link).isBlockDevice()).toBe(true);
    expect(fs.readFileSync(`/sys/block/${path.basename(fs.readlinkSync(link))}/size`, "utf8")).toBe("2048\n");
    expect(await run("remove", name)).toEqual({ code: 0, stdout: "", stderr: "" });
    expect(fs.existsSync(link)).toBe(false);
    expect(loopsBackedBy(name)).toEqual([]);
  });
});

/** Mount targets. */
function mountTargets(): string[] {
  return mounts().map((m) => m.target);
}

/**
 * Loop devices bound to our nbdfuse file. The kernel reports a FUSE file's path relative to its
 * mount: `/NAME`, unique to this test by construction.
 */
function loopsBackedBy(name: string): string[] {
  return boundLoops()
    .filter(({ backing }) => backing === `/${name}` || backing.endsWith(`/mnt/${name}`))
    .map(({ dev }) => dev);
}
