/**
 * log-writes (dm-log-writes.c) and its replay tool: the on-disk format byte for byte, the target's
 * logging order (a write is logged when a flush that saw it completed, FUA at once, marks when
 * sent), replay to any entry or mark reproducing what was durable on the data device, and the
 * replay-log CLI on a log the target wrote to a file.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { Bio, BioFlags, SECTOR_SIZE, submitAndWait, writeBio } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { FileDevice } from "../../core/devices/file-device.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import type { DeviceHandle, DeviceMapper } from "../../core/device-mapper.js";
import { main as replayLogMain } from "../../dmsetup/bin/replay-log.js";
import {
  LOG_DISCARD_FLAG,
  LOG_FLUSH_FLAG,
  LOG_FUA_FLAG,
  LOG_MARK_FLAG,
  LOG_METADATA_FLAG,
  LogDecoder,
  type LogEntry,
  decodeEntryBlock,
  decodeLog,
  decodeSuper,
  encodeEntry,
  encodeEntryBlock,
  encodeLog,
  encodeSuper,
  flagsToString,
  markName,
} from "../../targets/log-writes/format.js";
import { LogReader, bufferLogSource, findEntry, replayLog } from "../../targets/log-writes/replay.js";
import type { LogWritesTarget } from "../../targets/log-writes/target.js";
import { ControlledDevice } from "../../testing/controlled-device.js";
import { type NamedBacking, pattern, testMapper } from "../../testing/memory-backing.js";

const DATA_SECTORS = 1024;

let dm: DeviceMapper;
let backing: NamedBacking;

beforeEach(() => {
  ({ dm, backing } = testMapper());
});

afterEach(async () => {
  await dm.close();
});

async function readAll(dev: BlockDevice): Promise<Buffer> {
  const buf = Buffer.alloc(dev.sizeSectors * SECTOR_SIZE);
  await submitAndWait(dev, new Bio("read", 0, dev.sizeSectors, buf, 0, null));
  return buf;
}

function targetOf(name: string): LogWritesTarget {
  return dm.device(name).live!.targets[0] as LogWritesTarget;
}

/** Short description of an entry for order assertions. */
function describeEntry(e: LogEntry): string {
  const mark = markName(e);
  return `${flagsToString(e.flags)}@${e.sector}+${e.nrSectors}${mark !== undefined ? `:${mark}` : ""}`;
}

/** What the data device holds after applying entries, computed independently of the replayer. */
function model(entries: readonly LogEntry[], sectorSize: number, bytes = DATA_SECTORS * SECTOR_SIZE): Buffer {
  const buf = Buffer.alloc(bytes);
  for (const e of entries) {
    const at = e.sector * sectorSize;
    if (e.flags & LOG_DISCARD_FLAG) buf.fill(0, at, at + e.nrSectors * sectorSize);
    else if (e.data) e.data.copy(buf, at);
  }
  return buf;
}

const hex = (buf: Buffer) => buf.toString("hex");

