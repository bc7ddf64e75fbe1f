/**
 * dust (dm-dust.c 1.0.0): ctr errors with the kernel's messages, status lines, every message with
 * its exact result string or error, and the bad-block behaviour: reads of a bad block fail with EIO
 * once enabled, writes fail while the block's write-fail count lasts and then heal it, quiet mode
 * silences the log.
 */
import { beforeEach, describe, expect, it } from "vitest";
import { submitAndWait, writeBio } from "../../core/bio.js";
import type { DeviceHandle, DeviceMapper } from "../../core/device-mapper.js";
import { MemoryLogger } from "../../core/logger.js";
import { createDeviceMapper } from "../../index.js";
import { pattern } from "../../testing/memory-backing.js";
import {
  type RecordingDevice,
  rejection,
  TrackingBacking,
  expectCtrError as expectCtrErrorIn,
  readDevice,
} from "../support/recording-device.js";

let backing: TrackingBacking;
let logger: MemoryLogger;
let dm: DeviceMapper;
let mem0: RecordingDevice;

beforeEach(() => {
  backing = new TrackingBacking();
  logger = new MemoryLogger();
  dm = createDeviceMapper({ backing, logger });
  mem0 = backing.recorded("mem0", 1000);
});

/** A table line's ctr must fail with exactly this message (and errno), leaving nothing behind. */
const expectCtrError = (line: string, message: string, errno?: string) =>
  expectCtrErrorIn(dm, backing, line, message, errno);

/** 4 KiB blocks (8 sectors) over mem0 (1000 sectors, so blocks 0..125 are addressable). */
async function dust(params = "mem0 0 4096", len = 200): Promise<DeviceHandle> {
  await dm.create("d", { table: `0 ${len} dust ${params}` });
  return dm.open("d");
}

const msg = (text: string) => dm.message("d", 0, text);
const info = () => dm.status("d")[0]!.params;

async function expectMsgError(text: string, message: string): Promise<void> {
  const err = await rejection(msg(text));
  expect({ message: err.message, errno: err.errno }).toEqual({ message: `dust: ${message}`, errno: "EINVAL" });
}

/** The dust lines logged since the last call. */
let logged = 0;
function dustLog(): string[] {
  const lines = logger.records.slice(logged).filter((r) => r.msg.startsWith("dust: "));
  logged = logger.records.length;
  return lines.map((r) => `${r.level} ${r.msg.slice(6)}`);
}
beforeEach(() => {
  logged = 0;
});

describe("dust constructor", () => {
  it.each([
    ["", "Invalid argument count"],
    ["mem0 0", "Invalid argument count"],
    ["mem0 0 512 x", "Invalid argument count"],
    ["mem0 0 x", "Invalid block size parameter"],
    ["mem0 0 0", "Invalid block size parameter"],
    ["mem0 0 -512", "Invalid block size parameter"],
    ["mem0 0 4294967296", "Invalid block size parameter"],
    ["mem0 0 256", "Block size must be at least 512"],
    ["mem0 0 1536", "Block size must be a power of 2"],
    // The block may not be larger than the target (8 sectors here) ...
    ["mem0 0 8192", "Block size is too large"],
    ["mem0 x 512", "Invalid device offset sector"],
    ["mem0 -8 512", "Invalid device offset sector"],
    // ... the block size is checked before the offset, both before the device.
    ["nosuch x 256", "Block size must be at least 512"],
    ["nosuch x 512", "Invalid device offset sector"],
  ])("rejects '%s' with '%s'", async (args, message) => {
    await expectCtrError(`0 8 dust ${args}`, `dust: ${message}`);
  });

  it("rejects blocks over 1 GiB however long the target is", async () => {
    backing.recorded("big", 8 * 1024 * 1024);
    await expectCtrError("0 4194304 dust big 0 2147483648", "dust: Block size is too large");
    await dm.create("ok", { table: "0 4194304 dust big 0 1073741824" });
  });

  it("fails a missing device with 'Device lookup failed' and EINVAL (dust_ctr ignores the lookup's errno)", async () => {
    await expectCtrError("0 8 dust nosuch 0 512", "dust: Device lookup failed", "EINVAL");
  });

  it("checks the device area it maps", async () => {
    await expectCtrError("0 16 dust mem0 990 512", "mem0 too small for target: start=990, len=16, dev_size=1000");
  });

  it("registers as dust 1.0.0", () => {
    expect(dm.targets().find((t) => t.name === "dust")?.version).toEqual([1, 0, 0]);
  });
});

describe("dust status", () => {
  it("reports TABLE '<dev> <offset> <blksz>' and INFO '<dev> bypass|fail_read_on_bad_block verbose|quiet'", async () => {
    await dust("mem0 016 4096");
    expect(dm.tableText("d")).toBe("0 200 dust mem0 16 4096\n");
    expect(info()).toBe("mem0 bypass verbose");
    await msg("enable");
    expect(info()).toBe("mem0 fail_read_on_bad_block verbose");
    await msg("quiet");
    expect(info()).toBe("mem0 fail_read_on_bad_block quiet");
    await msg("disable");
    await msg("quiet");
    expect(info()).toBe("mem0 bypass verbose");
  });
});

