/**
 * The life of a mapped device (dm-ioctl.c: dev_create, dev_rename, table_load, table_clear,
 * do_resume, dev_remove): create/remove/rename/UUID rules, the info fields, load/clear/resume and
 * what I/O sees meanwhile, open counts and stacking, target messages (dm-ioctl.c: target_message),
 * events (dm-ioctl.c: dev_wait) and read-only tables.
 */
import { beforeEach, describe, expect, it } from "vitest";
import type { Bio } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { target } from "../../core/registry.js";
import { MapResult, Target, TargetError } from "../../core/target.js";
import { pattern } from "../../testing/memory-backing.js";
import { type RecordingDevice, rejection, trackingMapper, type TrackingBacking } from "../support/recording-device.js";

/**
 * Answers messages with `<begin>: <argv as JSON>`; `event` raises a table event, `fail` fails with
 * EBUSY. With the ctr argument `event`, it raises a table event while being constructed.
 */
@target({ name: "msg", version: [1, 0, 0] })
class MessageTarget extends Target {
  ctr(args: string[]): void {
    if (args[0] === "event") this.table.event();
  }
  map(bio: Bio): MapResult {
    if (bio.op === "read") bio.data.fill(0);
    bio.complete("ok");
    return MapResult.SUBMITTED;
  }
  override message(args: string[]): string | undefined {
    if (args[0] === "event") {
      this.table.event();
      return undefined;
    }
    if (args[0] === "fail") throw new TargetError("refused", "EBUSY");
    return `${this.begin}: ${JSON.stringify(args)}`;
  }
}

let dm: DeviceMapper;
let backing: TrackingBacking;
let mem0: RecordingDevice;

beforeEach(() => {
  ({ dm, backing } = trackingMapper());
  dm.registry.register(MessageTarget);
  mem0 = backing.recorded("mem0", 1000);
  backing.recorded("mem1", 1000);
});

async function expectError(p: Promise<unknown>, errno: string, message?: string): Promise<void> {
  const err = await rejection(p);
  expect(err.errno).toBe(errno);
  if (message !== undefined) expect(err.message).toBe(message);
}

describe("create", () => {
  it("makes a device with no tables, suspended, unopened, at event 0", async () => {
    await dm.create("a");
    expect(dm.info("a")).toEqual({
      name: "a",
      uuid: "",
      major: 253,
      minor: 0,
      suspended: true,
      readOnly: false,
      livePresent: false,
      inactivePresent: false,
      openCount: 0,
      deferredRemove: false,
      eventNr: 0,
      targetCount: 0,
      sizeSectors: 0,
    });
  });

  it("with a table, loads and resumes it", async () => {
    await dm.create("a", { uuid: "UUID-A", table: "0 100 linear mem0 0" });
    expect(dm.info("a")).toMatchObject({
      uuid: "UUID-A",
      suspended: false,
      livePresent: true,
      inactivePresent: false,
      targetCount: 1,
      sizeSectors: 100,
      eventNr: 0,
    });
  });

  it.each([
    ["a/b", "device name cannot contain '/'"],
    ["/", "device name cannot contain '/'"],
    ["control", 'device name cannot be "control", ".", or ".."'],
    [".", 'device name cannot be "control", ".", or ".."'],
    ["..", 'device name cannot be "control", ".", or ".."'],
    ["", "name not supplied when creating device"],
  ])("refuses the name '%s' with '%s'", async (name, message) => {
    await expectError(dm.create(name, { table: "0 10 linear mem0 0" }), "EINVAL", message);
    expect(dm.list()).toEqual([]);
    expect(backing.opened).toEqual([]);
  });

  it("accepts names up to 127 bytes and refuses longer ones", async () => {
    await dm.create("n".repeat(127));
    await expectError(dm.create("n".repeat(128)), "EINVAL");
    await expectError(dm.create("é".repeat(64)), "EINVAL"); // 128 bytes in UTF-8
    expect(dm.list()).toEqual(["n".repeat(127)]);
  });

  it("accepts UUIDs up to 128 bytes and refuses longer ones", async () => {
    await dm.create("a", { uuid: "u".repeat(128) });
    await expectError(dm.create("b", { uuid: "u".repeat(129) }), "EINVAL");
    expect(dm.list()).toEqual(["a"]);
  });

  it("refuses a duplicate name with EBUSY and leaves the existing device alone", async () => {
    await dm.create("a", { table: "0 100 linear mem0 0" });
    await expectError(dm.create("a", { table: "0 10 linear mem1 0" }), "EBUSY");
    expect(dm.tableText("a")).toBe("0 100 linear mem0 0\n");
    expect(backing.opened).toEqual(["mem0"]);
    expect(backing.openHandles).toBe(1);
  });

  it("refuses a duplicate UUID with EBUSY and creates nothing", async () => {
    await dm.create("a", { uuid: "U1" });
    await expectError(dm.create("b", { uuid: "U1", table: "0 10 linear mem1 0" }), "EBUSY");
    expect(dm.list()).toEqual(["a"]);
    expect(backing.openHandles).toBe(0);
  });

  it("gives the lowest free minor, reusing freed ones", async () => {
    for (const name of ["a", "b", "c"]) await dm.create(name);
    expect(["a", "b", "c"].map((n) => dm.info(n).minor)).toEqual([0, 1, 2]);
    await dm.remove("b");
    await dm.create("d");
    expect(dm.info("d").minor).toBe(1);
  });

  it("removes the device again when its table fails to load, freeing the name and minor", async () => {
    await expectError(dm.create("a", { table: "0 10 linear mem0" }), "EINVAL", "linear: Invalid argument count");
    expect(dm.has("a")).toBe(false);
    await dm.create("a");
    expect(dm.info("a").minor).toBe(0);
  });
});

