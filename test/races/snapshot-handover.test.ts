/**
 * Exception-store handover (docs/snapshot.md, "Reloading a snapshot (handover)"; dm-snap.c:
 * snapshot_preresume, snapshot_resume): reloading an active snapshot's table hands its store and
 * exceptions to the new table instead of reading the metadata twice. R12: the handover quiesces the
 * origin device, so a pending exception started by an origin write completes into the store before
 * the store changes owner.
 */
import { describe, expect, it } from "vitest";
import { readCowImage } from "../../targets/snapshot/cow-image.js";
import type { SnapshotTarget } from "../../targets/snapshot/snapshot.js";
import { chunkOf, pattern, settleAll, snapshotRig } from "../support/snapshot-rig.js";

const CS = 8;
const SIZE = 256;

async function rig() {
  const r = await snapshotRig({ originSectors: SIZE, snaps: [{ name: "s", cs: CS }] });
  const table = `0 ${SIZE} snapshot origin cow-s P ${CS}`;
  return { ...r, table };
}

describe("snapshot reload (handover)", () => {
  it("a reloaded snapshot keeps its point-in-time data and the store is never read twice", async () => {
    const { dm, io, base, snaps, initial, table, target, cows } = await rig();
    await io.write(base, 0, pattern(2, CS * 512)).promise; // chunk 0 copied into the first table's store
    await dm.load("s", table); // destination: must not read the metadata
    const dest = dm.device("s").inactive!.targets[0] as SnapshotTarget;
    expect(dest.handoverSource).toBe(target<SnapshotTarget>("s"));
    await io.write(base, CS, pattern(3, CS * 512)).promise; // chunk 1, still the source's job
    await dm.suspend("s");
    await dm.resume("s");
    expect(target<SnapshotTarget>("s")).toBe(dest);
    await io.write(base, 2 * CS, pattern(4, CS * 512)).promise; // chunk 2, now the destination's
    const whole = await io.read(snaps.s!, 0, SIZE).promise;
    expect(whole.data.equals(initial)).toBe(true);
    const image = await readCowImage(cows.s!.readSync(0, cows.s!.sizeSectors));
    expect(image.records.map((e) => [e.oldChunk, e.newChunk])).toEqual([
      [0, 2],
      [1, 3],
      [2, 4],
    ]);
    expect(dm.status("s")[0]!.params).toBe(`${5 * CS}/${cows.s!.sizeSectors} ${2 * CS}`);
  });

  it("R12: resume waits for the origin to quiesce; the pending copy commits into the handed-over store", async () => {
    const { dm, io, base, snaps, initial, table, cows } = await rig();
    const cow = cows.s!;
    cow.hold((bio) => bio.op === "write");
    const w = io.write(base, 0, pattern(5, CS * 512)); // origin write → copy into COW (held)
    const [copyWrite] = await cow.waitForHeld(1);
    await dm.load("s", table);
    let resumed = false;
    const resuming = (async () => {
      await dm.suspend("s");
      await dm.resume("s");
      resumed = true;
    })();
    await settleAll();
    expect(resumed).toBe(false); // the origin write is still in flight: the origin cannot quiesce
    expect(w.completions).toBe(0);
    copyWrite!.release();
    // The metadata commit (PREFLUSH|FUA) is the next COW write; release everything from here on.
    cow.stopHolding(cow.hold(() => false));
    // Each round releases what the engine has issued by then (the commit, then the origin write's
    // own I/O); a handful is plenty, and a regression says what never happened.
    for (let round = 0; cow.held().length > 0 || w.completions === 0; round++) {
      if (round === 20)
        throw new Error(
          `after ${round} rounds of releases the origin write has ${w.completions ? "" : "not "}completed ` +
            `and ${cow.held().length} COW I/Os are still held: the pending copy never committed into the handed-over store`,
        );
      for (const h of cow.held()) h.release();
      await settleAll();
    }
    await resuming;
    expect(resumed).toBe(true);
    expect(w.status).toBe("ok");
    const snap = await io.read(snaps.s!, 0, CS).promise;
    expect(snap.data.equals(chunkOf(initial, CS, 0))).toBe(true);
    expect((await readCowImage(cow.readSync(0, cow.sizeSectors))).records.map((e) => e.oldChunk)).toEqual([0]);
  });

  it("refuses a third table on the same COW", async () => {
    const { dm, table } = await rig();
    await dm.load("s", table);
    await dm.create("other", { table: `0 ${SIZE} zero` });
    await expect(dm.load("other", table)).rejects.toThrow(
      "snapshot: Snapshot cow pairing for exception table handover failed",
    );
    expect(dm.tableText("other")).toBe(`0 ${SIZE} zero \n`);
  });

  it("refuses to resume the source while a handover waits", async () => {
    const { dm, table } = await rig();
    await dm.create("s2");
    await dm.load("s2", table);
    await dm.suspend("s");
    await expect(dm.resume("s")).rejects.toThrow("Unable to resume snapshot source until handover completes.");
  });

  it("refuses the handover until the source is suspended", async () => {
    const { dm, table } = await rig();
    await dm.create("s2");
    await dm.load("s2", table); // destination on another device; the source "s" is not suspended
    await expect(dm.resume("s2")).rejects.toThrow("Unable to perform snapshot handover until source is suspended.");
    await dm.suspend("s");
    await dm.resume("s2");
    expect(dm.status("s")[0]!.params).toBe("Invalid"); // the source gave its store away
    expect(dm.status("s2")[0]!.params).toMatch(/^\d+\/\d+ \d+$/);
  });

  it("cancels a pending handover when the destination's source is removed", async () => {
    const { dm, table, target } = await rig();
    await dm.create("s2");
    await dm.load("s2", table);
    const dest = dm.device("s2").inactive!.targets[0] as SnapshotTarget;
    expect(target<SnapshotTarget>("s").handoverDestination).toBe(dest);
    await dm.remove("s");
    expect(dest.valid).toBe(false);
    expect(dest.handoverSource).toBeNull();
  });
});

describe("handover under origin writes", () => {
  it("origin writes held by the internal suspend are copied into the destination, never past it", async () => {
    const { dm, io, base, snaps, initial, table, cows } = await rig();
    const cow = cows.s!;
    await dm.load("s", table);
    await dm.suspend("s");
    // An origin write in flight makes the handover's internal suspend hold the next ones.
    cow.hold((bio) => bio.op === "write");
    const first = io.write(base, 0, pattern(7, CS * 512));
    await cow.waitForHeld(1);
    const resuming = dm.resume("s");
    await settleAll();
    const held = [1, 2, 3].map((c) => io.write(base, c * CS, pattern(10 + c, CS * 512))); // queued behind the suspend
    cow.stopHolding(cow.hold(() => false));
    for (let i = 0; i < 50 && (first.completions === 0 || held.some((h) => h.completions === 0)); i++) {
      for (const h of cow.held()) h.release();
      await settleAll();
    }
    await resuming;
    await Promise.all(held.map((h) => h.promise));
    const snap = await io.read(snaps.s!, 0, 4 * CS).promise;
    expect(snap.data.equals(initial.subarray(0, 4 * CS * 512))).toBe(true);
  });
});