describe("dust messages", () => {
  beforeEach(async () => {
    await dust();
  });

  it("adds, queries, counts, lists, removes and clears bad blocks with the kernel's result strings", async () => {
    expect(await msg("countbadblocks")).toBe("countbadblocks: 0 badblock(s) found");
    expect(await msg("listbadblocks")).toBe("No blocks in badblocklist");
    expect(await msg("clearbadblocks")).toBe("dust_clear_badblocks: no badblocks found");
    expect(await msg("addbadblock 60")).toBeUndefined();
    expect(await msg("addbadblock 5")).toBeUndefined();
    expect(await msg("addbadblock 17 3")).toBeUndefined();
    expect(await msg("queryblock 5")).toBe("dust_query_block: block 5 found in badblocklist");
    expect(await msg("queryblock 6")).toBe("dust_query_block: block 6 not found in badblocklist");
    expect(await msg("countbadblocks")).toBe("countbadblocks: 3 badblock(s) found");
    expect(await msg("listbadblocks")).toBe("5\n17\n60\n");
    expect(await msg("removebadblock 17")).toBeUndefined();
    expect(await msg("listbadblocks")).toBe("5\n60\n");
    expect(await msg("clearbadblocks")).toBe("dust_clear_badblocks: badblocks cleared");
    expect(await msg("countbadblocks")).toBe("countbadblocks: 0 badblock(s) found");
    expect(await msg("queryblock 5")).toBe("dust_query_block: block 5 not found in badblocklist");
  });

  it("matches message names case-insensitively", async () => {
    await msg("AddBadBlock 7");
    expect(await msg("QUERYBLOCK 7")).toBe("dust_query_block: block 7 found in badblocklist");
    await msg("Enable");
    expect(info()).toBe("mem0 fail_read_on_bad_block verbose");
  });

  it("refuses a block already listed, or removing one that is not", async () => {
    await msg("addbadblock 5");
    await expectMsgError("addbadblock 5", "dust_add_block: block 5 already in badblocklist");
    await expectMsgError("addbadblock 5 2", "dust_add_block: block 5 already in badblocklist");
    await expectMsgError("removebadblock 6", "dust_remove_block: block 6 not found in badblocklist");
    expect(await msg("countbadblocks")).toBe("countbadblocks: 1 badblock(s) found");
  });

  it("accepts blocks up to device size / block size inclusive", async () => {
    // mem0 is 1000 sectors = 125 whole blocks of 8; the kernel compares block > 125.
    expect(await msg("addbadblock 125")).toBeUndefined();
    await expectMsgError("addbadblock 126", "selected block value out of range");
    await expectMsgError("queryblock 126", "selected block value out of range");
    await expectMsgError("removebadblock 1000", "selected block value out of range");
    await expectMsgError("addbadblock 126 1", "selected block value out of range");
  });

  it.each([
    ["addbadblock", "addbadblock requires an additional argument"],
    ["removebadblock", "removebadblock requires an additional argument"],
    ["QueryBlock", "QueryBlock requires an additional argument"],
    ["bogus", "unrecognized message 'bogus' received"],
    ["bogus 5", "unrecognized message 'bogus' received"],
    ["queryblock 5 1", "unrecognized message 'queryblock' received"],
    ["removebadblock 5 1", "unrecognized message 'removebadblock' received"],
    ["addbadblock 5 256", "selected write fail count out of range"],
    ["addbadblock 5 1 2", "invalid number of arguments '4'"],
    ["addbadblock x", "invalid block number 'x'"],
    ["addbadblock -1", "invalid block number '-1'"],
    ["addbadblock 5 x", "invalid write fail count 'x'"],
    // The number is parsed (and range-checked) before the message name is looked at.
    ["bogus x", "invalid block number 'x'"],
    ["bogus 999", "selected block value out of range"],
  ])("fails '%s' with EINVAL: '%s'", async (text, message) => {
    await expectMsgError(text, message);
  });
});

