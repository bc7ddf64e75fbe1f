/**
 * The built-in targets (dm-linear.c, dm-stripe.c, dm-zero.c, dm-target.c's error target) and the
 * core's handling of their I/O: argument errors with their exact messages, mapping checked on the
 * RAM disks underneath, status lines, flush/discard fan-out (dm.c: __send_empty_flush,
 * __send_changing_extent_only) and splitting at target and chunk boundaries (dm.c: max_io_len).
 */
import { beforeEach, describe, expect, it } from "vitest";
import { BioFlags, submitAndWait, writeBio } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { MemoryDevice } from "../../core/devices/memory-device.js";
import type { DeviceHandle, DeviceMapper } from "../../core/device-mapper.js";
import { pattern } from "../../testing/memory-backing.js";
import {
  type IoRecord,
  type RecordingDevice,
  trackingMapper,
  type TrackingBacking,
  expectCtrError as expectCtrErrorIn,
  readDevice,
} from "../support/recording-device.js";

let dm: DeviceMapper;
let backing: TrackingBacking;
/** Every bio mem0..mem3 received, in order. */
let log: IoRecord[];
let mem: RecordingDevice[];

beforeEach(() => {
  ({ dm, backing } = trackingMapper());
  log = [];
  mem = [0, 1, 2, 3].map((i) => backing.recorded(`mem${i}`, 1000, { log }));
});

/** A table line's ctr must fail with exactly this message (and errno), leaving nothing behind. */
const expectCtrError = (line: string, message: string, errno?: string) =>
  expectCtrErrorIn(dm, backing, line, message, errno);

async function writeDirect(dev: BlockDevice, sector: number, data: Buffer): Promise<void> {
  await submitAndWait(dev, writeBio(sector, data));
}

/** The bios a device received, without flags, as `op@sector+sectors`. */
function ios(dev: RecordingDevice): string[] {
  return dev.received.map((r) => `${r.op}@${r.sector}+${r.sectors}`);
}

async function openFresh(name: string): Promise<DeviceHandle> {
  const h = dm.open(name);
  for (const m of mem) m.clearLog();
  return h;
}

describe("target registry", () => {
  it("registers the built-in targets with the kernel's versions", () => {
    const versions = Object.fromEntries(dm.targets().map((t) => [t.name, t.version]));
    expect(versions).toMatchObject({
      linear: [1, 5, 0],
      striped: [1, 6, 0],
      zero: [1, 2, 0],
      error: [1, 7, 0],
    });
  });
});

describe("linear", () => {
  it.each([
    ["", "Invalid argument count"],
    ["mem0", "Invalid argument count"],
    ["mem0 0 0", "Invalid argument count"],
    ["mem0 -1", "Invalid device sector"],
    ["mem0 12x", "Invalid device sector"],
    ["mem0 1.5", "Invalid device sector"],
    ["mem0 99999999999999999999", "Invalid device sector"],
    ["nosuch x", "Invalid device sector"],
  ])("rejects arguments '%s' with '%s'", async (args, message) => {
    await expectCtrError(`0 10 linear ${args}`, `linear: ${message}`);
  });

  it("fails a missing device with 'Device lookup failed', the lookup's reason and errno", async () => {
    // linear_ctr returns dm_get_device's error (ENOENT for a path that does not exist).
    await expectCtrError("0 10 linear nosuch 0", "linear: Device lookup failed: nosuch: no such test device", "ENOENT");
  });

  it("remaps every sector by the offset", async () => {
    await dm.create("lin", { table: "0 100 linear mem0 50" });
    const h = dm.open("lin");
    const data = pattern(1, 10 * 512);
    await h.write(5, data);
    expect((await readDevice(mem[0]!, 55, 10)).equals(data)).toBe(true);
    await writeDirect(mem[0]!, 140, pattern(2, 512));
    expect((await h.read(90, 1)).equals(pattern(2, 512))).toBe(true);
    await h.close();
  });

  it("passes discard and write-zeroes through, remapped", async () => {
    await dm.create("lin", { table: "0 100 linear mem0 50" });
    const h = await openFresh("lin");
    await h.discard(10, 20);
    await h.writeZeroes(30, 5);
    expect(ios(mem[0]!)).toEqual(["discard@60+20", "write-zeroes@80+5"]);
    await h.close();
  });

  it("reports TABLE as '<dev> <offset>' and an empty INFO", async () => {
    await dm.create("lin", { table: "0 100 linear mem0 50\n100 20 linear mem1 0" });
    expect(dm.table("lin")).toEqual([
      { start: 0, length: 100, type: "linear", params: "mem0 50" },
      { start: 100, length: 20, type: "linear", params: "mem1 0" },
    ]);
    expect(dm.status("lin").map((l) => l.params)).toEqual(["", ""]);
    expect(dm.tableText("lin")).toBe("0 100 linear mem0 50\n100 20 linear mem1 0\n");
  });
});

