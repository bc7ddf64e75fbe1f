/**
 * Persistent snapshots on loop devices across a full teardown, merging, and a COW device that
 * fills up (issue 7, scenarios 4, 5 and 6). Each test starts from a snapshot of a live ext4
 * filesystem taken the documented way (see snapshot-live.test.ts and `takeLiveSnapshot`).
 * - Scenario 4: unmount, detach, remove, stop the daemon, detach the loop devices; bind them again,
 *   start a new daemon and recreate the same tables (chunk size 0: from the COW header). The
 *   exceptions are reloaded from the COW loop device: the snapshot has its old files, the origin
 *   its new ones, and further origin writes still leave the snapshot alone.
 * - Scenario 5: merging the snapshot back into the origin (`snapshot-merge`). Skipped, with the
 *   reason printed, only while udmd does not list the target.
 * - Scenario 6: a COW device too small for what is written to the origin: the snapshot is
 *   invalidated (status `Invalid`, an event, the header's valid flag cleared, its reads fail),
 *   and the origin filesystem is unharmed (e2fsck clean, every file intact).
 *
 * Needs root, /dev/loop-control, /dev/fuse, nbdfuse, nbdcopy, fio, e2fsprogs and fsfreeze; otherwise
 * skipped with the reason printed, unless UDM_REQUIRE_ROOT_TESTS=1 makes that a failure.
 */
import fs from "node:fs";
import { describe, expect, it, type TestContext } from "vitest";
import { patternBytes, readAt } from "../support/device-data.js";
import { changeTree, hashTree, treeHashes } from "../support/file-tree.js";
import { EXT4, expectClean } from "../support/filesystems.js";
import { snapshotTable, snapshotUsage, takeLiveSnapshot } from "../support/live-snapshot.js";
import { rootUnavailableReason, skipOrFail } from "../support/requirements.js";
import { useRootEnv } from "../support/root-env.js";
import { sh, tool } from "../support/tools.js";
import { MiB, SECTOR } from "../support/units.js";