describe("log format", () => {
  it("lays out the super block as the kernel's struct log_write_super, padded to the sector size", () => {
    const sup = encodeSuper({ nrEntries: 3, sectorSize: 512 });
    expect(sup.length).toBe(512);
    expect(hex(sup.subarray(0, 32))).toBe(
      "7268737766736a00" + // magic 0x6a736677736872 ("rhswfsj")
        "0100000000000000" + // version 1
        "0300000000000000" + // nr_entries 3
        "00020000" + // sectorsize 512 (u32)
        "00000000", // struct padding
    );
    expect(sup.subarray(32).every((b) => b === 0)).toBe(true);
    const big = encodeSuper({ nrEntries: 0x0102030405, sectorSize: 4096 });
    expect(big.length).toBe(4096);
    expect(hex(big.subarray(16, 28))).toBe("0504030201000000" + "00100000");
    expect(decodeSuper(big)).toEqual({ version: 1, nrEntries: 0x0102030405, sectorSize: 4096 });
  });

  it("lays out entries as struct log_write_entry + data blocks, marks inline", () => {
    const data = pattern(1, 1024);
    const w = encodeEntry({ sector: 0x1234, nrSectors: 2, flags: LOG_FUA_FLAG, data }, 512);
    expect(w.length).toBe(512 + 1024);
    expect(hex(w.subarray(0, 32))).toBe(
      "3412000000000000" + "0200000000000000" + "0200000000000000" + "0000000000000000",
    );
    expect(w.subarray(32, 512).every((b) => b === 0)).toBe(true);
    expect(w.subarray(512).equals(data)).toBe(true);

    const m = encodeEntry({ sector: 0, nrSectors: 0, flags: LOG_MARK_FLAG, mark: "fsync-1" }, 512);
    expect(m.length).toBe(512);
    expect(hex(m.subarray(0, 40))).toBe(
      "0000000000000000" + "0000000000000000" + "0800000000000000" + "0700000000000000" + "667379" + "6e632d31" + "00",
    );
    expect(m.subarray(39).every((b) => b === 0)).toBe(true);

    // A discard carries no data blocks; flags combine as bits.
    const d = encodeEntry({ sector: 8, nrSectors: 16, flags: LOG_DISCARD_FLAG }, 512);
    expect(d.length).toBe(512);
    expect(d.readBigUInt64LE(16)).toBe(4n);
    expect(flagsToString(LOG_FLUSH_FLAG | LOG_FUA_FLAG)).toBe("FLUSH|FUA");
    expect(flagsToString(LOG_METADATA_FLAG | 64)).toBe("METADATA|UNKNOWN.0x40");
    expect(flagsToString(0)).toBe("NONE");
  });

  it("truncates marks to sectorsize - 33 bytes, as kstrndup(data, maxsize - 1)", () => {
    const block = encodeEntryBlock({ sector: 0, nrSectors: 0, flags: LOG_MARK_FLAG, mark: "x".repeat(600) }, 512);
    expect(block.readBigUInt64LE(24)).toBe(479n);
    expect(block[32 + 478]).toBe(0x78);
    expect(block[32 + 479]).toBe(0);
    expect(decodeEntryBlock(block).mark!.length).toBe(479);
  });

  it("rejects a bad magic or version with the replay tool's messages", () => {
    const sup = encodeSuper({ nrEntries: 0, sectorSize: 512 });
    sup[0] = sup[0]! ^ 1;
    expect(() => decodeSuper(sup)).toThrow("Magic doesn't match");
    const v2 = encodeSuper({ nrEntries: 0, sectorSize: 512, version: 2 });
    expect(() => decodeSuper(v2)).toThrow("Version mismatch, wanted 1, have 2");
  });

  it("decodes incrementally in any chunking and stops at nr_entries", () => {
    const entries = [
      { sector: 1, nrSectors: 1, flags: 0, data: pattern(2, 512) },
      { sector: 0, nrSectors: 0, flags: LOG_FLUSH_FLAG },
      { sector: 4, nrSectors: 4, flags: LOG_DISCARD_FLAG },
      { sector: 0, nrSectors: 0, flags: LOG_MARK_FLAG, mark: "m" },
      { sector: 7, nrSectors: 3, flags: LOG_FUA_FLAG, data: pattern(3, 1536) },
    ];
    // One more entry on disk than the super block counts (a stale super), then garbage.
    const log = Buffer.concat([encodeLog(entries, 512, 4), encodeEntry(entries[4]!, 512), Buffer.from("garbage")]);
    const whole = decodeLog(log).entries;
    expect(whole.map(describeEntry)).toEqual(["NONE@1+1", "FLUSH@0+0", "DISCARD@4+4", "MARK@0+0:m"]);
    expect(whole.map((e) => e.offset)).toEqual([512, 1536, 2048, 2560]);
    for (const size of [1, 7, 512, 1000]) {
      const dec = new LogDecoder();
      const got: LogEntry[] = [];
      for (let i = 0; i < log.length; i += size) got.push(...dec.push(log.subarray(i, i + size)));
      dec.end();
      expect(got).toEqual(whole);
      expect(dec.done).toBe(true);
    }
    expect(decodeLog(log, { nrEntries: 5 }).entries[4]!.data).toEqual(entries[4]!.data);
    const cut = new LogDecoder();
    cut.push(log.subarray(0, 1000));
    expect(() => cut.end()).toThrow("log ends inside entry 0 of 4");
  });
});

