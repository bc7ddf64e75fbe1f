/**
 * The kernel NBD path, in Debian's kernel booted in qemu (test/vm/vm.ts): the host has no nbd
 * module, so this is where /dev/nbdN → NBD → udm runs for real (issue 14). One VM serves both
 * tests; host and guest take turns through its control port, each step waiting for the other's
 * answer, never for a delay.
 *
 * 1. The kernel's NBD client against the host's udmd. Host: `lw` = log-writes over data.img (its
 *    log: what reached udm, in order, with each write's flags) and `top` = linear over `lw`, the
 *    export the guest attaches. Guest: Debian's nbd-client attaches /dev/nbd0 to `top` through a
 *    virtio-serial port bound to udmd's NBD unix socket (socat makes the port the unix socket
 *    nbd-client wants); mkfs, mount, a file written with fsync, table swaps under the mounted
 *    filesystem seen through O_DIRECT reads, a FUA write and a flush from userspace, unmount,
 *    detach.
 * 2. udm's own attach (dmsetup/attach/kernel-nbd.ts) in the guest: udmd and udmsetup from the
 *    checkout (a read-only 9p share, with its Node 24), the same I/O, and a buffered read across
 *    a table swap compared with the kernel's dm doing the same in the same guest.
 */
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { decodeLog } from "../../targets/log-writes/format.js";
import { UDMSETUP, type RunningDaemon, useDaemon } from "../support/daemon.js";
import { skipOrFail } from "../support/requirements.js";
import { tool, toolOk } from "../support/tools.js";
import { cli, makeFile } from "../support/udmd-tools.js";
import { type VmImage, ensureVmImage, vmUnavailableReason } from "./image.js";
import { type LoggedIo, describeIo, expectFuaAndFlush, loggedIo, loggedIoCommand, sha256 } from "./io-log.js";
import { Vm } from "./vm.js";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const REPLAY_LOG = path.join(path.dirname(UDMSETUP), "replay-log.js");
/** Where the guest mounts the checkout (read-only 9p). */
const GUEST_CHECKOUT = "/udm";

const MiB = 1024 * 1024;
const DEVICE_BYTES = 64 * MiB;
const SECTORS = DEVICE_BYTES / 512;
const BLOCK = 4096;
/** The filesystem covers the first 60 MiB; blocks past it take the raw FUA and flush writes. */
const FS_BLOCKS = 15360;
const FUA_BLOCK = 15872;
const FLUSH_BLOCK = FUA_BLOCK + 1;
/** coreutils dd: busybox's has no oflag=dsync, and busybox sh runs its own applets before PATH. */
const DD = "/usr/bin/dd";

/** What `yes TEXT | head -c N` prints in the guest. */
function yes(text: string, bytes: number): Buffer {
  const line = Buffer.from(`${text}\n`);
  return Buffer.concat(Array(Math.ceil(bytes / line.length)).fill(line)).subarray(0, bytes);
}

const FILE_BYTES = yes("udm kernel nbd", MiB);
const PATTERN = yes("a table the guest has never seen", BLOCK);
const FUA_DATA = yes("fua", BLOCK);
const FLUSH_DATA = yes("flush", BLOCK);
const sectorOf = (block: number) => (block * BLOCK) / 512;

/**
 * Guest shell lines: mkfs, mount on `mnt`, and the file written with fsync. Each test mounts on
 * its own directory, so that one failing with its filesystem still mounted leaves the next alone.
 */
function makeFilesystem(dev: string, mnt: string): string {
  return [
    `mkfs.ext4 -q -F -b ${BLOCK} -E lazy_itable_init=0,lazy_journal_init=0 ${dev} ${FS_BLOCKS}`,
    `mkdir -p ${mnt} && mount -t ext4 -o noatime ${dev} ${mnt}`,
    `yes 'udm kernel nbd' | head -c ${MiB} | ${DD} of=${mnt}/hello bs=65536 iflag=fullblock conv=fsync status=none`,
  ].join("\n");
}

/** Guest shell: one block written with O_DIRECT|O_DSYNC (a FUA write), past the filesystem. */
const fuaWrite = (dev: string) =>
  `yes fua | head -c ${BLOCK} | ${DD} of=${dev} bs=${BLOCK} seek=${FUA_BLOCK} oflag=direct,dsync conv=notrunc status=none`;
/** Guest shell: the next block, a buffered write then fsync (a write, then a flush). */
const flushedWrite = (dev: string) =>
  `yes flush | head -c ${BLOCK} | ${DD} of=${dev} bs=${BLOCK} seek=${FLUSH_BLOCK} conv=notrunc,fsync status=none`;