describe("rename and set UUID", () => {
  it("moves the device to the new name; the old name is gone", async () => {
    await dm.create("a", { table: "0 100 linear mem0 0" });
    const h = dm.open("a");
    await dm.rename("a", "b");
    expect(dm.list()).toEqual(["b"]);
    expect(() => dm.info("a")).toThrow(expect.objectContaining({ errno: "ENXIO" }));
    expect(dm.info("b")).toMatchObject({ name: "b", minor: 0, openCount: 1, sizeSectors: 100 });
    await h.write(0, pattern(1, 512));
    expect(dm.tableText("b")).toBe("0 100 linear mem0 0\n");
    await h.close();
  });

  it.each([
    ["a/b", "device name cannot contain '/'"],
    ["control", 'device name cannot be "control", ".", or ".."'],
    ["..", 'device name cannot be "control", ".", or ".."'],
    ["", "Invalid new mapped device name or uuid string supplied."],
    ["n".repeat(128), "Invalid new mapped device name or uuid string supplied."],
  ])("refuses the new name '%s' with '%s'", async (name, message) => {
    await dm.create("a");
    await expectError(dm.rename("a", name), "EINVAL", message);
    expect(dm.list()).toEqual(["a"]);
  });

  it("refuses a name already in use with EBUSY", async () => {
    await dm.create("a");
    await dm.create("b");
    await expectError(
      dm.rename("a", "b"),
      "EBUSY",
      "Unable to change name on mapped device a to one that already exists: b",
    );
    expect(dm.list()).toEqual(["a", "b"]);
  });

  it("refuses to rename a device that does not exist with ENXIO", async () => {
    await expectError(dm.rename("ghost", "b"), "ENXIO");
  });

  it("checks that the new name is free before looking for the old device", async () => {
    await dm.create("b");
    await expectError(dm.rename("ghost", "b"), "EBUSY");
  });

  it("raises an event on the live table", async () => {
    await dm.create("a", { table: "0 100 linear mem0 0" });
    await dm.rename("a", "b");
    expect(dm.info("b").eventNr).toBe(1);
  });

  it("raises no event on a device without a live table", async () => {
    await dm.create("a");
    await dm.load("a", "0 100 linear mem0 0");
    await dm.rename("a", "b");
    expect(dm.info("b").eventNr).toBe(0);
  });

  it("sets a UUID only once", async () => {
    await dm.create("a");
    await dm.setUuid("a", "U1");
    expect(dm.info("a").uuid).toBe("U1");
    await expectError(
      dm.setUuid("a", "U2"),
      "EINVAL",
      "Unable to change uuid of mapped device a to U2 because uuid is already set to U1",
    );
    expect(dm.info("a").uuid).toBe("U1");
  });

  it("refuses an empty or too long UUID", async () => {
    await dm.create("a");
    await expectError(dm.setUuid("a", ""), "EINVAL", "Invalid new mapped device name or uuid string supplied.");
    await expectError(
      dm.setUuid("a", "u".repeat(129)),
      "EINVAL",
      "Invalid new mapped device name or uuid string supplied.",
    );
    // The limit is in bytes (DM_UUID_LEN): 65 two-byte characters are 130 bytes.
    await expectError(
      dm.setUuid("a", "é".repeat(65)),
      "EINVAL",
      "Invalid new mapped device name or uuid string supplied.",
    );
    await expectError(dm.create("b", { uuid: "é".repeat(65) }), "EINVAL");
    expect(dm.info("a").uuid).toBe("");
  });

  it("refuses a UUID another device holds with EBUSY", async () => {
    await dm.create("a", { uuid: "U1" });
    await dm.create("b");
    await expectError(
      dm.setUuid("b", "U1"),
      "EBUSY",
      "Unable to change uuid on mapped device b to one that already exists: U1",
    );
    expect(dm.info("b").uuid).toBe("");
  });

  it("raises an event on the live table when the UUID is set", async () => {
    await dm.create("a", { table: "0 100 linear mem0 0" });
    await dm.setUuid("a", "U1");
    expect(dm.info("a").eventNr).toBe(1);
  });
});

