/**
 * The attached kernel device behaves like /dev/dm-N (issue 14): a table swap shows at once
 * through O_DIRECT I/O, the kernel device's page cache goes with its last close, its users are
 * the device's open count (and nbdfuse's own connections are not), `remove --deferred` completes
 * when the filesystem is unmounted, and a FUA write and a flush reach udm as the docs say
 * (docs/cli.md, "What reaches udm"). Root, FUSE, nbdfuse, coreutils dd and e2fsprogs; otherwise
 * skipped with a printed reason (a failure in CI).
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { encodeSuper, LOG_FLUSH_FLAG, LOG_FUA_FLAG, type LogEntry } from "../../targets/log-writes/format.js";
import { bufferLogSource, LogReader } from "../../targets/log-writes/replay.js";
import { attachedDevicePattern, MiB, useAttachEnv } from "../support/attach-env.js";
import { rootUnavailableReason, skipOrFail } from "../support/requirements.js";
import { sh, tool } from "../support/tools.js";

const SUITE = "attach faithfulness tests";
const skipReason = rootUnavailableReason(["dd", "mkfs.ext4"]);
skipOrFail(SUITE, skipReason);

const SECTORS = (64 * MiB) / 512;
const BLOCK = 4096;

describe.skipIf(skipReason !== null)("the attached kernel device is faithful to the live table", () => {
  const env = useAttachEnv("udm-faithful-");
  const link = () => path.join(env.devDir, env.name);

  /** Start an auto-attaching daemon and create the test's device with `table`. */
  async function createAttached(table: string): Promise<string> {
    await env.start(["--auto-attach", "--dev-dir", env.devDir]);
    expect(await env.run("create", env.name, "--table", table)).toMatchObject({ code: 0, stderr: "" });
    const dev = fs.readlinkSync(link());
    expect(dev).toMatch(attachedDevicePattern);
    return dev;
  }

  async function swapTable(table: string): Promise<void> {
    expect(await env.run("load", env.name, "--table", table)).toMatchObject({ code: 0 });
    expect(await env.run("resume", env.name)).toMatchObject({ code: 0 });
  }

  /** One 4 KiB block of `byte` written at block `block` of the device with O_DIRECT (and O_DSYNC). */
  const directWrite = (byte: string, block: number, dsync = false) =>
    tool(
      "dd",
      [
        `of=${link()}`,
        `bs=${BLOCK}`,
        "count=1",
        `seek=${block}`,
        `oflag=direct${dsync ? ",dsync" : ""}`,
        "conv=notrunc",
        "status=none",
      ],
      { input: byte.repeat(BLOCK) },
    );
  const directRead = (block: number) =>
    tool("dd", [`if=${link()}`, `bs=${BLOCK}`, "count=1", `skip=${block}`, "iflag=direct", "status=none"]);
  const fileBlock = (file: string, block: number) => {
    const buf = Buffer.alloc(BLOCK);
    const fd = fs.openSync(file, "r");
    fs.readSync(fd, buf, 0, BLOCK, block * BLOCK);
    fs.closeSync(fd);
    return buf.toString("latin1");
  };

  /** Buffered: open, write one block, fsync, close (the last close drops the device's cache). */
  const bufferedWrite = (byte: string, block: number) => {
    const fd = fs.openSync(link(), "r+");
    try {
      fs.writeSync(fd, Buffer.from(byte.repeat(BLOCK)), 0, BLOCK, block * BLOCK);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  };
  /** Buffered: open, read one block, close. */
  const bufferedRead = (block: number) => {
    const fd = fs.openSync(link(), "r");
    try {
      const buf = Buffer.alloc(BLOCK);
      fs.readSync(fd, buf, 0, BLOCK, block * BLOCK);
      return buf.toString("latin1");
    } finally {
      fs.closeSync(fd);
    }
  };

  it("O_DIRECT I/O goes through the new table at once: flakey drop_writes drops, error fails", async () => {
    await createAttached(`0 ${SECTORS} linear ${env.img} 0`);
    expect(await directWrite("A", 3)).toMatchObject({ code: 0 });
    expect((await directRead(3)).stdout).toBe("A".repeat(BLOCK));

    await swapTable(`0 ${SECTORS} flakey ${env.img} 0 0 180 1 drop_writes`);
    expect(await directWrite("B", 3)).toMatchObject({ code: 0 }); // dropped, yet completed
    expect((await directRead(3)).stdout).toBe("A".repeat(BLOCK)); // kernel dm reads A; a cache below says B
    expect(fileBlock(env.img, 3)).toBe("A".repeat(BLOCK));

    await swapTable(`0 ${SECTORS} error`);
    const failed = await directRead(3);
    expect(failed.code).not.toBe(0);
    expect(failed.stderr).toContain("Input/output error");
  });

  // BLKZEROOUT reaches nbdfuse as fallocate(ZERO_RANGE); offered no NBD WRITE_ZEROES, nbdfuse
  // 1.14 wrote 4 KiB of zeros at the range's start only, and blkdiscard -z succeeded over data
  // it had not zeroed. The server now offers WRITE_ZEROES on every table (nbd/zero-fill.ts).
  it("BLKZEROOUT zeroes the whole range on a table that cannot zero itself (flakey)", async () => {
    const dev = await createAttached(`0 ${SECTORS} flakey ${env.img} 0 60 0`);
    const fill = ["of=" + link(), "bs=2M", "count=1", "iflag=fullblock", "oflag=direct", "conv=notrunc", "status=none"];
    expect(await tool("dd", fill, { input: "Z".repeat(2 * MiB) })).toMatchObject({ code: 0 });
    expect(await tool("blkdiscard", ["-z", "-o", String(64 * 1024), "-l", String(1024 * 1024), dev])).toMatchObject({
      code: 0,
    });
    for (const block of [15, 16, 17, 100, 271, 272]) {
      const expected = (block >= 16 && block < 272 ? "\0" : "Z").repeat(BLOCK);
      expect(fileBlock(env.img, block), `block ${block} of the backing file`).toBe(expected);
      expect((await directRead(block)).stdout, `block ${block} through the device`).toBe(expected);
    }
  });

  it("buffered I/O after a table swap sees the new table, as on kernel dm once the last user has closed", async () => {
    await createAttached(`0 ${SECTORS} linear ${env.img} 0`);
    bufferedWrite("A", 3);
    expect(bufferedRead(3)).toBe("A".repeat(BLOCK));

    await swapTable(`0 ${SECTORS} flakey ${env.img} 0 0 180 1 drop_writes`);
    bufferedWrite("B", 3); // written back on fsync, dropped by the table
    expect(bufferedRead(3)).toBe("A".repeat(BLOCK)); // a cache below would answer B
    expect(fileBlock(env.img, 3)).toBe("A".repeat(BLOCK));

    await swapTable(`0 ${SECTORS} error`);
    expect(() => bufferedRead(3)).toThrow(/EIO|i\/o error/i);
  });

  it("buffered readers: the kernel device's page cache goes with its last close", async () => {
    const dev = await createAttached(`0 ${SECTORS} linear ${env.img} 0`);
    // A buffered write and read: the page is now in the kernel device's page cache.
    const fd = fs.openSync(link(), "r+");
    fs.writeSync(fd, Buffer.from("C".repeat(BLOCK)), 0, BLOCK, 5 * BLOCK);
    fs.fsyncSync(fd);
    const seen = Buffer.alloc(BLOCK);
    fs.readSync(fd, seen, 0, BLOCK, 5 * BLOCK);
    expect(seen.toString("latin1")).toBe("C".repeat(BLOCK));
    fs.closeSync(fd); // the last close: the kernel drops the device's cache, as for /dev/dm-N
    expect(fileBlock(env.img, 5)).toBe("C".repeat(BLOCK));

    // Behind udm's back, then a fresh buffered open reads what is there, not the old page.
    const img = fs.openSync(env.img, "r+");
    fs.writeSync(img, Buffer.from("D".repeat(BLOCK)), 0, BLOCK, 5 * BLOCK);
    fs.fsyncSync(img);
    fs.closeSync(img);
    const reopened = fs.openSync(dev, "r");
    fs.readSync(reopened, seen, 0, BLOCK, 5 * BLOCK);
    fs.closeSync(reopened);
    expect(seen.toString("latin1")).toBe("D".repeat(BLOCK));
  });

  it("open count: 0 when idle, each user of the kernel device counts; remove refuses while mounted; --deferred removes on unmount", async () => {
    const dev = await createAttached(`0 ${SECTORS} linear ${env.img} 0`);
    const openCount = async () => {
      const info = await env.run("info", "-c", "--noheadings", "-o", "open", env.name);
      expect(info).toMatchObject({ code: 0 });
      return Number(info.stdout.trim());
    };
    expect(await openCount()).toBe(0); // nbdfuse's connections are not users
    expect((await env.run("info", env.name)).stdout).toContain("Open count:        0\n");

    const fd = fs.openSync(link(), "r");
    expect(await openCount()).toBe(1);
    const busy = await env.run("remove", env.name);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toContain("Device or resource busy");
    fs.closeSync(fd);
    expect(await openCount()).toBe(0);

    await sh("mkfs.ext4", "-q", "-b", "4096", link());
    await sh("mount", link(), env.mnt);
    expect(await openCount()).toBe(1);
    const refused = await env.run("remove", env.name);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain(`${dev} is mounted on ${env.mnt}`);
    expect(refused.stderr).toContain("Device or resource busy");

    expect(await env.run("remove", "--deferred", env.name)).toMatchObject({ code: 0, stderr: "" });
    expect((await env.run("info", env.name)).stdout).toContain("State:             ACTIVE (DEFERRED REMOVE)\n");
    const events = (await env.run("info", "-c", "--noheadings", "-o", "events", env.name)).stdout.trim();
    fs.writeFileSync(path.join(env.mnt, "still-works"), "yes\n");
    await sh("umount", env.mnt);
    // The removal raises an event: wait returns once it is done (or says the device is gone).
    await env.run("wait", env.name, events);
    expect((await env.run("ls")).stdout).toBe("No devices found\n");
    expect(fs.existsSync(link())).toBe(false);
    expect(env.loops()).toEqual([]);
    await sh("e2fsck", "-fn", env.img); // everything written before the unmount reached the file
  });

  it("a FUA write reaches udm as a write and a flush; fsync as a flush (the loop path)", async () => {
    const logImg = path.join(env.files, "log.img");
    fs.writeFileSync(logImg, "");
    fs.truncateSync(logImg, 16 * MiB);
    await createAttached(`0 ${SECTORS} log-writes ${env.img} ${logImg}`);

    expect(await directWrite("F", 7, true)).toMatchObject({ code: 0 }); // O_DIRECT|O_DSYNC: REQ_FUA
    const fd = fs.openSync(link(), "r+");
    fs.writeSync(fd, Buffer.from("G".repeat(BLOCK)), 0, BLOCK, 9 * BLOCK);
    fs.fsyncSync(fd); // write-back, then REQ_PREFLUSH
    fs.closeSync(fd);

    expect(await env.run("suspend", env.name)).toMatchObject({ code: 0 }); // the log is written
    const status = (await env.run("status", env.name)).stdout.trim().split(" ");
    const entries = await readLog(logImg, Number(status[3]));
    const at = (sector: number) => entries.findIndex((e) => e.sector === sector && e.nrSectors > 0);
    const fuaWrite = at(7 * 8);
    const bufferedWrite = at(9 * 8);
    expect(fuaWrite).toBeGreaterThanOrEqual(0);
    expect(bufferedWrite).toBeGreaterThan(fuaWrite);
    // The loop driver has no FUA: the block layer sends the data, then a flush (blk-flush.c).
    expect(entries[fuaWrite]!.flags & LOG_FUA_FLAG).toBe(0);
    expect(entries.slice(fuaWrite + 1, bufferedWrite).some((e) => e.flags & LOG_FLUSH_FLAG)).toBe(true);
    expect(entries.slice(bufferedWrite + 1).some((e) => e.flags & LOG_FLUSH_FLAG)).toBe(true);
    expect(await env.run("resume", env.name)).toMatchObject({ code: 0 });
  });
});

/**
 * The entries of log-writes log `file`. A live target rewrites the super block only after FUA and
 * MARK entries: the count comes from its status line, and the super block is made here if the
 * target has not written one yet.
 */
async function readLog(file: string, nrEntries: number): Promise<LogEntry[]> {
  const log = fs.readFileSync(file);
  if (log.readBigUInt64LE(0) === 0n) encodeSuper({ nrEntries, sectorSize: 512 }).copy(log);
  const reader = await LogReader.open(bufferLogSource(log), { nrEntries });
  const entries: LogEntry[] = [];
  for (let e = await reader.next(); e; e = await reader.next()) entries.push(e);
  return entries;
}
