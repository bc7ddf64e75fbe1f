/**
 * Load-time validation of tables (dm-ioctl.c: table_load, populate_table; dm-table.c:
 * dm_table_add_target, dm_split_args, device_area_is_invalid): every rule, its exact message and
 * errno, the order the kernel applies them in, and that a rejected table leaves nothing behind (no
 * device, no open backing handle, previous tables untouched).
 */
import { beforeEach, describe, expect, it } from "vitest";
import type { Bio } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { DmError } from "../../core/errors.js";
import { target } from "../../core/registry.js";
import { parseTableText } from "../../core/table-text.js";
import { MapResult, Target, TargetError, TargetFeatures } from "../../core/target.js";
import { rejection, trackingMapper, type TrackingBacking } from "../support/recording-device.js";

// ---- test target types ----

/** Accepts any arguments; completes every bio itself. */
abstract class StubTarget extends Target {
  ctr(_args: string[]): void {}
  map(bio: Bio): MapResult {
    if (bio.op === "read") bio.data.fill(0);
    bio.complete("ok");
    return MapResult.SUBMITTED;
  }
}

@target({ name: "solo", version: [1, 0, 0], features: TargetFeatures.SINGLETON })
class SoloTarget extends StubTarget {}

@target({ name: "rw-only", version: [1, 0, 0], features: TargetFeatures.ALWAYS_WRITEABLE })
class AlwaysWriteableTarget extends StubTarget {}

/** Immutable but not singleton: several lines of it may share a table (dm_table_add_target). */
@target({ name: "immut", version: [1, 0, 0], features: TargetFeatures.IMMUTABLE })
class ImmutableTarget extends StubTarget {}

/** Singleton and immutable, like thin-pool and multipath. */
@target({ name: "pool", version: [1, 0, 0], features: TargetFeatures.SINGLETON | TargetFeatures.IMMUTABLE })
class PoolTarget extends StubTarget {}

/** Shows the argv its ctr received as JSON in its TABLE status. */
@target({ name: "echo", version: [1, 0, 0] })
class EchoTarget extends StubTarget {
  private args: string[] = [];
  override ctr(args: string[]): void {
    this.args = args;
  }
  override status(): string {
    return JSON.stringify(this.args);
  }
}

/** Asks for a max_io_len above UINT_MAX. */
@target({ name: "bigio", version: [1, 0, 0] })
class BigIoTarget extends StubTarget {
  override ctr(): void {
    this.maxIoLen = 2 ** 32;
  }
}

/** Logs ctr/dtr calls; fails its ctr when given the argument `fail`. */
const lifeLog: string[] = [];
@target({ name: "life", version: [1, 0, 0] })
class LifeTarget extends StubTarget {
  override ctr(args: string[]): void {
    lifeLog.push(`ctr ${this.begin}`);
    if (args[0] === "fail") throw new TargetError("asked to fail");
  }
  override dtr(): void {
    lifeLog.push(`dtr ${this.begin}`);
  }
}

const TEST_TARGETS = [
  SoloTarget,
  AlwaysWriteableTarget,
  ImmutableTarget,
  PoolTarget,
  EchoTarget,
  BigIoTarget,
  LifeTarget,
];

// ---- helpers ----

let dm: DeviceMapper;
let backing: TrackingBacking;

beforeEach(() => {
  ({ dm, backing } = trackingMapper());
  dm.registry.register(...TEST_TARGETS);
  backing.memory("mem0", 100);
  backing.memory("mem1", 100);
  lifeLog.length = 0;
});

interface Expected {
  message: string;
  errno?: string;
}

/** `create` must fail with exactly this error and leave no device and no open handle behind. */
async function expectCreateRejected(
  table: string,
  expected: Expected,
  opts: { readOnly?: boolean } = {},
): Promise<void> {
  const err = await rejection(dm.create("dev", { table, ...opts }));
  expect(err).toBeInstanceOf(DmError);
  expect({ message: err.message, errno: err.errno }).toEqual({ errno: "EINVAL", ...expected });
  expect(dm.list()).toEqual([]);
  expect(backing.openHandles).toBe(0);
}

/** `load` into `name` must fail with this error and leave its live and inactive tables as they were. */
async function expectLoadRejected(name: string, table: string, expected: Expected): Promise<void> {
  const live = dm.tableText(name);
  const inactive = dm.tableText(name, { inactive: true });
  const infoBefore = dm.info(name);
  const handles = backing.openHandles;
  const err = await rejection(dm.load(name, table));
  expect({ message: err.message, errno: err.errno }).toEqual({ errno: "EINVAL", ...expected });
  expect(dm.tableText(name)).toBe(live);
  expect(dm.tableText(name, { inactive: true })).toBe(inactive);
  expect(dm.info(name)).toEqual(infoBefore);
  expect(backing.openHandles).toBe(handles);
}