describe("load, clear and resume", () => {
  beforeEach(async () => {
    await dm.create("a", { table: "0 100 linear mem0 0" });
  });

  it("loads into the inactive slot while the live table keeps serving I/O", async () => {
    const h = dm.open("a");
    await dm.load("a", "0 50 linear mem1 0");
    expect(dm.info("a")).toMatchObject({
      livePresent: true,
      inactivePresent: true,
      suspended: false,
      sizeSectors: 100,
    });
    expect(dm.info("a", { inactive: true }).targetCount).toBe(1);
    mem0.clearLog();
    await h.read(80, 1);
    expect(mem0.received.map((r) => r.op)).toEqual(["read"]);

    await dm.resume("a");
    expect(dm.info("a")).toMatchObject({
      livePresent: true,
      inactivePresent: false,
      suspended: false,
      sizeSectors: 50,
    });
    expect(dm.tableText("a")).toBe("0 50 linear mem1 0\n");
    await h.close();
  });

  it("replaces a previously loaded inactive table, closing its devices", async () => {
    await dm.load("a", "0 50 linear mem1 0");
    expect(backing.openHandles).toBe(2);
    await dm.load("a", "0 60 zero");
    expect(dm.tableText("a", { inactive: true })).toBe("0 60 zero \n");
    expect(backing.openHandles).toBe(1);
  });

  it("does not raise events for load or resume", async () => {
    await dm.load("a", "0 50 linear mem1 0");
    await dm.resume("a");
    await dm.suspend("a");
    await dm.resume("a");
    expect(dm.info("a").eventNr).toBe(0);
  });

  it("clear drops the inactive table; the live one stays", async () => {
    await dm.load("a", "0 50 linear mem1 0");
    await dm.clear("a");
    expect(dm.info("a")).toMatchObject({ livePresent: true, inactivePresent: false, sizeSectors: 100 });
    expect(backing.openHandles).toBe(1);
    await dm.resume("a");
    expect(dm.tableText("a")).toBe("0 100 linear mem0 0\n");
    await dm.clear("a"); // nothing to clear: a no-op
    expect(dm.info("a").livePresent).toBe(true);
  });

  it("resuming a smaller table shrinks the device: I/O past the new end fails with EIO", async () => {
    const h = dm.open("a");
    await dm.load("a", "0 40 linear mem0 0");
    await dm.resume("a");
    expect(h.sizeSectors).toBe(40);
    await expect(h.read(39, 1)).resolves.toHaveLength(512);
    await expect(h.read(39, 2)).rejects.toMatchObject({ status: "EIO" });
    await expect(h.write(40, pattern(2, 512))).rejects.toMatchObject({ status: "EIO" });
    await h.close();
  });

  it("queues I/O while suspended and releases it, in order, on resume", async () => {
    const h = dm.open("a");
    await dm.suspend("a");
    await dm.suspend("a"); // suspending a suspended device is not an error
    expect(dm.info("a").suspended).toBe(true);
    mem0.clearLog();
    const first = h.write(0, pattern(3, 512));
    const second = h.read(0, 1);
    expect(h.device.queued).toBe(2);
    expect(mem0.received).toEqual([]);
    await dm.resume("a");
    await first;
    expect((await second).equals(pattern(3, 512))).toBe(true);
    expect(mem0.received.map((r) => r.op)).toEqual(["write", "read"]);
    await h.close();
  });

  it("leaves a device without any table suspended on resume, without an error", async () => {
    await dm.create("empty");
    await dm.resume("empty");
    expect(dm.info("empty")).toMatchObject({ suspended: true, livePresent: false });
  });

  it("counts each open handle", async () => {
    const h1 = dm.open("a");
    const h2 = dm.open("a");
    expect(dm.info("a").openCount).toBe(2);
    await h1.close();
    await h1.close(); // closing twice does not count twice
    expect(dm.info("a").openCount).toBe(1);
    await h2.close();
    expect(dm.info("a").openCount).toBe(0);
  });
});

