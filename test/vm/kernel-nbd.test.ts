/**
 * The kernel's own NBD client against udmd, in Debian's kernel booted in qemu (test/vm/vm.ts):
 * the host has no nbd module, so this is the only place the kernel block device path
 * /dev/nbdN → NBD → udm runs for real (issue 14).
 *
 * Host: udmd with `lw` = log-writes over data.img (its log in log.img: what reached udm, in
 * order, with each write's flags) and `top` = linear over `lw`, the export the guest attaches.
 * Guest: Debian's nbd-client attaches /dev/nbd0 to `top` through a virtio-serial port bound to
 * udmd's NBD unix socket (socat turns the port into the unix socket nbd-client wants), then
 * mkfs, mount, a file written with fsync, table swaps under the mounted filesystem seen through
 * O_DIRECT reads, a FUA write and a flush from userspace, unmount, detach. Host and guest take
 * turns through the VM's control port: each step waits for the other's answer, never a delay.
 */
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  LOG_FLUSH_FLAG,
  LOG_FUA_FLAG,
  LOG_MARK_FLAG,
  type LogEntry,
  decodeLog,
  flagsToString,
  markName,
} from "../../targets/log-writes/format.js";
import { UDMSETUP, type RunningDaemon, useDaemon } from "../support/daemon.js";
import { skipOrFail } from "../support/requirements.js";
import { tool, toolOk } from "../support/tools.js";
import { cli, makeFile } from "../support/udmd-tools.js";
import { type VmImage, ensureVmImage, vmUnavailableReason } from "./image.js";
import { Vm } from "./vm.js";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const REPLAY_LOG = path.join(path.dirname(UDMSETUP), "replay-log.js");

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