function parseError(text: string, source?: string): { message: string; errno: string } {
  try {
    parseTableText(text, source);
  } catch (err) {
    expect(err).toBeInstanceOf(DmError);
    return { message: (err as DmError).message, errno: (err as DmError).errno };
  }
  throw new Error("expected parseTableText to throw");
}

// ---- table text (dmsetup's side; core/table-text.ts) ----

describe("table text parsing", () => {
  it("skips blank lines and comment lines, trims each line, and cuts parameters at '#'", () => {
    const text = [
      "# a comment line",
      "",
      "   ",
      "  0 10 linear mem0 5   # trailing comment",
      "\t# indented comment",
      "10\t20\tzero",
      "30 5 error a#b c",
    ].join("\n");
    expect(parseTableText(text)).toEqual([
      { start: 0, length: 10, type: "linear", params: "mem0 5" },
      { start: 10, length: 20, type: "zero", params: "" },
      { start: 30, length: 5, type: "error", params: "a" },
    ]);
  });

  it("reports a line without <start> <length> <type> by its line number, counting skipped lines", () => {
    expect(parseError("0 10 zero\n# comment\n\n10 x zero")).toEqual({
      errno: "EINVAL",
      message: "Invalid format on line 4 of table on stdin.",
    });
    expect(parseError("0 10", "/tmp/table.txt")).toEqual({
      errno: "EINVAL",
      message: "Invalid format on line 1 of table /tmp/table.txt.",
    });
    expect(parseError("zero 0 10").message).toBe("Invalid format on line 1 of table on stdin.");
  });

  it("refuses a target type name longer than 15 characters before the kernel sees it", () => {
    expect(parseError("0 10 abcdefghijklmnop")).toEqual({
      errno: "EINVAL",
      message: "Target type name abcdefghijklmnop is too long.",
    });
    expect(parseTableText("0 10 abcdefghijklmno")[0]!.type).toBe("abcdefghijklmno");
  });

  it("rejects a malformed line in a create with its line number and creates nothing", async () => {
    const err = await rejection(dm.create("dev", { table: "0 10 zero\n10 ten zero" }));
    expect(err.errno).toBe("EINVAL");
    expect(err.message).toMatch(/^Invalid format on line 2 of table /);
    expect(dm.list()).toEqual([]);
  });
});

// ---- kernel validation (dm-table.c: dm_table_add_target, dm_table_complete), in the kernel's order ----

describe("rule 1: a table needs at least one target", () => {
  it("rejects a create whose table text has no target lines", async () => {
    await expectCreateRejected("# nothing but a comment\n\n", { message: "no targets specified" });
  });

  it("rejects an empty load into an existing device, keeping its tables", async () => {
    await dm.create("dev", { table: "0 10 zero" });
    await dm.load("dev", "0 20 zero");
    await expectLoadRejected("dev", "", { message: "no targets specified" });
  });
});

describe("rule 2.1/2.4: singleton targets", () => {
  it("accepts a singleton target alone", async () => {
    await dm.create("dev", { table: "0 10 solo" });
    expect(dm.info("dev").targetCount).toBe(1);
  });

  it("rejects any line after a singleton, naming the singleton type", async () => {
    await expectCreateRejected("0 10 solo\n10 10 zero", { message: "target type solo must appear alone in table" });
  });

  it("checks 'must appear alone' before the next line's own length and type", async () => {
    await expectCreateRejected("0 10 solo\n10 0 nosuchtype", {
      message: "target type solo must appear alone in table",
    });
  });

  it("rejects a singleton that is not the first line", async () => {
    await expectCreateRejected("0 10 zero\n10 10 solo", {
      message: "solo: singleton target type must appear alone in table",
    });
  });
});

describe("rule 2.2: zero-length targets", () => {
  it("rejects a line of length 0", async () => {
    await expectCreateRejected("0 0 zero", { message: "zero-length target" });
  });

  it("checks the length before the type", async () => {
    await expectCreateRejected("0 0 nosuchtype", { message: "zero-length target" });
  });
});

describe("rule 2.3: unknown target types", () => {
  it("rejects a type nobody registered", async () => {
    await expectCreateRejected("0 10 nosuchtype", { message: "nosuchtype: unknown target type" });
  });

  it("checks the type before adjacency", async () => {
    await expectCreateRejected("5 10 nosuchtype", { message: "nosuchtype: unknown target type" });
  });
});