describe("remove", () => {
  it("refuses with EBUSY while a handle is open, and leaves the device working", async () => {
    await dm.create("a", { table: "0 100 linear mem0 0" });
    const h = dm.open("a");
    await expectError(dm.remove("a"), "EBUSY");
    expect(dm.info("a")).toMatchObject({ openCount: 1, suspended: false, livePresent: true });
    await expect(h.read(0, 1)).resolves.toHaveLength(512);
    await h.close();
    await dm.remove("a");
    expect(dm.list()).toEqual([]);
    expect(backing.openHandles).toBe(0);
  });

  it("with force, removes an open device; its handle then fails with ENXIO", async () => {
    await dm.create("a", { table: "0 100 linear mem0 0" });
    const h = dm.open("a");
    await dm.remove("a", { force: true });
    expect(dm.list()).toEqual([]);
    expect(backing.openHandles).toBe(0);
    await expect(h.read(0, 1)).rejects.toMatchObject({ status: "ENXIO" });
  });

  it("fails I/O queued on the device with EIO", async () => {
    await dm.create("a");
    const h = dm.open("a");
    const queued = h.read(0, 1);
    await dm.remove("a", { force: true });
    await expect(queued).rejects.toMatchObject({ status: "EIO" });
  });

  it("wakes event waiters", async () => {
    await dm.create("a");
    const waiting = dm.waitEvent("a", 0);
    await dm.remove("a");
    await expect(waiting).resolves.toBeGreaterThan(0);
  });

  it("makes later operations on the name fail with ENXIO, through the returned promise", async () => {
    await dm.create("a");
    await dm.remove("a");
    expect(() => dm.info("a")).toThrow(expect.objectContaining({ errno: "ENXIO" }));
    const calls: [string, () => Promise<unknown>][] = [
      ["load", () => dm.load("a", "0 10 zero")],
      ["clear", () => dm.clear("a")],
      ["suspend", () => dm.suspend("a")],
      ["resume", () => dm.resume("a")],
      ["remove", () => dm.remove("a")],
      ["rename", () => dm.rename("a", "b")],
      ["message", () => dm.message("a", 0, "hello")],
      ["waitEvent", () => dm.waitEvent("a", 0)],
    ];
    for (const [op, call] of calls) {
      let p: Promise<unknown>;
      try {
        p = call();
      } catch (err) {
        expect.fail(`${op} threw synchronously instead of rejecting: ${(err as Error).message}`);
      }
      await expectError(p, "ENXIO");
    }
  });
});