describe("dust bad blocks", () => {
  const readDisk = (sector: number, sectors: number) => readDevice(mem0, sector, sectors);

  it("passes everything in bypass mode; once enabled, reads of a bad block fail with EIO", async () => {
    const h = await dust();
    await h.write(0, pattern(1, 24 * 512));
    await msg("addbadblock 1");
    expect((await h.read(8, 8)).equals(pattern(1, 24 * 512).subarray(8 * 512, 16 * 512))).toBe(true);
    await msg("enable");
    for (const s of [8, 11, 15]) await expect(h.read(s, 1)).rejects.toMatchObject({ status: "EIO" });
    await h.read(0, 8);
    await h.read(16, 8);
    // A read over blocks 0..2 is split at block boundaries; the block-1 piece fails it.
    await expect(h.read(4, 16)).rejects.toMatchObject({ status: "EIO" });
    await msg("disable");
    await h.read(8, 8);
    await h.close();
  });

  it("numbers blocks on the underlying device, after the offset", async () => {
    // Offset 16 sectors = 2 blocks: target sectors 8..15 are device block 3.
    const h = await dust("mem0 16 4096");
    await msg("addbadblock 3");
    await msg("enable");
    await h.read(0, 8);
    await expect(h.read(8, 1)).rejects.toMatchObject({ status: "EIO" });
    await h.read(16, 1);
    await h.close();
  });

  it("a write to a bad block heals it (and is written)", async () => {
    const h = await dust();
    await msg("addbadblock 1");
    await msg("enable");
    const data = pattern(2, 512);
    await h.write(9, data);
    expect((await readDisk(9, 1)).equals(data)).toBe(true);
    expect(await msg("queryblock 1")).toBe("dust_query_block: block 1 not found in badblocklist");
    expect((await h.read(8, 8)).subarray(512, 1024).equals(data)).toBe(true);
    await h.close();
  });

  it("a write fails with EIO while the block's write-fail count lasts, then heals it", async () => {
    const h = await dust();
    await writeDiskBlock(2, 0x11);
    await msg("addbadblock 2 2");
    await msg("enable");
    mem0.clearLog();
    await expect(h.write(16, Buffer.alloc(512, 0x22))).rejects.toMatchObject({ status: "EIO" });
    await expect(h.write(17, Buffer.alloc(512, 0x22))).rejects.toMatchObject({ status: "EIO" });
    expect(mem0.count("write")).toBe(0);
    expect((await readDisk(16, 1))[0]).toBe(0x11);
    await expect(h.read(16, 1)).rejects.toMatchObject({ status: "EIO" });
    await h.write(16, Buffer.alloc(512, 0x33));
    expect((await readDisk(16, 1))[0]).toBe(0x33);
    expect((await h.read(16, 1))[0]).toBe(0x33);
    expect(await msg("countbadblocks")).toBe("countbadblocks: 0 badblock(s) found");
    await h.close();
  });

  it("writes do not heal in bypass mode", async () => {
    const h = await dust();
    await msg("addbadblock 1");
    await h.write(8, pattern(3, 512));
    expect(await msg("queryblock 1")).toBe("dust_query_block: block 1 found in badblocklist");
    await h.close();
  });

  it("a discard is a write: it heals a bad block", async () => {
    const h = await dust();
    await msg("addbadblock 4");
    await msg("enable");
    await h.discard(32, 8);
    expect(await msg("queryblock 4")).toBe("dust_query_block: block 4 not found in badblocklist");
    await h.close();
  });

  it("lets empty flushes through even when block 0 is bad", async () => {
    const h = await dust();
    await msg("addbadblock 0 5");
    await msg("enable");
    await h.flush();
    expect(mem0.count("flush")).toBe(1);
    expect(await msg("queryblock 0")).toBe("dust_query_block: block 0 found in badblocklist");
    await h.close();
  });

  async function writeDiskBlock(block: number, byte: number): Promise<void> {
    await submitAndWait(mem0, writeBio(block * 8, Buffer.alloc(8 * 512, byte)));
  }
});

describe("dust logging and quiet mode", () => {
  it("logs additions, removals and healing unless quiet; errors are returned either way", async () => {
    const h = await dust();
    dustLog();
    await msg("addbadblock 5");
    await msg("removebadblock 5");
    await expectMsgError("removebadblock 5", "dust_remove_block: block 5 not found in badblocklist");
    await msg("enable");
    await msg("addbadblock 9 1");
    await expect(h.write(72, pattern(4, 512))).rejects.toMatchObject({ status: "EIO" });
    await h.write(72, pattern(4, 512));
    expect(dustLog()).toEqual([
      "info dust_add_block: badblock added at block 5 with write fail count 0",
      "info dust_remove_block: badblock removed at block 5",
      "error dust_remove_block: block 5 not found in badblocklist",
      "info enabling read failures on bad sectors",
      "info dust_add_block: badblock added at block 9 with write fail count 1",
      // The kernel divides the healed block number by sectors per block once more (9 / 8).
      "info block 1 removed from badblocklist by write",
    ]);

    await msg("quiet");
    await msg("addbadblock 5");
    await expectMsgError("addbadblock 5", "dust_add_block: block 5 already in badblocklist");
    await msg("removebadblock 5");
    await expectMsgError("removebadblock 5", "dust_remove_block: block 5 not found in badblocklist");
    await msg("addbadblock 9");
    await h.write(72, pattern(5, 512));
    // Range errors and enable/disable are logged even when quiet.
    await expectMsgError("addbadblock 1000", "selected block value out of range");
    await msg("disable");
    expect(dustLog()).toEqual([
      "error selected block value out of range",
      "info disabling read failures on bad sectors",
    ]);

    await msg("quiet"); // toggles back to verbose
    await msg("addbadblock 5");
    expect(dustLog()).toEqual(["info dust_add_block: badblock added at block 5 with write fail count 0"]);
    await h.close();
  });
});