describe("rule 2.5: always-writeable targets", () => {
  it("rejects an always-writeable target in a read-only table", async () => {
    await expectCreateRejected(
      "0 10 rw-only",
      { message: "rw-only: target type may not be included in a read-only table" },
      { readOnly: true },
    );
  });

  it("accepts it in a read-write table", async () => {
    await dm.create("dev", { table: "0 10 rw-only" });
    expect(dm.info("dev").readOnly).toBe(false);
  });

  it("checks writeability before adjacency", async () => {
    await expectCreateRejected(
      "0 10 zero\n20 10 rw-only",
      { message: "rw-only: target type may not be included in a read-only table" },
      { readOnly: true },
    );
  });
});

describe("rule 2.6: immutable targets within one table", () => {
  it("accepts several lines of the same immutable type", async () => {
    await dm.create("dev", { table: "0 10 immut\n10 10 immut" });
    expect(dm.info("dev").targetCount).toBe(2);
  });

  it("rejects an immutable target after a line of another type", async () => {
    await expectCreateRejected("0 10 zero\n10 10 immut", {
      message: "immut: immutable target type cannot be mixed with other target types",
    });
  });

  it("rejects another type after an immutable target", async () => {
    await expectCreateRejected("0 10 immut\n10 10 zero", {
      message: "zero: immutable target type cannot be mixed with other target types",
    });
  });

  it("checks immutability before adjacency", async () => {
    await expectCreateRejected("0 10 zero\n20 10 immut", {
      message: "immut: immutable target type cannot be mixed with other target types",
    });
  });

  it("applies the singleton rules first to a singleton immutable type", async () => {
    await expectCreateRejected("0 10 zero\n10 10 pool", {
      message: "pool: singleton target type must appear alone in table",
    });
    await expectCreateRejected("0 10 pool\n10 10 zero", { message: "target type pool must appear alone in table" });
  });
});

describe("rule 3.2.5: a device bound to an immutable type", () => {
  beforeEach(async () => {
    await dm.create("dev", { table: "0 10 immut" });
  });

  it("refuses a table of another type (after the table was built), keeping its tables", async () => {
    await expectLoadRejected("dev", "0 10 zero", { message: "can't replace immutable target type immut" });
  });

  it("reports a constructor error of the new table before the immutable-type check", async () => {
    await expectLoadRejected("dev", "0 10 linear mem0", { message: "linear: Invalid argument count" });
  });

  it("accepts the same immutable type again", async () => {
    await dm.load("dev", "0 20 immut");
    await dm.resume("dev");
    expect(dm.info("dev").sizeSectors).toBe(20);
  });

  it("accepts the wildcard error target, after which any type may follow", async () => {
    await dm.load("dev", "0 10 error");
    await dm.resume("dev");
    // md->immutable_target_type is reset from every table bound at resume (dm.c __bind).
    await dm.load("dev", "0 10 zero");
    await dm.resume("dev");
    expect(dm.table("dev")[0]!.type).toBe("zero");
  });

  it("does not bind a device whose immutable table was only loaded, never resumed", async () => {
    await dm.create("fresh");
    await dm.load("fresh", "0 10 immut");
    await dm.load("fresh", "0 10 zero");
    expect(dm.table("fresh", { inactive: true })[0]!.type).toBe("zero");
  });
});

describe("rule 2.7: adjacency ('Gap in table')", () => {
  it("requires the first target to start at sector 0", async () => {
    await expectCreateRejected("5 10 zero", { message: "zero: Gap in table" });
  });

  it("rejects a gap between targets", async () => {
    await expectCreateRejected("0 10 zero\n11 10 error", { message: "error: Gap in table" });
  });

  it("rejects overlapping targets", async () => {
    await expectCreateRejected("0 10 zero\n5 10 error", { message: "error: Gap in table" });
  });

  it("rejects targets out of order", async () => {
    await expectCreateRejected("0 10 zero\n20 10 zero\n10 10 zero", { message: "zero: Gap in table" });
  });

  it("fails before the constructor runs, so the line's devices are never opened", async () => {
    await expectCreateRejected("0 10 zero\n20 10 linear mem0 0", { message: "linear: Gap in table" });
    expect(backing.opened).toEqual([]);
  });

  it("accepts targets that tile the device exactly", async () => {
    await dm.create("dev", { table: "0 10 zero\n10 5 error\n15 85 linear mem0 0" });
    expect(dm.info("dev").sizeSectors).toBe(100);
  });
});