describe("stacked devices", () => {
  beforeEach(async () => {
    await dm.create("lower", { table: "0 100 linear mem0 0" });
  });

  it("a table on /dev/mapper/lower opens lower, which cannot be removed until the upper is gone", async () => {
    await dm.create("upper", { table: "0 100 linear /dev/mapper/lower 0" });
    expect(dm.info("lower").openCount).toBe(1);
    expect(dm.table("upper")[0]!.params).toBe("253:0 0");
    expect(dm.deps("upper").map((d) => d.tableName)).toEqual(["253:0"]);
    await expectError(dm.remove("lower"), "EBUSY");
    await dm.remove("upper");
    expect(dm.info("lower").openCount).toBe(0);
    await dm.remove("lower");
    expect(backing.openHandles).toBe(0);
  });

  it("I/O flows through both devices", async () => {
    await dm.create("upper", { table: "0 50 linear /dev/mapper/lower 25" });
    const h = dm.open("upper");
    const data = pattern(4, 4 * 512);
    await h.write(10, data);
    const direct = dm.open("lower");
    expect((await direct.read(35, 4)).equals(data)).toBe(true);
    await h.close();
    await direct.close();
  });

  it("an inactive table referencing lower also holds it open, until cleared", async () => {
    await dm.create("upper");
    await dm.load("upper", "0 100 linear /dev/mapper/lower 0");
    expect(dm.info("lower").openCount).toBe(1);
    await expectError(dm.remove("lower"), "EBUSY");
    await dm.clear("upper");
    expect(dm.info("lower").openCount).toBe(0);
  });

  it("a table that uses lower in several lines opens it once", async () => {
    // dm-table.c: dm_get_device shares one dm_dev per device within a table.
    await dm.create("upper", { table: "0 50 linear /dev/mapper/lower 0\n50 50 linear /dev/mapper/lower 50" });
    expect(dm.info("lower").openCount).toBe(1);
    await dm.remove("upper");
    expect(dm.info("lower").openCount).toBe(0);
  });

  it("an upper device can be addressed by major:minor", async () => {
    await dm.create("upper", { table: "0 100 linear 253:0 0" });
    expect(dm.info("lower").openCount).toBe(1);
  });
});