describe("striped", () => {
  it.each([
    ["0 16 striped", "Not enough arguments"],
    ["0 16 striped 2", "Not enough arguments"],
    ["0 16 striped 0 8 mem0 0", "Invalid stripe count"],
    ["0 16 striped x 8 mem0 0", "Invalid stripe count"],
    ["0 16 striped -2 8 mem0 0", "Invalid stripe count"],
    ["0 16 striped 0 0", "Invalid stripe count"],
    ["0 16 striped 2 0 mem0 0 mem1 0", "Invalid chunk_size"],
    ["0 16 striped 2 8k mem0 0 mem1 0", "Invalid chunk_size"],
    ["0 15 striped 2 1 mem0 0 mem1 0", "Target length not divisible by number of stripes"],
    ["0 16 striped 2 3 mem0 0 mem1 0", "Target length not divisible by chunk size"],
    ["0 16 striped 2 8 mem0 0", "Not enough destinations specified"],
    ["0 16 striped 2 8 mem0 0 mem1", "Not enough destinations specified"],
    ["0 16 striped 2 8 mem0 0 mem1 0 mem2 0", "Not enough destinations specified"],
    ["0 16 striped 2 8 mem0 0 mem1 x", "Couldn't parse stripe destination"],
    ["0 16 striped 2 8 mem0 -1 mem1 0", "Couldn't parse stripe destination"],
  ])("rejects '%s' with '%s'", async (line, message) => {
    await expectCtrError(line, `striped: ${message}`);
  });

  it("fails a missing stripe device with 'Couldn't parse stripe destination' and the lookup's errno", async () => {
    // stripe_ctr returns get_stripe's error, which is dm_get_device's (ENOENT here).
    await expectCtrError(
      "0 16 striped 2 8 mem0 0 nosuch 0",
      "striped: Couldn't parse stripe destination: nosuch: no such test device",
      "ENOENT",
    );
  });

  it("places chunk c on stripe c % n at row c / n, after each stripe's offset", async () => {
    // 3 stripes of 4-sector chunks: 12 chunks, 4 rows.
    await dm.create("st", { table: "0 48 striped 3 4 mem0 10 mem1 20 mem2 30" });
    const h = dm.open("st");
    const data = pattern(3, 48 * 512);
    await h.write(0, data);
    const offsets = [10, 20, 30];
    for (let c = 0; c < 12; c++) {
      const stripe = c % 3;
      const row = Math.floor(c / 3);
      const onDisk = await readDevice(mem[stripe]!, offsets[stripe]! + row * 4, 4);
      expect(onDisk.equals(data.subarray(c * 4 * 512, (c + 1) * 4 * 512)), `chunk ${c}`).toBe(true);
    }
    expect((await h.read(0, 48)).equals(data)).toBe(true);
    await h.close();
  });

  it("maps a chunk size that is not a power of two", async () => {
    await dm.create("st", { table: "0 12 striped 2 3 mem0 0 mem1 100" });
    const h = dm.open("st");
    for (let s = 0; s < 12; s++) await h.write(s, Buffer.alloc(512, s + 1));
    // Chunks of 3: [0,3)→mem0@0 [3,6)→mem1@100 [6,9)→mem0@3 [9,12)→mem1@103.
    const firstByte = async (dev: RecordingDevice, sector: number) => (await readDevice(dev, sector, 1))[0];
    expect(await Promise.all([0, 1, 2, 3, 4, 5].map((s) => firstByte(mem[0]!, s)))).toEqual([1, 2, 3, 7, 8, 9]);
    expect(await Promise.all([100, 101, 102, 103, 104, 105].map((s) => firstByte(mem[1]!, s)))).toEqual([
      4, 5, 6, 10, 11, 12,
    ]);
    await h.close();
  });

  it("reports TABLE as '<n> <chunk> (<dev> <offset>)...'", async () => {
    await dm.create("st", { table: "0 64 striped 2 16 mem0 8 mem1 0" });
    expect(dm.table("st")[0]!.params).toBe("2 16 mem0 8 mem1 0");
  });

  it("reports INFO as '<n> <devs> 1 <A|D...>', all alive at first", async () => {
    await dm.create("st", { table: "0 64 striped 2 16 mem0 8 mem1 0" });
    expect(dm.status("st")[0]!.params).toBe("2 mem0 mem1 1 AA");
  });

  describe("errors on one stripe", () => {
    beforeEach(async () => {
      await dm.create("st", { table: "0 64 striped 2 8 mem0 0 mem1 0" });
    });

    it("marks only the failing stripe D and raises one table event per failed clone", async () => {
      mem[1]!.failWhen = (bio) => (bio.op === "write" ? "EIO" : undefined);
      const h = dm.open("st");
      await h.write(0, pattern(4, 8 * 512)); // chunk 0: stripe 0, fine
      expect(dm.info("st").eventNr).toBe(0);
      await expect(h.write(8, pattern(5, 8 * 512))).rejects.toMatchObject({ status: "EIO" }); // chunk 1: stripe 1
      expect(dm.status("st")[0]!.params).toBe("2 mem0 mem1 1 AD");
      expect(dm.info("st").eventNr).toBe(1);
      // A write over chunks 0..3 fails as a whole; its two stripe-1 clones are two errors.
      await expect(h.write(0, pattern(6, 32 * 512))).rejects.toMatchObject({ status: "EIO" });
      expect(dm.info("st").eventNr).toBe(3);
      expect((await readDevice(mem[0]!, 0, 8)).equals(pattern(6, 32 * 512).subarray(0, 8 * 512))).toBe(true);
      await h.close();
    });

    it("stops raising events once a stripe has 15 errors (DM_IO_ERROR_THRESHOLD)", async () => {
      mem[0]!.failWhen = () => "EIO";
      const h = dm.open("st");
      for (let i = 0; i < 14; i++) await expect(h.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
      expect(dm.info("st").eventNr).toBe(14);
      for (let i = 0; i < 3; i++) await expect(h.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
      expect(dm.info("st").eventNr).toBe(14);
      expect(dm.status("st")[0]!.params).toBe("2 mem0 mem1 1 DA");
      await h.close();
    });

    it("does not count a failed readahead", async () => {
      mem[0]!.failWhen = () => "EIO";
      const h = dm.open("st");
      await expect(h.read(0, 8, BioFlags.RAHEAD)).rejects.toMatchObject({ status: "EIO" });
      expect(dm.status("st")[0]!.params).toBe("2 mem0 mem1 1 AA");
      expect(dm.info("st").eventNr).toBe(0);
      await h.close();
    });

    it("does not count EOPNOTSUPP", async () => {
      mem[0]!.failWhen = (bio) => (bio.op === "discard" ? "EOPNOTSUPP" : undefined);
      const h = dm.open("st");
      await expect(h.discard(0, 8)).rejects.toMatchObject({ status: "EOPNOTSUPP" });
      expect(dm.status("st")[0]!.params).toBe("2 mem0 mem1 1 AA");
      expect(dm.info("st").eventNr).toBe(0);
      await h.close();
    });
  });

  it("counts an error against every stripe on the failing device", async () => {
    // stripe_end_io compares device names and does not stop at the first match.
    await dm.create("st", { table: "0 32 striped 2 8 mem0 0 mem0 100" });
    mem[0]!.failWhen = (bio) => (bio.op === "write" ? "EIO" : undefined);
    const h = dm.open("st");
    await expect(h.write(0, pattern(7, 512))).rejects.toMatchObject({ status: "EIO" });
    expect(dm.status("st")[0]!.params).toBe("2 mem0 mem0 1 DD");
    // Both stripes schedule the same work item (trigger_event): one failed clone, one event.
    expect(dm.info("st").eventNr).toBe(1);
    await h.close();
  });
});

describe("zero", () => {
  it("rejects any argument", async () => {
    await expectCtrError("0 10 zero x", "zero: No arguments required");
  });

  it("reads zeros, whatever the buffer held", async () => {
    await dm.create("z", { table: "0 64 zero" });
    const h = dm.open("z");
    const buf = Buffer.alloc(16 * 512, 0xaa);
    await h.readInto(8, buf);
    expect(buf.every((b) => b === 0)).toBe(true);
    await h.close();
  });

  it("accepts writes and drops the data", async () => {
    await dm.create("z", { table: "0 64 zero" });
    const h = dm.open("z");
    await h.write(0, pattern(8, 8 * 512));
    expect((await h.read(0, 8)).every((b) => b === 0)).toBe(true);
    await h.close();
  });

  it("fails readahead instead of zero-filling it", async () => {
    await dm.create("z", { table: "0 64 zero" });
    const h = dm.open("z");
    await expect(h.read(0, 8, BioFlags.RAHEAD)).rejects.toMatchObject({ status: "EIO" });
    await h.close();
  });

  it("accepts discards and flushes but not write-zeroes", async () => {
    await dm.create("z", { table: "0 64 zero" });
    const h = dm.open("z");
    await expect(h.discard(0, 64)).resolves.toBeUndefined();
    await expect(h.flush()).resolves.toBeUndefined();
    await expect(h.writeZeroes(0, 8)).rejects.toMatchObject({ status: "EOPNOTSUPP" });
    await h.close();
  });

  it("has empty TABLE and INFO", async () => {
    await dm.create("z", { table: "0 64 zero" });
    expect(dm.tableText("z")).toBe("0 64 zero \n");
    expect(dm.status("z")[0]!.params).toBe("");
  });
});

describe("error", () => {
  it.each(["", "a", "a b c", "nosuch"])("accepts and ignores the argument list '%s'", async (args) => {
    await dm.create("e", { table: `0 10 error ${args}` });
    expect(dm.tableText("e")).toBe("0 10 error \n");
    expect(backing.openHandles).toBe(0);
  });

  it("rejects a bad offset in an optional '<dev> <offset>' pair", async () => {
    await expectCtrError("0 10 error mem0 x", "error: Invalid device sector");
  });

  it("fails a missing device in the pair with 'Device lookup failed' and the lookup's errno", async () => {
    await expectCtrError("0 10 error nosuch 0", "error: Device lookup failed: nosuch: no such test device", "ENOENT");
  });

  it("opens the device it is given but does not echo it in its status", async () => {
    await dm.create("e", { table: "0 10 error mem0 5" });
    expect(dm.deps("e").map((d) => d.tableName)).toEqual(["mem0"]);
    expect(dm.tableText("e")).toBe("0 10 error \n");
    await dm.remove("e");
    expect(backing.openHandles).toBe(0);
  });

  it("checks the area of the device it is given", async () => {
    // io_err_iterate_devices reports (dev, start, ti->len) like linear.
    await expectCtrError("0 10 error mem0 995", "mem0 too small for target: start=995, len=10, dev_size=1000");
  });

  it("fails reads, writes and discards with EIO, not flushes; write-zeroes are unsupported", async () => {
    await dm.create("e", { table: "0 64 error" });
    const h = dm.open("e");
    await expect(h.read(0, 8)).rejects.toMatchObject({ status: "EIO" });
    await expect(h.write(0, pattern(9, 512))).rejects.toMatchObject({ status: "EIO" });
    await expect(h.discard(0, 8)).rejects.toMatchObject({ status: "EIO" });
    await expect(h.writeZeroes(0, 8)).rejects.toMatchObject({ status: "EOPNOTSUPP" });
    await expect(h.flush()).resolves.toBeUndefined();
    await h.close();
  });
});

describe("flush fan-out", () => {
  const table = "0 64 striped 2 8 mem0 0 mem1 0\n64 32 linear mem2 0\n96 8 zero\n104 8 error";

  it("sends an empty flush to each stripe once and to the linear device once", async () => {
    await dm.create("f", { table });
    const h = await openFresh("f");
    await h.flush();
    expect(log.map((r) => `${r.device} ${r.op}+${r.sectors}`).sort()).toEqual([
      "mem0 flush+0",
      "mem1 flush+0",
      "mem2 flush+0",
    ]);
    await h.close();
  });

  it("flushes first, then writes the data without PREFLUSH but with FUA", async () => {
    await dm.create("f", { table });
    const h = await openFresh("f");
    await h.write(60, pattern(10, 8 * 512), { preflush: true, fua: true });
    const flushes = log.slice(0, 3);
    expect(flushes.map((r) => `${r.device} ${r.op}`).sort()).toEqual(["mem0 flush", "mem1 flush", "mem2 flush"]);
    // Sectors 60..63 are the end of chunk 7 (stripe 1, row 3); 64..67 start the linear target.
    expect(log.slice(3)).toEqual([
      { device: "mem1", op: "write", sector: 28, sectors: 4, flags: BioFlags.FUA },
      { device: "mem2", op: "write", sector: 0, sectors: 4, flags: BioFlags.FUA },
    ]);
    await h.close();
  });

  it("does not write the data when the flush fails", async () => {
    await dm.create("f", { table });
    mem[2]!.failWhen = (bio) => (bio.op === "flush" ? "EIO" : undefined);
    const h = await openFresh("f");
    await expect(h.write(0, pattern(11, 512), { preflush: true })).rejects.toMatchObject({ status: "EIO" });
    expect(log.filter((r) => r.op === "write")).toEqual([]);
    await h.close();
  });
});

describe("discard and write-zeroes fan-out", () => {
  it.each(["discard", "write-zeroes"] as const)("gives each stripe only its part of a %s range", async (op) => {
    // 2 stripes of 8-sector chunks; offsets 4..44 cover chunks 0..5 partially at both ends.
    await dm.create("d", { table: "0 64 striped 2 8 mem0 100 mem1 200" });
    const h = await openFresh("d");
    if (op === "discard") await h.discard(4, 40);
    else await h.writeZeroes(4, 40);
    // Stripe 0 holds chunks 0, 2, 4: [4,8) [16,24) [32,40) → its sectors 4..24.
    // Stripe 1 holds chunks 1, 3, 5: [8,16) [24,32) [40,44) → its sectors 0..20.
    expect(ios(mem[0]!)).toEqual([`${op}@104+20`]);
    expect(ios(mem[1]!)).toEqual([`${op}@200+20`]);
    await h.close();
  });

  it("sends nothing to a stripe the range does not touch, and clips at target boundaries", async () => {
    await dm.create("d", { table: "0 64 striped 2 8 mem0 0 mem1 0\n64 32 linear mem2 0" });
    const h = await openFresh("d");
    await h.discard(60, 10);
    expect(ios(mem[0]!)).toEqual([]);
    expect(ios(mem[1]!)).toEqual(["discard@28+4"]);
    expect(ios(mem[2]!)).toEqual(["discard@0+6"]);
    await h.close();
  });

  it("discards the data on the RAM disks underneath", async () => {
    await dm.create("d", { table: "0 64 striped 2 8 mem0 0 mem1 0" });
    const h = dm.open("d");
    await h.write(0, pattern(12, 64 * 512));
    await h.discard(0, 64);
    expect((await h.read(0, 64)).every((b) => b === 0)).toBe(true);
    expect((mem[0]!.inner as MemoryDevice).allocatedPages).toBe(0);
    expect((mem[1]!.inner as MemoryDevice).allocatedPages).toBe(0);
    await h.close();
  });

  it("fails write-zeroes anywhere on a device one of whose targets cannot do it", async () => {
    // num_write_zeroes_bios == 0 on any target makes the op unsupported on the whole md
    // (dm-table.c: dm_table_supports_write_zeroes).
    await dm.create("d", { table: "0 32 linear mem0 0\n32 32 zero" });
    const h = await openFresh("d");
    await expect(h.writeZeroes(28, 8)).rejects.toMatchObject({ status: "EOPNOTSUPP" });
    await expect(h.writeZeroes(0, 32)).rejects.toMatchObject({ status: "EOPNOTSUPP" });
    expect(ios(mem[0]!)).toEqual([]);
    await h.close();
  });
});

describe("splitting reads and writes", () => {
  const table = "0 32 linear mem0 0\n32 64 striped 2 8 mem1 0 mem2 0";

  it("cuts a read at the target boundary and at every stripe chunk", async () => {
    await dm.create("s", { table });
    const h = await openFresh("s");
    await h.read(28, 24);
    // [28,32) linear; then striped offsets [0,8) [8,16) [16,20).
    expect(log.map((r) => `${r.device} ${r.op}@${r.sector}+${r.sectors}`)).toEqual([
      "mem0 read@28+4",
      "mem1 read@0+8",
      "mem2 read@0+8",
      "mem1 read@8+4",
    ]);
    await h.close();
  });

  it("puts each piece of a split write where the mapping says", async () => {
    await dm.create("s", { table });
    const h = await openFresh("s");
    const data = pattern(13, 24 * 512);
    await h.write(28, data);
    expect(ios(mem[0]!)).toEqual(["write@28+4"]);
    expect(ios(mem[1]!)).toEqual(["write@0+8", "write@8+4"]);
    expect(ios(mem[2]!)).toEqual(["write@0+8"]);
    const piece = (from: number, sectors: number) => data.subarray(from * 512, (from + sectors) * 512);
    expect((await readDevice(mem[0]!, 28, 4)).equals(piece(0, 4))).toBe(true);
    expect((await readDevice(mem[1]!, 0, 8)).equals(piece(4, 8))).toBe(true);
    expect((await readDevice(mem[2]!, 0, 8)).equals(piece(12, 8))).toBe(true);
    expect((await readDevice(mem[1]!, 8, 4)).equals(piece(20, 4))).toBe(true);
    expect((await h.read(28, 24)).equals(data)).toBe(true);
    await h.close();
  });

  it("never lets a striped clone cross a chunk, even when it starts mid-chunk", async () => {
    await dm.create("s", { table: "0 60 striped 2 6 mem1 0 mem2 0" });
    const h = await openFresh("s");
    await h.read(5, 14);
    expect(log.map((r) => `${r.device}@${r.sector}+${r.sectors}`)).toEqual([
      "mem1@5+1",
      "mem2@0+6",
      "mem1@6+6",
      "mem2@6+1",
    ]);
    await h.close();
  });
});