describe("rule 2.8: splitting parameters (dm_split_args)", () => {
  it("splits on runs of whitespace and unquotes backslash-escaped characters", async () => {
    await dm.create("dev", { table: "0 10 echo   a\\ b \t c\\\\d  e" });
    expect(JSON.parse(dm.table("dev")[0]!.params)).toEqual(["a b", "c\\d", "e"]);
  });

  it("keeps a trailing lone backslash as a literal character (only ENOMEM makes the kernel's split fail)", async () => {
    await dm.create("dev", { table: [{ start: 0, length: 10, type: "echo", params: "a b\\" }] });
    expect(JSON.parse(dm.table("dev")[0]!.params)).toEqual(["a", "b\\"]);
  });

  it("passes an empty parameter string as no arguments", async () => {
    await dm.create("dev", { table: [{ start: 0, length: 10, type: "echo", params: "   " }] });
    expect(JSON.parse(dm.table("dev")[0]!.params)).toEqual([]);
  });

  it("splits only at the C locale's white space (isspace), not at other Unicode spaces", async () => {
    await dm.create("dev", { table: [{ start: 0, length: 10, type: "echo", params: "a\u2003b\vc\fd\re" }] });
    expect(JSON.parse(dm.table("dev")[0]!.params)).toEqual(["a\u2003b", "c", "d", "e"]);
  });
});

describe("rule 2.9: constructors", () => {
  it("reports the constructor's error prefixed with the target type", async () => {
    await expectCreateRejected("0 10 linear mem0", { message: "linear: Invalid argument count" });
  });

  it("reports the first failing line: earlier lines are built before later lines are checked", async () => {
    await expectCreateRejected("0 10 linear mem0\n10 10 nosuchtype", { message: "linear: Invalid argument count" });
  });

  it("destroys every target already built when a later line fails, but not the one that failed", async () => {
    await expectCreateRejected("0 10 life\n10 10 life\n20 10 life fail", { message: "life: asked to fail" });
    expect(lifeLog).toEqual(["ctr 0", "ctr 10", "ctr 20", "dtr 0", "dtr 10"]);
  });

  it("closes the devices opened by earlier lines when a later line fails", async () => {
    await expectCreateRejected("0 10 linear mem0 0\n10 10 linear mem1 0\n20 10 zero extra", {
      message: "zero: No arguments required",
    });
    expect(backing.opened).toEqual(["mem0", "mem1"]);
  });

  it("closes the stripes a striped target opened before one of its destinations failed", async () => {
    await expectCreateRejected("0 32 striped 2 8 mem0 0 mem1 x", {
      message: "striped: Couldn't parse stripe destination",
    });
  });

  it("rejects a target asking for a max_io_len above UINT_MAX", async () => {
    await expectCreateRejected("0 10 bigio", { message: "bigio: Maximum size of target IO is too large" });
  });
});

// ---- device areas (dm-table.c: device_area_is_invalid, dm_calculate_queue_limits) ----