const SUITE = "root snapshot persistence tests";
const skipReason = rootUnavailableReason([...EXT4.tools, "debugfs", "nbdcopy", "fio"]);
skipOrFail(SUITE, skipReason);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe.skipIf(skipReason !== null)(
  "persistent snapshots on loop devices: teardown and reload, merge, overflow",
  () => {
    const env = useRootEnv("persist");

    // 4 KiB chunks: 256 records per metadata area, so the exceptions span many areas. 64 KiB
    // chunks: origin writes smaller than a chunk copy the whole chunk first.
    it.each([
      { chunk: 8, areas: "many metadata areas" },
      { chunk: 128, areas: "one metadata area" },
    ])(
      "after tearing everything down, recreated tables reload the exceptions from the COW loop device (chunk $chunk, $areas)",
      async ({ chunk }) => {
        const rig = await takeLiveSnapshot(env, EXT4, { cowBytes: 64 * MiB, chunk, fioBytes: 8 * MiB });

        // Tear everything down: mount, attachment, devices, daemon, loop devices. (Unmounting writes
        // the superblock and the journal, which copies more chunks: the status is read after that.)
        await env.umount(rig.mnt);
        await env.ok("detach", rig.base);
        const status = await env.ok("status", rig.snap);
        const usage = snapshotUsage(status);
        const recordsPerArea = (chunk * SECTOR) / 16;
        const dataChunks = (usage.allocated - usage.metadata) / chunk;
        expect(usage.metadata / chunk - 1).toBe(Math.ceil((dataChunks + 1) / recordsPerArea)); // header + areas
        if (chunk === 8) expect(usage.metadata / chunk - 1).toBeGreaterThan(3);
        await env.ok("remove", rig.snap);
        await env.ok("remove", rig.base);
        expect(await env.stopDaemon()).toBe(0);
        expect(fs.readdirSync(env.runDir)).toEqual([]);
        await env.detachLoop(rig.originLoop);
        await env.detachLoop(rig.cowLoop);
        expect(env.ourLoops()).toEqual([]);

        // The same tables over the same files, as after a reboot: reactivation (docs/snapshot.md).
        const originLoop = await env.loop(rig.originFile);
        const cowLoop = await env.loop(rig.cowFile);
        await env.startDaemon();
        await env.ok("create", rig.base, "--table", `0 ${rig.sectors} snapshot-origin ${originLoop.path}`);
        await env.ok("suspend", rig.base);
        await env.ok("create", rig.snap, "--table", snapshotTable({ sectors: rig.sectors, originLoop, cowLoop }, 0));
        await env.ok("resume", rig.base);
        const devno = (p: string) => `7:${p.replace("/dev/loop", "")}`;
        expect(await env.ok("table", rig.snap)).toBe(
          `0 ${rig.sectors} snapshot ${devno(originLoop.path)} ${devno(cowLoop.path)} P ${chunk}\n`,
        );
        expect(await env.ok("status", rig.snap)).toBe(status);

        const snapDev = await env.attach(rig.snap);
        await expectClean(EXT4, snapDev.link);
        const snapMnt = env.dir("snap");
        await env.mount(snapDev.link, snapMnt, EXT4.snapshotMountOptions(true));
        expect(hashTree(snapMnt)).toEqual(treeHashes(rig.before));
        await env.umount(snapMnt);
        await env.ok("detach", rig.snap);

        const baseDev = await env.attach(rig.base);
        await env.mount(baseDev.link, rig.mnt);
        expect(hashTree(rig.mnt)).toEqual(treeHashes(rig.after));

        // The reloaded snapshot keeps copying: more origin changes leave it as it was.
        const later = changeTree(rig.mnt, rig.after, "after-reload");
        await sh("sync", "-f", rig.mnt);
        expect(snapshotUsage(await env.ok("status", rig.snap)).allocated).toBeGreaterThan(
          snapshotUsage(status).allocated,
        );
        const again = await env.attach(rig.snap); // a new attachment: nothing cached from the first one
        await expectClean(EXT4, again.link);
        await env.mount(again.link, snapMnt, EXT4.snapshotMountOptions(true));
        expect(hashTree(snapMnt)).toEqual(treeHashes(rig.before));
        expect(hashTree(rig.mnt)).toEqual(treeHashes(later));
        await env.umount(snapMnt);
        await env.umount(rig.mnt);
        await expectClean(EXT4, baseDev.link);
        await env.ok("detach", rig.snap);
        await env.ok("detach", rig.base);
        await env.ok("remove", rig.snap);
        await env.ok("remove", rig.base);
        expect(await env.stopDaemon()).toBe(0);
      },
      120_000,
    );

    it("snapshot-merge rolls the origin back to the snapshot", async (ctx: TestContext) => {
      await env.startDaemon();
      const targets = await env.ok("targets");
      if (!/^snapshot-merge\s/m.test(targets)) {
        console.warn("snapshot-merge test skipped: snapshot-merge not implemented (not listed by udmsetup targets)");
        ctx.skip("snapshot-merge not implemented");
      }
      expect(await env.stopDaemon()).toBe(0);

      const rig = await takeLiveSnapshot(env, EXT4, { cowBytes: 64 * MiB });
      // The merge replaces snapshot-origin on the origin device; the snapshot device goes away.
      await env.umount(rig.mnt);
      await env.ok("detach", rig.base);
      await env.ok("remove", rig.snap);
      await env.ok("suspend", rig.base);
      await env.ok("reload", rig.base, "--table", snapshotTable(rig, 8).replace(" snapshot ", " snapshot-merge "));
      await env.ok("resume", rig.base);
      // Merging is done when only metadata is left allocated (the kernel's status then).
      let usage = snapshotUsage(await env.ok("status", rig.base));
      for (let i = 0; i < 300 && usage.allocated !== usage.metadata; i++) {
        await sleep(100);
        usage = snapshotUsage(await env.ok("status", rig.base));
      }
      expect(usage.allocated).toBe(usage.metadata);
      // Back to a plain origin, then the filesystem is the snapshot's.
      await env.ok("suspend", rig.base);
      await env.ok("reload", rig.base, "--table", `0 ${rig.sectors} snapshot-origin ${rig.originLoop.path}`);
      await env.ok("resume", rig.base);
      const baseDev = await env.attach(rig.base);
      await expectClean(EXT4, baseDev.link);
      await env.mount(baseDev.link, rig.mnt);
      expect(hashTree(rig.mnt)).toEqual(treeHashes(rig.before));
      await env.umount(rig.mnt);
      await env.ok("detach", rig.base);
      await env.ok("remove", rig.base);
      expect(await env.stopDaemon()).toBe(0);
    }, 120_000);

    it("a COW device too small: filling it through the origin invalidates the snapshot, and the origin filesystem stays healthy", async () => {
      // 1 MiB of COW: the header, one metadata area and 254 chunks of 4 KiB. fio overwrites an
      // 8 MiB file through the origin (random 4 KiB direct writes, 32 in flight, verified): the COW
      // fills while many origin writes wait for their copies. None of them may fail.
      const cowBytes = 1 * MiB;
      const rig = await takeLiveSnapshot(env, EXT4, {
        cowBytes,
        files: 12,
        maxFileBytes: 64 * 1024,
        changes: 0,
        fioBytes: 8 * MiB,
      });
      expect(await env.ok("status", rig.snap)).toBe(`0 ${rig.sectors} snapshot Invalid\n`);
      // The origin keeps taking writes once the snapshot is gone.
      const fill = patternBytes("fill", 4 * MiB);
      fs.writeFileSync(`${rig.mnt}/fill.bin`, fill);
      await sh("sync", "-f", rig.mnt);
      const expected = new Map(rig.after).set("fill.bin", fill);

      expect(await env.ok("status", rig.snap)).toBe(`0 ${rig.sectors} snapshot Invalid\n`);
      // One invalidation, one event.
      expect(await env.ok("info", rig.snap)).toMatch(/^Event number: +1$/m);
      expect(env.daemonLogs()).toContain("Invalidating snapshot: Unable to allocate exception.");
      // The header on the COW loop device says so (valid = 0), for the next activation too.
      expect(readAt(rig.cowLoop.path, 0, 16).toString("hex")).toBe("536e4170" + "00000000" + "01000000" + "08000000");
      // An invalid snapshot fails its I/O.
      const read = await tool("nbdcopy", [env.nbdUri(rig.snap), "null:"]);
      expect(read.code, `nbdcopy from the invalid snapshot: ${read.stderr}`).not.toBe(0);

      // The origin took every write: its files, and after unmounting a clean e2fsck and the same files.
      expect(hashTree(rig.mnt)).toEqual(treeHashes(expected));
      await env.umount(rig.mnt);
      await expectClean(EXT4, rig.baseDev.link);
      await env.mount(rig.baseDev.link, rig.mnt);
      expect(hashTree(rig.mnt)).toEqual(treeHashes(expected));
      await env.umount(rig.mnt);

      // Reactivating the snapshot succeeds and it stays invalid; removing it is fine.
      await env.ok("remove", rig.snap);
      await env.ok("suspend", rig.base);
      await env.ok("create", rig.snap, "--table", snapshotTable(rig, 0));
      await env.ok("resume", rig.base);
      expect(await env.ok("status", rig.snap)).toBe(`0 ${rig.sectors} snapshot Invalid\n`);
      await env.ok("remove", rig.snap);
      await env.ok("detach", rig.base);
      await env.ok("remove", rig.base);
      expect(await env.stopDaemon()).toBe(0);
      // The origin file itself, read without udm, is a clean filesystem with the same data.
      await expectClean(EXT4, rig.originFile);
      const dumped = `${env.scratch}/fio.out`;
      await sh("debugfs", "-R", `dump /fio.dat ${dumped}`, rig.originFile);
      expect(fs.readFileSync(dumped).equals(expected.get("fio.dat")!)).toBe(true);
    }, 120_000);
  },
);