const sha256 = (b: Buffer) => crypto.createHash("sha256").update(b).digest("hex");
const FILE_BYTES = yes("udm kernel nbd", MiB);
const PATTERN = yes("a table the guest has never seen", BLOCK);

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

  it("attaches, mkfs, mount, fsync, table swaps under the mount, FUA and flush reach udm, detach", async () => {
    const guest = vm!;
    const started = Date.now();
    const data = makeFile(path.join(env.files, "data.img"), DEVICE_BYTES);
    const log = makeFile(path.join(env.files, "log.img"), 128 * MiB);
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

    // A filesystem, and a file written with fsync.
    await guest.ok(
      [
        `mkfs.ext4 -q -F -b ${BLOCK} -E lazy_itable_init=0,lazy_journal_init=0 /dev/nbd0 ${FS_BLOCKS}`,
        "mount -t ext4 -o noatime /dev/nbd0 /mnt",
        `yes 'udm kernel nbd' | head -c 1048576 | ${DD} of=/mnt/hello bs=65536 iflag=fullblock conv=fsync status=none`,
      ].join("\n"),
      { timeoutMs: 180_000 },
    );
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
    expect((await guest.ok(`${DD} if=/mnt/hello bs=65536 iflag=direct status=none | sha256sum`)).split(" ")[0]).toBe(
      sha256(FILE_BYTES),
    );

    // A FUA write from userspace (O_DIRECT | O_DSYNC on the block device), then a buffered
    // write and fsync (a write, then a flush), past the end of the filesystem.
    await mark("before-fua");
    await guest.ok(
      `yes fua | head -c ${BLOCK} | ${DD} of=/dev/nbd0 bs=${BLOCK} seek=${FUA_BLOCK} oflag=direct,dsync conv=notrunc status=none`,
    );
    await mark("after-fua");
    await guest.ok(
      `yes flush | head -c ${BLOCK} | ${DD} of=/dev/nbd0 bs=${BLOCK} seek=${FLUSH_BLOCK} conv=notrunc,fsync status=none`,
    );
    await mark("after-flush");

    // Unmount and detach; the NBD connection ends with the kernel's NBD_CMD_DISC.
    const disconnected = daemonLogLine(env.daemon, (l) => l.msg === "nbd client disconnected" && l.export === "top");
    await guest.ok("umount /mnt\nnbd-client -d /dev/nbd0\n! [ -e /sys/block/nbd0/pid ]");
    await disconnected;
    await cli(env.dir, "remove", "top");
    await cli(env.dir, "remove", "lw"); // logs what waited for a flush, and writes the final count
    console.log(`vm kernel nbd: guest steps took ${Date.now() - started} ms`);

    // What reached udm, from the log.
    const { entries } = decodeLog(fs.readFileSync(log));
    const at = (name: string) => {
      const i = entries.findIndex((e) => e.flags & LOG_MARK_FLAG && markName(e) === name);
      expect(i, `mark ${name}`).toBeGreaterThanOrEqual(0);
      return i;
    };
    const between = (from: number, to: number) => entries.slice(from + 1, to);
    const count = (list: LogEntry[], flag: number) => list.filter((e) => e.flags & flag).length;
    const describeEntries = (list: LogEntry[]) =>
      list.map((e) => `${e.index} ${flagsToString(e.flags)} ${e.sector}+${e.nrSectors}`).join("\n");
    const sectorOf = (block: number) => (block * BLOCK) / 512;

    // ext4's journal commits (REQ_PREFLUSH | REQ_FUA) arrived as flushes and FUA writes.
    const untilFsync = between(-1, at("fsynced"));
    expect(count(untilFsync, LOG_FUA_FLAG), describeEntries(untilFsync)).toBeGreaterThan(0);
    expect(count(untilFsync, LOG_FLUSH_FLAG), describeEntries(untilFsync)).toBeGreaterThan(0);

    // The O_DSYNC direct write arrived as one FUA write with its data, then a flush (the
    // block device's fsync of the written range, which the kernel issues after an O_DSYNC write).
    const fua = between(at("before-fua"), at("after-fua"));
    const fuaIndex = fua.findIndex((e) => e.sector === sectorOf(FUA_BLOCK));
    expect(fuaIndex, describeEntries(fua)).toBeGreaterThanOrEqual(0);
    const fuaWrite = fua[fuaIndex]!;
    expect(flagsToString(fuaWrite.flags)).toBe("FUA");
    expect(fuaWrite.nrSectors).toBe(BLOCK / 512);
    expect(fuaWrite.data!.equals(yes("fua", BLOCK))).toBe(true);
    expect(count(fua.slice(fuaIndex + 1), LOG_FLUSH_FLAG), describeEntries(fua)).toBeGreaterThan(0);
    console.log(`vm kernel nbd: what reached udm for the O_DIRECT|O_DSYNC write:\n${describeEntries(fua)}`);

    // The fsync'd buffered write: logged (log-writes logs a plain write only once a flush after
    // it completes), with a flush after it, before the next mark.
    const flush = between(at("after-fua"), at("after-flush"));
    const plain = flush.findIndex((e) => e.sector === sectorOf(FLUSH_BLOCK));
    expect(plain, describeEntries(flush)).toBeGreaterThanOrEqual(0);
    expect(flagsToString(flush[plain]!.flags)).toBe("NONE");
    expect(flush[plain]!.data!.equals(yes("flush", BLOCK))).toBe(true);
    expect(count(flush.slice(plain + 1), LOG_FLUSH_FLAG), describeEntries(flush)).toBeGreaterThan(0);
    console.log(`vm kernel nbd: what reached udm for write + fsync:\n${describeEntries(flush)}`);

    // The data is on udm's backing file, and the filesystem is clean.
    await toolOk("e2fsck", ["-fn", data]);
    expect(sha256(Buffer.from((await toolOk("debugfs", ["-R", "cat /hello", data])).stdout, "binary"))).toBe(
      sha256(FILE_BYTES),
    );

    // Replaying the log up to the mark taken after the fsync gives a filesystem holding the
    // file: what the fsync made durable did reach udm as durable.
    const replay = makeFile(path.join(env.files, "replay.img"), DEVICE_BYTES);
    await toolOk(process.execPath, [REPLAY_LOG, "--log", log, "--replay", replay, "--end-mark", "fsynced"]);
    const recovered = await tool("e2fsck", ["-fy", replay]); // replays the journal
    expect(recovered.code, recovered.stdout + recovered.stderr).toBeLessThanOrEqual(1);
    await toolOk("e2fsck", ["-fn", replay]);
    const replayed = await toolOk("debugfs", ["-R", "cat /hello", replay]);
    expect(sha256(Buffer.from(replayed.stdout, "binary"))).toBe(sha256(FILE_BYTES));
  }, 600_000);
});