/**
 * A log as the kernel writes it, built here straight from the structs in the reference tool's
 * log-writes.h (not with format.ts): sectorsize 4096, a stale entry past nr_entries.
 */
function kernelBuiltLog(): { log: Buffer; writes: { sector: number; data: Buffer }[] } {
  const ss = 4096;
  const block = (words: bigint[], tail?: Buffer) => {
    const b = Buffer.alloc(ss);
    words.forEach((w, i) => b.writeBigUInt64LE(w, i * 8));
    tail?.copy(b, 32);
    return b;
  };
  const sup = Buffer.alloc(ss);
  sup.writeBigUInt64LE(0x6a736677736872n, 0);
  sup.writeBigUInt64LE(1n, 8);
  sup.writeBigUInt64LE(6n, 16);
  sup.writeUInt32LE(ss, 24);
  const a = pattern(10, 2 * ss);
  const b = pattern(11, ss);
  const c = pattern(12, ss);
  const parts = [
    sup,
    block([2n, 2n, 0n, 0n]),
    a, // write 2 blocks at block 2
    block([0n, 0n, 1n, 0n]), // flush
    block([0n, 0n, 8n, 5n], Buffer.from("after")), // mark "after"
    block([2n, 1n, 4n, 0n]), // discard block 2
    block([5n, 1n, 2n, 0n]),
    b, // FUA write at block 5
    block([0n, 0n, 8n, 3n], Buffer.from("end")), // mark "end"
    block([9n, 1n, 0n, 0n]),
    c, // not counted by nr_entries
  ];
  return {
    log: Buffer.concat(parts),
    writes: [
      { sector: 2, data: a },
      { sector: 5, data: b },
    ],
  };
}

describe("a log built to the reference tool's structs", () => {
  it("decodes, finds and replays", async () => {
    const { log, writes } = kernelBuiltLog();
    const { super: sup, entries } = decodeLog(log);
    expect(sup).toEqual({ version: 1, nrEntries: 6, sectorSize: 4096 });
    expect(entries.map(describeEntry)).toEqual([
      "NONE@2+2",
      "FLUSH@0+0",
      "MARK@0+0:after",
      "DISCARD@2+1",
      "FUA@5+1",
      "MARK@0+0:end",
    ]);
    expect(entries[0]!.data).toEqual(writes[0]!.data);
    expect(entries[4]!.data).toEqual(writes[1]!.data);

    expect(await findEntry(log, { endMark: "after" })).toBe(2);
    expect(await findEntry(log, { nextFua: true })).toBe(4);
    expect(await findEntry(log, { startMark: "after", nextFlush: true })).toBe(null);
    expect(await findEntry(log, { startEntry: 1, limit: 3 })).toBe(3);

    const dev = new MemoryDevice(128);
    const r = await replayLog(log, dev, { endMark: "after" });
    expect(r).toEqual({ replayed: 3, lastEntry: 2, stoppedBy: "condition" });
    const expected = Buffer.alloc(128 * 512);
    writes[0]!.data.copy(expected, 2 * 4096);
    expect((await readAll(dev)).equals(expected)).toBe(true);

    // The rest, starting after the mark: the discard then the FUA write.
    const r2 = await replayLog(log, dev, { startMark: "after" });
    expect(r2).toEqual({ replayed: 3, lastEntry: 5, stoppedBy: "end" });
    expected.fill(0, 2 * 4096, 3 * 4096);
    writes[1]!.data.copy(expected, 5 * 4096);
    expect((await readAll(dev)).equals(expected)).toBe(true);
  });
});

