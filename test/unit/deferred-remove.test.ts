/**
 * `remove --deferred` (DM_DEFERRED_REMOVE): a busy device is marked instead of refused, keeps
 * working, and is removed when its last opener closes it (dm_blk_close → dm_deferred_remove);
 * `@cancel_deferred_remove` takes the mark back; an idle device goes at once.
 */
import { describe, expect, it } from "vitest";
import { pattern, testMapper } from "../../testing/memory-backing.js";

describe("deferred remove", () => {
  it("marks an open device, which keeps working and goes at its last close", async () => {
    const { dm, backing } = testMapper();
    backing.memory("mem", 64);
    await dm.create("d", { table: "0 64 linear mem 0" });
    const h1 = dm.open("d");
    const h2 = dm.open("d");
    await dm.remove("d", { deferred: true });
    expect(dm.info("d")).toMatchObject({ deferredRemove: true, openCount: 2 });
    await h1.write(0, pattern(1, 512));
    expect((await h2.read(0, 1)).equals(pattern(1, 512))).toBe(true);
    await h1.close();
    expect(dm.has("d")).toBe(true);
    await h2.close();
    expect(dm.has("d")).toBe(false);
  });

  it("outside openers (the users of an attached kernel device) count; when they go, a marked device goes", async () => {
    const { dm, backing } = testMapper();
    backing.memory("mem", 64);
    await dm.create("d", { table: "0 64 linear mem 0" });
    const md = dm.device("d");
    let users = 2;
    md.setOutsideOpeners(() => users);
    expect(dm.info("d").openCount).toBe(2);
    await expect(dm.remove("d")).rejects.toThrow("device is open (open count 2)");
    await dm.remove("d", { deferred: true });
    expect(dm.info("d")).toMatchObject({ deferredRemove: true, openCount: 2 });
    const nbdClient = dm.open("d");
    users = 0;
    await md.outsideOpenersClosed(); // an NBD client still has it
    expect(dm.has("d")).toBe(true);
    users = 1;
    await nbdClient.close(); // a mount still has it
    expect(dm.has("d")).toBe(true);
    users = 0;
    md.setOutsideOpeners(null); // detached
    await md.outsideOpenersClosed();
    expect(dm.has("d")).toBe(false);
  });

  it("a device held by another table goes once that table has let it go", async () => {
    const { dm, backing } = testMapper();
    backing.memory("mem", 64);
    await dm.create("low", { table: "0 64 linear mem 0" });
    await dm.create("top", { table: "0 64 linear /dev/mapper/low 0" });
    await dm.remove("low", { deferred: true });
    expect(dm.info("low").deferredRemove).toBe(true);
    const low = dm.device("low");
    await dm.remove("top");
    await low.waitEvent(low.eventNr); // returns once low is removed
    expect(dm.list()).toEqual([]);
  });

  it("@cancel_deferred_remove takes the mark back; an idle device goes at once", async () => {
    const { dm, backing } = testMapper();
    backing.memory("mem", 64);
    await dm.create("d", { table: "0 64 linear mem 0" });
    const h = dm.open("d");
    await dm.remove("d", { deferred: true });
    await dm.message("d", 0, "@cancel_deferred_remove");
    expect(dm.info("d").deferredRemove).toBe(false);
    await h.close();
    expect(dm.has("d")).toBe(true);
    await dm.remove("d", { deferred: true });
    expect(dm.has("d")).toBe(false);
  });
});