describe("target messages", () => {
  beforeEach(async () => {
    await dm.create("m", { table: "0 10 msg\n10 10 msg\n20 10 zero" });
  });

  it("delivers the message to the target covering the sector and returns its answer", async () => {
    await expect(dm.message("m", 0, "hello world")).resolves.toBe('0: ["hello","world"]');
    await expect(dm.message("m", 15, "hello")).resolves.toBe('10: ["hello"]');
  });

  it("splits the message like table parameters, honouring backslash quoting", async () => {
    await expect(dm.message("m", 0, "  set  a\\ b\tc ")).resolves.toBe('0: ["set","a b","c"]');
  });

  it.each(["", "   ", "\t"])("refuses the empty message %j", async (text) => {
    await expectError(dm.message("m", 0, text), "EINVAL", "Empty message received.");
  });

  it("refuses core messages it does not know, even on a device without a table", async () => {
    await expectError(dm.message("m", 0, "@x"), "EINVAL", "Unsupported message sent to DM core: @x");
    await dm.create("bare");
    await expectError(
      dm.message("bare", 0, "@stats_bogus 1"),
      "EINVAL",
      "Unsupported message sent to DM core: @stats_bogus",
    );
  });

  it("handles @cancel_deferred_remove in the core, with exactly one argument", async () => {
    await expect(dm.message("m", 0, "@cancel_deferred_remove")).resolves.toBeUndefined();
    // message_for_md compares with strcasecmp.
    await expect(dm.message("m", 0, " @Cancel_Deferred_Remove ")).resolves.toBeUndefined();
    await expectError(
      dm.message("m", 0, "@cancel_deferred_remove now"),
      "EINVAL",
      "Invalid arguments for @cancel_deferred_remove",
    );
  });

  it("refuses a sector beyond the end of the device", async () => {
    await expectError(dm.message("m", 30, "hello"), "EINVAL", "Target message sector outside device.");
  });

  it("refuses a target type without a message hook", async () => {
    await expectError(dm.message("m", 25, "hello"), "EINVAL", "Target type does not support messages");
  });

  it("passes the target's errno through", async () => {
    await expectError(dm.message("m", 0, "fail"), "EBUSY");
  });

  it("succeeds without effect on a device without a live table, never reaching an inactive table", async () => {
    await dm.create("idle");
    await dm.load("idle", "0 10 msg");
    await expect(dm.message("idle", 0, "event")).resolves.toBeUndefined();
    await expect(dm.message("idle", 100, "hello")).resolves.toBeUndefined();
    await dm.resume("idle");
    expect(dm.info("idle").eventNr).toBe(0);
  });
});

describe("events", () => {
  it("waitEvent resolves when the device is renamed", async () => {
    await dm.create("a", { table: "0 10 msg" });
    const waiting = dm.waitEvent("a", 0);
    await dm.rename("a", "b");
    await expect(waiting).resolves.toBe(1);
  });

  it("waitEvent resolves when a stripe fails", async () => {
    await dm.create("st", { table: "0 64 striped 2 8 mem0 0 mem1 0" });
    mem0.failWhen = () => "EIO";
    const h = dm.open("st");
    const waiting = dm.waitEvent("st", 0);
    await expect(h.read(0, 1)).rejects.toMatchObject({ status: "EIO" });
    await expect(waiting).resolves.toBe(1);
    await h.close();
  });

  it("waitEvent returns at once when the event number already differs", async () => {
    await dm.create("a", { table: "0 10 msg" });
    await dm.message("a", 0, "event");
    await expect(dm.waitEvent("a", 0)).resolves.toBe(1);
  });

  it("counts events only from the live table", async () => {
    await dm.create("a", { table: "0 10 msg" });
    await dm.load("a", "0 10 msg event"); // raises an event from its ctr, before it is live
    expect(dm.info("a").eventNr).toBe(0);
    await dm.message("a", 0, "event");
    expect(dm.info("a").eventNr).toBe(1);
  });
});

describe("read-only tables", () => {
  beforeEach(async () => {
    await dm.create("ro", { readOnly: true, table: "0 100 linear mem0 0" });
  });

  it("marks the device read-only: writes and discards fail with EPERM, reads and flushes work", async () => {
    expect(dm.info("ro").readOnly).toBe(true);
    const h = dm.open("ro");
    await expect(h.write(0, pattern(5, 512))).rejects.toMatchObject({ status: "EPERM" });
    await expect(h.discard(0, 8)).rejects.toMatchObject({ status: "EPERM" });
    await expect(h.read(0, 8)).resolves.toHaveLength(8 * 512);
    await expect(h.flush()).resolves.toBeUndefined();
    expect(mem0.received.filter((r) => r.op === "write" || r.op === "discard")).toEqual([]);
    await h.close();
  });

  it("becomes writable again when a read-write table is resumed", async () => {
    await dm.load("ro", "0 100 linear mem0 0");
    expect(dm.info("ro").readOnly).toBe(true); // until the swap
    await dm.resume("ro");
    expect(dm.info("ro").readOnly).toBe(false);
    const h = dm.open("ro");
    await expect(h.write(0, pattern(6, 512))).resolves.toMatchObject({ status: "ok" });
    await h.close();
  });
});