describe("log-writes target", () => {
  async function create(table = `0 ${DATA_SECTORS} log-writes data log`): Promise<DeviceHandle> {
    await dm.create("lw", { table });
    return dm.open("lw");
  }

  it("checks its arguments with the kernel's messages", async () => {
    backing.memory("data", DATA_SECTORS);
    backing.memory("log", 4096);
    await expect(dm.create("a", { table: "0 100 log-writes data" })).rejects.toThrow(
      "log-writes: Invalid argument count",
    );
    await expect(dm.create("b", { table: "0 100 log-writes nodev log" })).rejects.toThrow(
      "log-writes: Device lookup failed",
    );
    await expect(dm.create("c", { table: "0 100 log-writes data nolog" })).rejects.toThrow(
      "log-writes: Log device lookup failed",
    );
    await dm.create("d", { table: "0 100 log-writes data log extra ignored" });
    expect(dm.table("d")[0]!.params).toBe("data log");
    expect(dm.status("d")[0]!.params).toBe("0 0");
    expect(dm.targets().find((t) => t.name === "log-writes")!.version).toEqual([1, 1, 0]);
  });

  it("logs writes at flushes, FUA writes and marks at once, discards like writes; dtr logs the rest", async () => {
    backing.memory("data", DATA_SECTORS);
    const logDev = backing.memory("log", 4096);
    const h = await create();
    const A = pattern(1, 8 * 512),
      B = pattern(2, 1024),
      C = pattern(3, 2048),
      D = pattern(4, 1024);
    const E = pattern(5, 512),
      F = pattern(6, 8 * 512),
      G = pattern(7, 512);
    await h.write(0, A);
    await h.write(16, B);
    await h.flush();
    await h.write(8, C, { fua: true });
    await h.write(0, D);
    await dm.message("lw", 0, "mark one");
    await h.discard(16, 2);
    await h.write(100, E, { preflush: true }); // the core flushes first, then writes E plainly
    await h.write(200, F, { preflush: true, fua: true });
    await h.write(300, G);
    await dm.message("lw", 0, "MARK two"); // strcasecmp
    await targetOf("lw").drain();

    // 12 entries (G waits for a flush); 1 super + 12 entry blocks + 25 data sectors used.
    expect(dm.status("lw")[0]!.params).toBe("12 37");
    // The super block was last rewritten after the mark.
    expect(decodeSuper(await readAll(logDev)).nrEntries).toBe(12);

    await h.close();
    await dm.remove("lw");
    const { super: sup, entries } = decodeLog(await readAll(logDev));
    expect(sup).toEqual({ version: 1, nrEntries: 14, sectorSize: 512 });
    expect(entries.map(describeEntry)).toEqual([
      "NONE@0+8",
      "NONE@16+2",
      "FLUSH@0+0",
      "FUA@8+4",
      "MARK@0+0:one",
      "NONE@0+2",
      "DISCARD@16+2",
      "FLUSH@0+0",
      "NONE@100+1",
      "FLUSH@0+0",
      "FUA@200+8",
      "MARK@0+0:two",
      "NONE@300+1",
      "MARK@0+0:dm-log-writes-end",
    ]);
    const data = Object.fromEntries(entries.filter((e) => e.data).map((e) => [e.index, e.data]));
    expect(data).toEqual({ 0: A, 1: B, 3: C, 5: D, 8: E, 10: F, 12: G });
    expect(entries[4]!.dataLen).toBe(3);
  });

  it("splices the writes completed before a flush was mapped; later completions wait for the next flush", async () => {
    const data = backing.add("data", new ControlledDevice(DATA_SECTORS, { name: "data" }));
    const logDev = backing.memory("log", 4096);
    const h = await create();
    const hold = data.hold((bio) => bio.op === "write");
    const w = [1, 2, 3].map((i) => h.write(i * 8, pattern(i, 512)));
    const [w1, w2, w3] = await data.waitForHeld(3);
    data.stopHolding(hold);
    w3!.release(); // C3
    w2!.release(); // C2
    await Promise.all([w[1], w[2]]);
    const flushHold = data.hold((bio) => bio.op === "flush");
    const flush = h.flush(); // Wflush: takes W3, W2
    const [f] = await data.waitForHeld((io) => io.op === "flush");
    data.stopHolding(flushHold);
    w1!.release(); // C1 after the flush was mapped
    await w[0];
    f!.release(); // Cflush
    await flush;
    await targetOf("lw").drain();
    await dm.message("lw", 0, "mark m");
    await targetOf("lw").drain();
    expect(decodeLog(await readAll(logDev)).entries.map(describeEntry)).toEqual([
      "NONE@24+1",
      "NONE@16+1",
      "FLUSH@0+0",
      "MARK@0+0:m",
    ]);
    await h.flush();
    await h.close();
    await dm.remove("lw");
    expect(
      decodeLog(await readAll(logDev))
        .entries.map(describeEntry)
        .slice(4),
    ).toEqual(["NONE@8+1", "FLUSH@0+0", "MARK@0+0:dm-log-writes-end"]);
  });

  it("the log replayed at any moment equals what the data device would hold after a crash", async () => {
    const data = backing.add("data", new ControlledDevice(DATA_SECTORS, { name: "data", volatileCache: true }));
    const logDev = backing.memory("log", 8192);
    const h = await create();
    const ops: (() => Promise<unknown>)[] = [];
    // Ops never overlap: the kernel logs a FUA write at once but an earlier, unflushed write to
    // the same blocks only at the next flush, so replay would put the older data on top.
    for (let i = 0; i < 40; i++) {
      const sector = i * 20;
      const len = 1 + (i % 5);
      if (i % 7 === 3) ops.push(() => h.flush());
      else if (i % 9 === 4) ops.push(() => h.discard(sector, len));
      else if (i % 6 === 5) ops.push(() => h.write(sector, pattern(100 + i, len * 512), { fua: true }));
      else if (i % 11 === 10) ops.push(() => dm.message("lw", 0, `mark m${i}`));
      else ops.push(() => h.write(sector, pattern(100 + i, len * 512), { preflush: i % 13 === 0 }));
    }
    for (const op of ops) {
      await op();
      const t = targetOf("lw");
      await t.drain();
      const nrEntries = Number(dm.status("lw")[0]!.params.split(" ")[0]);
      const replayed = new MemoryDevice(DATA_SECTORS);
      // The super block is only rewritten after FUA and MARK entries (and never before the first
      // one): count the entries the status line reports instead.
      const log = await readAll(logDev);
      encodeSuper({ nrEntries: 0, sectorSize: 512 }).copy(log);
      const reader = await LogReader.open(bufferLogSource(log), { nrEntries });
      await replayLog(reader, replayed);
      expect((await readAll(replayed)).equals(data.crash().readSync(0, DATA_SECTORS))).toBe(true);
    }
  });

  it("replay to each entry gives the model's state; replay to a mark, flush or FUA stops there", async () => {
    backing.memory("data", DATA_SECTORS);
    const logDev = backing.memory("log", 4096);
    const h = await create();
    await h.write(0, pattern(1, 4096));
    await h.write(64, pattern(2, 1024));
    await h.flush();
    await dm.message("lw", 0, "mark after-flush");
    await h.discard(0, 4);
    await h.write(2, pattern(3, 512), { fua: true });
    await h.write(200, pattern(4, 512));
    await h.flush();
    await dm.message("lw", 0, "mark last");
    await h.close();
    await dm.remove("lw");
    const log = await readAll(logDev);
    const { entries } = decodeLog(log);
    expect(entries.map(describeEntry)).toEqual([
      "NONE@0+8",
      "NONE@64+2",
      "FLUSH@0+0",
      "MARK@0+0:after-flush",
      "FUA@2+1",
      "DISCARD@0+4",
      "NONE@200+1",
      "FLUSH@0+0",
      "MARK@0+0:last",
      "MARK@0+0:dm-log-writes-end",
    ]);
    for (let k = 1; k <= entries.length; k++) {
      const dev = new MemoryDevice(DATA_SECTORS);
      const r = await replayLog(log, dev, { limit: k });
      expect(r.lastEntry).toBe(k - 1);
      expect((await readAll(dev)).equals(model(entries.slice(0, k), 512)), `after ${k} entries`).toBe(true);
    }
    const cases: [Parameters<typeof replayLog>[2], number][] = [
      [{ endMark: "after-flush" }, 3],
      [{ endMark: "last" }, 8],
      [{ nextFlush: true }, 2],
      [{ nextFua: true }, 4],
      [{ startEntry: 3, nextFlush: true }, 7],
      [{ startMark: "after-flush", limit: 2 }, 5],
      [{ endMark: "after-flush", nextFlush: true }, 3], // a mark stop overrides the flag stops
    ];
    for (const [opts, last] of cases) {
      expect(await findEntry(log, opts), JSON.stringify(opts)).toBe(last);
      const dev = new MemoryDevice(DATA_SECTORS);
      expect((await replayLog(log, dev, opts)).lastEntry).toBe(last);
      const first = opts!.startMark ? 4 : (opts!.startEntry ?? 0);
      expect((await readAll(dev)).equals(model(entries.slice(first, last + 1), 512))).toBe(true);
    }
    await expect(findEntry(log, { startMark: "nope" })).rejects.toThrow("Couldn't find starting mark");
    await expect(findEntry(log, { startEntry: 10 })).rejects.toThrow("Invalid entry number");
    // --no-discard leaves the discarded range alone.
    const dev = new MemoryDevice(DATA_SECTORS);
    await replayLog(log, dev, { discard: false, limit: 6 });
    expect((await readAll(dev)).subarray(0, 512).equals(pattern(1, 4096).subarray(0, 512))).toBe(true);
  });

  it("uses the data device's logical block size as the log's sector size", async () => {
    backing.add("data", new MemoryDevice(DATA_SECTORS, { tableName: "data", logicalBlockSize: 4096 }));
    const logDev = backing.memory("log", 4096);
    const h = await create();
    expect(dm.status("lw")[0]!.params).toBe("0 7");
    await h.write(16, pattern(1, 8192), { fua: true });
    await dm.message("lw", 0, "mark m");
    await targetOf("lw").drain();
    // super block + entry block + 2 data blocks + mark block = 5 blocks of 8 sectors
    expect(dm.status("lw")[0]!.params).toBe("2 39");
    const { super: sup, entries } = decodeLog(await readAll(logDev));
    expect(sup.sectorSize).toBe(4096);
    expect(entries.map(describeEntry)).toEqual(["FUA@2+2", "MARK@0+0:m"]);
    expect(entries[1]!.offset).toBe(4 * 4096);
    await h.close();
  });

  it("logs discards the data device cannot do, and completes them", async () => {
    backing.add("data", new ControlledDevice(DATA_SECTORS, { name: "data", supportsDiscard: false }));
    const logDev = backing.memory("log", 4096);
    const h = await create();
    await h.discard(8, 8);
    await h.flush();
    await h.close();
    await dm.remove("lw");
    expect(decodeLog(await readAll(logDev)).entries.map(describeEntry)).toEqual([
      "DISCARD@8+8",
      "FLUSH@0+0",
      "MARK@0+0:dm-log-writes-end",
    ]);
  });

  it("refuses bad messages; a full log disables logging but not I/O", async () => {
    backing.memory("data", DATA_SECTORS);
    backing.memory("log", 8);
    const h = await create();
    await expect(dm.message("lw", 0, "mark")).rejects.toThrow(
      "log-writes: Invalid log-writes message arguments, expect 2 arguments, got 1",
    );
    await expect(dm.message("lw", 0, "note x")).rejects.toThrow(
      "log-writes: Unrecognised log writes target message received: note",
    );
    await h.write(0, pattern(1, 2048), { fua: true }); // entry + 4 sectors: next sector 6 < 8
    await h.write(0, pattern(2, 512), { fua: true }); // would take sectors 6..7: next 8 >= 8
    await targetOf("lw").drain();
    expect(dm.status("lw")[0]!.params).toBe("1 7 logging_disabled");
    await h.write(0, pattern(3, 512), { fua: true });
    expect((await h.read(0, 1)).equals(pattern(3, 512))).toBe(true);
    await h.close();
  });
});