describe("device area checks", () => {
  it("rejects an area running past the end of its device", async () => {
    await expectCreateRejected("0 10 linear mem0 95", {
      message: "mem0 too small for target: start=95, len=10, dev_size=100",
    });
  });

  it("rejects an area starting beyond the end of its device", async () => {
    await expectCreateRejected("0 10 linear mem0 200", {
      message: "mem0 too small for target: start=200, len=10, dev_size=100",
    });
  });

  it("checks each stripe's area: offset plus the per-stripe length", async () => {
    await expectCreateRejected("0 64 striped 2 8 mem0 0 mem1 70", {
      message: "mem1 too small for target: start=70, len=32, dev_size=100",
    });
  });

  it("accepts an area that ends exactly at the end of its device", async () => {
    await dm.create("dev", { table: "0 10 linear mem0 90" });
    expect(dm.info("dev").sizeSectors).toBe(10);
  });

  it("checks areas only after every line was constructed", async () => {
    await expectCreateRejected("0 10 linear mem0 95\n10 10 nosuchtype", { message: "nosuchtype: unknown target type" });
  });

  it("does not check areas on a device of size zero (a mapped device with no table yet)", async () => {
    await dm.create("lower");
    await dm.create("upper", { table: "0 10 linear /dev/mapper/lower 0" });
    expect(dm.info("upper").sizeSectors).toBe(10);
  });

  it("checks a reloaded table's areas at resume, which fails and keeps the old table live", async () => {
    await dm.create("dev", { table: "0 10 linear mem0 0" });
    // After the first load the kernel computes queue limits only when swapping tables (dm.c: dm_swap_table).
    await dm.load("dev", "0 10 linear mem1 95");
    expect(dm.info("dev").inactivePresent).toBe(true);
    const err = await rejection(dm.resume("dev"));
    expect({ message: err.message, errno: err.errno }).toEqual({
      errno: "EINVAL",
      message: "mem1 too small for target: start=95, len=10, dev_size=100",
    });
    expect(dm.info("dev")).toMatchObject({ suspended: true, livePresent: true, inactivePresent: false });
    expect(dm.tableText("dev")).toBe("0 10 linear mem0 0\n");
    await dm.resume("dev");
    expect(dm.info("dev").suspended).toBe(false);
  });

  describe("logical block size alignment (a device with 4096-byte blocks)", () => {
    beforeEach(() => {
      backing.recorded("mem4k", 800, { logicalBlockSize: 4096 });
    });

    it("accepts an area aligned to 8 sectors", async () => {
      await dm.create("dev", { table: "0 16 linear mem4k 8" });
      expect(dm.info("dev").sizeSectors).toBe(16);
    });

    it("rejects an area whose start is not aligned", async () => {
      await expectCreateRejected("0 8 linear mem4k 4", {
        message: "start=4 not aligned to h/w logical block size 4096 of mem4k",
      });
    });

    it("rejects an area whose length is not aligned", async () => {
      await expectCreateRejected("0 12 linear mem4k 0", {
        message: "len=12 not aligned to h/w logical block size 4096 of mem4k",
      });
    });

    it("rejects a table line that starts off the device's block grid", async () => {
      // Each area is aligned on mem4k, but the line starts at sector 4 of the mapped device.
      await expectCreateRejected("0 4 zero\n4 8 linear mem4k 0", {
        message: "table line 1 (start sect 4 len 8) not aligned to h/w logical block size 4096",
      });
    });

    it("rejects a table that ends off the grid, naming the line count and the last line", async () => {
      // validate_hardware_logical_block_alignment runs off the end with sectors left over: its
      // index is then the number of lines, its target the last one.
      await expectCreateRejected("0 8 linear mem4k 0\n8 4 zero", {
        message: "table line 2 (start sect 8 len 4) not aligned to h/w logical block size 4096",
      });
    });

    it("gives a mapped device the logical block size of its table's devices", async () => {
      await dm.create("lower", { table: "0 16 linear mem4k 0" });
      expect(dm.device("lower").logicalBlockSize).toBe(4096);
      const err = await rejection(dm.create("upper", { table: "0 8 linear /dev/mapper/lower 4" }));
      expect({ message: err.message, errno: err.errno }).toEqual({
        errno: "EINVAL",
        message: "start=4 not aligned to h/w logical block size 4096 of dm-0",
      });
      await dm.create("upper", { table: "0 8 linear /dev/mapper/lower 8" });
      expect(dm.info("upper").sizeSectors).toBe(8);
    });
  });

  it("checks the first table a device loads at load time, even without a create table", async () => {
    // dm_setup_md_queue computes the limits of the first table loaded into a new device.
    await dm.create("dev");
    const err = await rejection(dm.load("dev", "0 10 linear mem0 95"));
    expect({ message: err.message, errno: err.errno }).toEqual({
      errno: "EINVAL",
      message: "mem0 too small for target: start=95, len=10, dev_size=100",
    });
    expect(dm.info("dev").inactivePresent).toBe(false);
    expect(backing.openHandles).toBe(0);
  });
});

describe("rejected loads into an existing device", () => {
  beforeEach(async () => {
    await dm.create("dev", { table: "0 10 linear mem0 0" });
    await dm.load("dev", "0 20 linear mem1 0");
  });

  it("keep the live and the inactive table after a constructor error", async () => {
    await expectLoadRejected("dev", "0 10 linear mem0 x", { message: "linear: Invalid device sector" });
  });

  it("keep both tables after an unknown type", async () => {
    await expectLoadRejected("dev", "0 10 nosuchtype", { message: "nosuchtype: unknown target type" });
  });

  it("keep both tables after a gap", async () => {
    await expectLoadRejected("dev", "0 10 zero\n20 5 zero", { message: "zero: Gap in table" });
  });

  it("keep serving I/O through the live table", async () => {
    await rejection(dm.load("dev", "0 10 nosuchtype"));
    const h = dm.open("dev");
    await expect(h.read(0, 10)).resolves.toHaveLength(10 * 512);
    await h.close();
    await dm.resume("dev");
    expect(dm.tableText("dev")).toBe("0 20 linear mem1 0\n");
  });
});