/** Resolves on the first line of udmd's log that satisfies `match` (including lines already logged). */
function daemonLogLine(daemon: RunningDaemon, match: (line: Record<string, unknown>) => boolean): Promise<void> {
  const test = () =>
    daemon
      .stderr()
      .split("\n")
      .some((l) => {
        try {
          return match(JSON.parse(l) as Record<string, unknown>);
        } catch {
          return false;
        }
      });
  return new Promise((resolve) => {
    if (test()) return resolve();
    const onData = () => {
      if (!test()) return;
      daemon.proc.stderr!.off("data", onData);
      resolve();
    };
    daemon.proc.stderr!.on("data", onData);
  });
}

const skipReason = vmUnavailableReason();
skipOrFail("VM kernel NBD tests", skipReason);

describe.skipIf(skipReason !== null)("Debian's kernel in qemu: the kernel NBD client on a udm device", () => {
  // qemu connects its port to the NBD socket when it starts, long before nbd-client speaks.
  const env = useDaemon("udm-vm-", { args: ["--nbd-handshake-timeout", "0"], per: "file" });
  let image: VmImage;
  let vm: Vm | undefined;

  beforeAll(async () => {
    let t = Date.now();
    image = ensureVmImage({ log: (line) => console.log(`vm image: ${line}`) });
    console.log(`vm image: ${image.kernelVersion}, ready in ${Date.now() - t} ms`);
    t = Date.now();
    vm = await Vm.boot({
      image,
      workDir: env.files,
      sockets: [{ name: "udm.nbd", path: path.join(env.dir, "nbd.sock") }],
      shares: [{ tag: "udm", path: repoRoot, readOnly: true }],
    });
    console.log(`vm: booted ${vm.kernelRelease} in ${Date.now() - t} ms`);
  }, 600_000);

  afterAll(async () => {
    await vm?.shutdown();
  });

  it("the kernel's NBD client: mkfs, mount, fsync, table swaps under the mount, FUA and flush reach udm", async () => {
    const guest = vm!;
    const started = Date.now();
    const data = makeFile(path.join(env.files, "data.img"), DEVICE_BYTES);
    const log = makeFile(path.join(env.files, "log.img"), 64 * MiB);
    const other = makeFile(path.join(env.files, "other.img"), Buffer.concat([PATTERN, Buffer.alloc(BLOCK)]));
    fs.truncateSync(other, DEVICE_BYTES);
    await cli(env.dir, "create", "lw", "--table", `0 ${SECTORS} log-writes ${data} ${log}`);
    await cli(env.dir, "create", "top", "--table", `0 ${SECTORS} linear /dev/mapper/lw 0`);
    const mark = (name: string) => cli(env.dir, "message", "lw", "0", "mark", name);
    const swap = async (table: string) => {
      await cli(env.dir, "load", "top", "--table", table);
      await cli(env.dir, "suspend", "top");
      await cli(env.dir, "resume", "top");
    };
    const readBlock0 = `${DD} if=/dev/nbd0 bs=${BLOCK} count=1 iflag=direct status=none`;

    // Attach. The kernel learns the export's flags from the handshake: SEND_FLUSH turns the
    // write cache on, SEND_FUA lets FUA through (queue/fua).
    const attach = await guest.ok(
      [
        "socat -b 65536 UNIX-LISTEN:/run/nbd.sock OPEN:$(vport udm.nbd) >/run/socat.log 2>&1 &",
        // socat has no readiness signal: wait for its socket to exist (bounded).
        "i=0; while [ ! -S /run/nbd.sock ]; do i=$((i+1)); [ $i -gt 500 ] && exit 1; usleep 10000; done",
        `nbd-client -N top -u /run/nbd.sock /dev/nbd0 -b ${BLOCK}`,
        "cat /sys/block/nbd0/size /sys/block/nbd0/queue/logical_block_size",
        "cat /sys/block/nbd0/queue/write_cache /sys/block/nbd0/queue/fua",
      ].join("\n"),
    );
    expect(attach.trim().split("\n").slice(-4)).toEqual([String(SECTORS), String(BLOCK), "write back", "1"]);

    await guest.ok(makeFilesystem("/dev/nbd0", "/mnt/client"), { timeoutMs: 180_000 });
    await mark("fsynced");

    // Table swaps while the filesystem stays mounted: O_DIRECT reads go through the new table
    // at once (nothing between the kernel device and udm caches blocks). The mount left the
    // superblock dirty in the guest's page cache, and an O_DIRECT read writes back the dirty
    // pages of its range first, through whatever table is live (as on kernel dm): sync before.
    await guest.ok("sync");
    await swap(`0 ${SECTORS} linear ${other} 0`);
    expect((await guest.ok(`${readBlock0} | sha256sum`)).split(" ")[0]).toBe(sha256(PATTERN));
    await swap(`0 ${SECTORS} error`);
    const failed = await guest.run(`${readBlock0} >/dev/null`);
    expect(failed.code, failed.output).not.toBe(0);
    expect(failed.output).toMatch(/Input\/output error/);
    await swap(`0 ${SECTORS} linear /dev/mapper/lw 0`);
    expect((await guest.ok(`${readBlock0} | od -An -tx1 -j1080 -N2`)).trim()).toBe("53 ef"); // ext4's magic
    expect(
      (await guest.ok(`${DD} if=/mnt/client/hello bs=65536 iflag=direct status=none | sha256sum`)).split(" ")[0],
    ).toBe(sha256(FILE_BYTES));

    await guest.ok(fuaWrite("/dev/nbd0"));
    await guest.ok(flushedWrite("/dev/nbd0"));

    // Unmount and detach; the NBD connection ends with the kernel's NBD_CMD_DISC.
    const disconnected = daemonLogLine(env.daemon, (l) => l.msg === "nbd client disconnected" && l.export === "top");
    await guest.ok("umount /mnt/client\nnbd-client -d /dev/nbd0\n! [ -e /sys/block/nbd0/pid ]");
    await disconnected;
    await cli(env.dir, "remove", "top");
    await cli(env.dir, "remove", "lw"); // logs what waited for a flush, and writes the final count
    console.log(`vm kernel nbd: guest steps took ${Date.now() - started} ms`);

    // What reached udm: ext4's commits as flushes and FUA writes, the O_DSYNC write as FUA, the
    // fsync as a flush.
    const io = loggedIo(decodeLog(fs.readFileSync(log)).entries);
    const report = expectFuaAndFlush(
      io,
      { sector: sectorOf(FUA_BLOCK), data: FUA_DATA },
      { sector: sectorOf(FLUSH_BLOCK), data: FLUSH_DATA },
    );
    console.log(`vm kernel nbd (nbd-client): what reached udm from the FUA write on:\n${describeIo(report)}`);

    // The data is on udm's backing file, and the filesystem is clean.
    await toolOk("e2fsck", ["-fn", data]);
    expect(sha256(Buffer.from((await toolOk("debugfs", ["-R", "cat /hello", data])).stdout))).toBe(sha256(FILE_BYTES));

    // Replaying the log up to the mark taken after the fsync gives a filesystem holding the
    // file: what the fsync made durable did reach udm as durable.
    const replay = makeFile(path.join(env.files, "replay.img"), DEVICE_BYTES);
    await toolOk(process.execPath, [REPLAY_LOG, "--log", log, "--replay", replay, "--end-mark", "fsynced"]);
    const recovered = await tool("e2fsck", ["-fy", replay]); // replays the journal
    expect(recovered.code, recovered.stdout + recovered.stderr).toBeLessThanOrEqual(1);
    await toolOk("e2fsck", ["-fn", replay]);
    const replayed = await toolOk("debugfs", ["-R", "cat /hello", replay]);
    expect(sha256(Buffer.from(replayed.stdout))).toBe(sha256(FILE_BYTES));
  }, 600_000);

  it("udm's own attach in the guest (kernel-nbd.ts): FUA and flush reach udm, the cache goes on last close as on dm", async () => {
    const guest = vm!;
    const started = Date.now();
    // Kernel dm first, for comparison: a buffered read, a table swap, a buffered read. Nobody
    // holds the device between the reads, so the second comes from the new table (the kernel
    // drops a block device's page cache when its last user closes it).
    const kernelDm = await guest.ok(
      [
        "export DM_DISABLE_UDEV=1",
        "mkdir -p /run/k && cd /run/k",
        "yes A | head -c 4096 >a.img && truncate -s 64M a.img && yes B | head -c 4096 >b.img && truncate -s 64M b.img",
        "la=$(losetup -f) && losetup $la a.img && lb=$(losetup -f) && losetup $lb b.img",
        `dmsetup create kd --table "0 ${SECTORS} linear $la 0"`,
        "dd if=/dev/mapper/kd bs=4096 count=1 2>/dev/null | head -c 1",
        `dmsetup load kd --table "0 ${SECTORS} linear $lb 0" && dmsetup resume kd`,
        "dd if=/dev/mapper/kd bs=4096 count=1 2>/dev/null | head -c 1",
        "dmsetup remove kd && losetup -d $la && losetup -d $lb && rm a.img b.img",
      ].join("\n"),
    );
    expect(kernelDm).toBe("AB");

    // udmd and udmsetup from the checkout, with its Node, on a run directory in the guest.
    const node = `${GUEST_CHECKOUT}/node_modules/node/bin/node`;
    const prelude = `export NODE_COMPILE_CACHE=/run/node-cache; U="${node} ${GUEST_CHECKOUT}/dist/dmsetup/bin/udmsetup.js --run-dir /run/udm"`;
    const udmsetup = (script: string) => guest.ok(`${prelude}\n${script}`, { timeoutMs: 300_000 });
    await guest.ok(
      [
        `mkdir -p ${GUEST_CHECKOUT} /run/udm /run/t`,
        `mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose udm ${GUEST_CHECKOUT}`,
        `NODE_COMPILE_CACHE=/run/node-cache ${node} ${GUEST_CHECKOUT}/dist/dmsetup/bin/udmd.js --run-dir /run/udm >/run/udmd.log 2>&1 &`,
        // Its log says when both sockets listen (Node under TCG takes a while to start).
        `i=0; until grep -q '"udmd started"' /run/udmd.log; do i=$((i+1)); [ $i -gt 3000 ] && exit 1; usleep 100000; done`,
        // lw one block longer than top, so that top can be moved along it by a block.
        `truncate -s ${DEVICE_BYTES + BLOCK} /run/t/data.img && truncate -s ${64 * MiB} /run/t/log.img`,
      ].join("\n"),
      { timeoutMs: 300_000 },
    );
    console.log(`vm udm attach: udmd started in the guest after ${Date.now() - started} ms`);
    await udmsetup(
      [
        `$U create lw --table "0 ${SECTORS + BLOCK / 512} log-writes /run/t/data.img /run/t/log.img"`,
        `$U create top --table "0 ${SECTORS} linear /dev/mapper/lw 0"`,
      ].join("\n"),
    );
    const attached = await udmsetup("$U attach top");
    const dev = attached.trim();
    expect(dev).toMatch(/^\/dev\/nbd\d+$/);
    const sys = `/sys/block/${path.basename(dev)}`;
    expect(await guest.ok(`readlink /dev/udm/top; cat ${sys}/size ${sys}/queue/write_cache ${sys}/queue/fua`)).toBe(
      `${dev}\n${SECTORS}\nwrite back\n1\n`,
    );
    // udmd holds no descriptor of the device (netlink, not NBD_DO_IT).
    expect(await guest.ok(`ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c ' ${dev}$' || true`)).toBe("0\n");

    await guest.ok(makeFilesystem("/dev/udm/top", "/mnt/attach"), { timeoutMs: 180_000 });
    await guest.ok(fuaWrite("/dev/udm/top"));
    await guest.ok(flushedWrite("/dev/udm/top"));
    await guest.ok("umount /mnt/attach");

    // The same buffered read, swap, buffered read as on kernel dm above: top moved one block
    // along lw, so the FUA block now shows what the flushed write put in the next one.
    const readFuaBlock = `dd if=/dev/udm/top bs=${BLOCK} skip=${FUA_BLOCK} count=1 2>/dev/null | head -c 5`;
    const beforeSwap = await guest.ok(readFuaBlock);
    await udmsetup(`$U load top --table "0 ${SECTORS} linear /dev/mapper/lw ${BLOCK / 512}"\n$U resume top`);
    const afterSwap = await guest.ok(readFuaBlock);
    expect([beforeSwap, afterSwap]).toEqual(["fua\nf", "flush"]);

    await udmsetup("$U detach top");
    expect(await guest.ok(`cat ${sys}/size; [ -e ${sys}/pid ] && echo connected || echo free`)).toBe("0\nfree\n");
    await udmsetup("$U remove top\n$U remove lw");

    const io = JSON.parse(
      await guest.ok(loggedIoCommand(node, GUEST_CHECKOUT, "/run/t/log.img"), { timeoutMs: 300_000 }),
    ) as LoggedIo[];
    const report = expectFuaAndFlush(
      io,
      { sector: sectorOf(FUA_BLOCK), data: FUA_DATA },
      { sector: sectorOf(FLUSH_BLOCK), data: FLUSH_DATA },
    );
    console.log(`vm udm attach: what reached udm from the FUA write on:\n${describeIo(report)}`);
    const onDisk = await guest.ok(
      "e2fsck -fn /run/t/data.img >/dev/null 2>&1 && mkdir -p /mnt/check && mount -o ro,loop /run/t/data.img /mnt/check && sha256sum /mnt/check/hello && umount /mnt/check",
    );
    expect(onDisk.split(" ")[0]).toBe(sha256(FILE_BYTES));
    console.log(`vm udm attach: guest steps took ${Date.now() - started} ms`);
  }, 600_000);
});