describe("udm-replay-log", () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-replay-"));
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function cli(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
    let out = "";
    let err = "";
    const code = await replayLogMain(argv, { out: (t) => void (out += t), err: (t) => void (err += t) });
    return { code, out, err };
  }

  /** Run a workload through log-writes onto a file-backed log; returns the log file and states at marks. */
  async function fileLog(): Promise<{ logFile: string; atMark: Record<string, Buffer> }> {
    const logFile = path.join(dir, "log.img");
    fs.writeFileSync(logFile, "");
    fs.truncateSync(logFile, 2 * 1024 * 1024);
    const fileDev = await FileDevice.open(logFile, { mode: "rw" });
    backing.add("log", fileDev);
    const data = backing.memory("data", DATA_SECTORS);
    await dm.create("lw", { table: `0 ${DATA_SECTORS} log-writes data log` });
    const h = dm.open("lw");
    const atMark: Record<string, Buffer> = {};
    await h.write(0, pattern(1, 4096));
    await h.write(40, pattern(2, 512), { fua: true });
    await h.flush();
    await dm.message("lw", 0, "mark one");
    atMark.one = await readAll(data);
    await h.discard(0, 2);
    await h.write(80, pattern(3, 1024));
    await h.flush();
    await dm.message("lw", 0, "mark two");
    atMark.two = await readAll(data);
    await h.close();
    await dm.remove("lw");
    await fileDev.close();
    return { logFile, atMark };
  }

  function replayFile(): string {
    const f = path.join(dir, "replay.img");
    fs.writeFileSync(f, "");
    fs.truncateSync(f, DATA_SECTORS * 512);
    return f;
  }

  it("replays a file-backed log up to a mark, an entry count, or to the end", async () => {
    const { logFile, atMark } = await fileLog();
    expect(await cli("--log", logFile)).toEqual({
      code: 0,
      out: "Log version=1, sectorsize=512, entries=9\n",
      err: "",
    });
    expect(await cli("--log", logFile, "--num-entries")).toEqual({ code: 0, out: "9\n", err: "" });
    expect(await cli("--log", logFile, "--find", "--end-mark", "one")).toEqual({ code: 0, out: "3@14\n", err: "" });
    expect(await cli("--log=" + logFile, "--find", "--end-m=two")).toEqual({ code: 0, out: "7@20\n", err: "" });
    expect(await cli("--log", logFile, "--find", "--next-flush", "--start-entry", "3")).toEqual({
      code: 0,
      out: "6@19\n",
      err: "",
    });
    expect(await cli("--log", logFile, "--find", "--end-mark", "three")).toEqual({
      code: 1,
      out: "",
      err: "Couldn't find entry\n",
    });

    for (const mark of ["one", "two"]) {
      const r = replayFile();
      expect((await cli("--log", logFile, "--replay", r, "--end-mark", mark)).code).toBe(0);
      expect(fs.readFileSync(r).equals(atMark[mark]!), mark).toBe(true);
    }
    const r = replayFile();
    const limited = await cli("--log", logFile, "--replay", r, "--limit", "0x4", "-v");
    expect(limited.code).toBe(0);
    expect(limited.out).toBe(
      [
        "replaying 0@2: sector 40, size 512, flags 0x2(FUA)",
        "replaying 1@4: sector 0, size 4096, flags 0x0(NONE)",
        "replaying 2@13: sector 0, size 0, flags 0x1(FLUSH)",
        "replaying 3@14: sector 0, size 0, flags 0x8(MARK)",
        "",
      ].join("\n"),
    );
    expect(fs.readFileSync(r).equals(atMark.one!)).toBe(true);
    // Continue after mark one to the end: the same as replaying everything.
    expect((await cli("--log", logFile, "--replay", r, "--start-mark", "one")).code).toBe(0);
    expect(fs.readFileSync(r).equals(atMark.two!)).toBe(true);
  });

  it("runs --fsck at --check points and stops when it fails", async () => {
    const { logFile } = await fileLog();
    const seen: string[] = [];
    const io = (status: number) => ({
      out: () => {},
      err: (t: string) => void seen.push(t),
      system: (cmd: string) => {
        seen.push(cmd);
        return status;
      },
    });
    expect(
      await replayLogMain(
        ["--log", logFile, "--replay", replayFile(), "--fsck", "check-it", "--check", "flush"],
        io(0),
      ),
    ).toBe(0);
    expect(seen).toEqual(["check-it", "check-it"]);
    seen.length = 0;
    expect(
      await replayLogMain(["--log", logFile, "--replay", replayFile(), "--fsck", "check-it", "--check", "fua"], io(1)),
    ).toBe(1);
    expect(seen).toEqual(["check-it", "Fsck errored out on entry 0\n"]);
    // The default runs the command with sh -c.
    const marker = path.join(dir, "ran");
    const ok = await cli("--log", logFile, "--replay", replayFile(), "--fsck", `echo x >> ${marker}`, "--check", "3");
    expect(ok.code).toBe(0);
    expect(fs.readFileSync(marker, "utf8")).toBe("x\nx\nx\n");
    // --fsck without --check (and the reverse) is a usage error.
    const bad = await cli("--log", logFile, "--replay", replayFile(), "--fsck", "true");
    expect(bad.code).toBe(1);
    expect(bad.err).toMatch(/^Usage: udm-replay-log --log <logfile> \[options\]/);
  });

  it("reports errors like the tool", async () => {
    expect((await cli()).code).toBe(1);
    expect((await cli("--bogus")).err).toMatch(/unrecognized option '--bogus'\nUsage:/);
    expect(await cli("--log", path.join(dir, "missing"))).toEqual({
      code: 1,
      out: "",
      err: `Couldn't open log ${path.join(dir, "missing")}: 2\n`,
    });
    const junk = path.join(dir, "junk");
    fs.writeFileSync(junk, Buffer.alloc(4096, 1));
    expect(await cli("--log", junk)).toEqual({ code: 1, out: "", err: "Magic doesn't match\n" });
    const { logFile } = await fileLog();
    expect(await cli("--log", logFile, "--start-entry", "9")).toEqual({
      code: 1,
      out: "",
      err: "Invalid entry number\n",
    });
    expect(await cli("--log", logFile, "--limit", "1x")).toEqual({ code: 1, out: "", err: "Invalid entry number\n" });
    expect(await cli("--log", logFile, "--start-mark", "zzz")).toEqual({
      code: 1,
      out: "",
      err: "Couldn't find starting mark\n",
    });
  });

  it("runs as the built bin (dist/dmsetup/bin/replay-log.js)", async () => {
    const bin = path.resolve(__dirname, "../../dist/dmsetup/bin/replay-log.js");
    // `npm test` builds dist/ first.
    expect(fs.existsSync(bin), "dist/ missing: run `npm run build` (npm test does)").toBe(true);
    const { logFile, atMark } = await fileLog();
    expect(
      execFileSync(process.execPath, [bin, "--log", logFile, "--find", "--end-mark", "two"], { encoding: "utf8" }),
    ).toBe("7@20\n"); // entry 7, and the log block after it, as the C tool prints
    const r = replayFile();
    execFileSync(process.execPath, [bin, "--log", logFile, "--replay", r, "--end-mark", "one"]);
    expect(fs.readFileSync(r).equals(atMark.one!)).toBe(true);
  });
});

it("keeps writes and their logged copy apart: a reused buffer does not change the log", async () => {
  const { dm: dm2, backing: b2 } = testMapper();
  b2.memory("data", 64);
  const logDev = b2.memory("log", 256);
  await dm2.create("x", { table: "0 64 log-writes data log" });
  const buf = pattern(9, 512);
  const copy = Buffer.from(buf);
  await submitAndWait(dm2.device("x"), writeBio(0, buf, BioFlags.FUA));
  buf.fill(0xee);
  await dm2.remove("x");
  expect(decodeLog(await readAll(logDev)).entries[0]!.data).toEqual(copy);
  await dm2.close();
});
