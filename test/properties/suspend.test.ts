/**
 * Property: random schedules of I/O, hold/release/fail of individual device I/Os, suspend
 * (noflush or not), reloads that flip the table between two devices, resume and a final remove,
 * against a `linear` mapped device over two ControlledDevices that hold every bio.
 *
 * After every run: each bio completed exactly once, with EIO iff its device I/O was failed (or it
 * was still queued when the device was removed); each write's data is on exactly the device of
 * the table that was live when it was mapped; reads see completed writes; no bio reached a device
 * while the mapped device was suspended; deferred bios reached the devices in submission order and
 * nothing submitted later overtook them; a suspended device never has I/O in flight; nothing is
 * left in flight at the end.
 *
 * Deterministic: no timers; `settle` (setImmediate) only lets promise chains run.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { Bio, type BioEndIo, type BioStatus, DmIo, SECTOR_SIZE } from "../../index.js";
import { ControlledDevice, type HeldIo } from "../../testing/controlled-device.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";

const SIZE = 1024; // sectors, mapped device and both backing devices
const SLOT = 8; // sectors per write slot
const SLOT_BYTES = SLOT * SECTOR_SIZE;
const MAX_STEPS = 60; // < SIZE / SLOT, so every write gets its own slot
const ZEROS = Buffer.alloc(SLOT_BYTES);

type DevName = "a" | "b";

type Action =
  | { kind: "write" }
  | { kind: "read"; pick: number }
  | { kind: "release"; dev: DevName; k: number }
  | { kind: "fail"; dev: DevName; k: number }
  | { kind: "suspend"; noflush: boolean }
  | { kind: "load" }
  | { kind: "resume" };

interface Step {
  action: Action;
  /** Let promise chains (the mutex, suspend waiting for idle, ...) run after this step. */
  settle: boolean;
}

const devArb = fc.constantFrom<DevName>("a", "b");
const actionArb: fc.Arbitrary<Action> = fc.oneof(
  { weight: 6, arbitrary: fc.constant({ kind: "write" as const }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant("read" as const), pick: fc.nat() }) },
  { weight: 6, arbitrary: fc.record({ kind: fc.constant("release" as const), dev: devArb, k: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("fail" as const), dev: devArb, k: fc.nat() }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant("suspend" as const), noflush: fc.boolean() }) },
  { weight: 2, arbitrary: fc.constant({ kind: "load" as const }) },
  { weight: 2, arbitrary: fc.constant({ kind: "resume" as const }) },
);
const stepArb: fc.Arbitrary<Step> = fc.record({ action: actionArb, settle: fc.boolean() });
/** How the schedule ends: a resume, a remove, or both (at least one, so queued bios complete). */
const endArb = fc.constantFrom("resume", "remove", "resume+remove");

interface Arrival {
  dev: DevName;
  /** Global order of arrival at either device. */
  order: number;
  /** `md.suspended` at the moment the bio reached the device. */
  suspended: boolean;
  /** The device the live table pointed at when the bio reached the device. */
  liveDev: string | undefined;
}

interface Rec {
  /** Submission order. */
  id: number;
  op: "read" | "write";
  slot: number;
  seed: number;
  bio: Bio;
  /** For reads: the write of the slot, and whether it had completed OK when the read was submitted. */
  write?: Rec;
  writeDoneBefore?: boolean;
  arrivals: Arrival[];
  /** Its device I/O was failed with EIO. */
  failed: boolean;
  /** Neither mapped nor completed when `submit` returned: it waited in the deferred queue. */
  deferred: boolean;
  completions: number;
  status?: BioStatus;
  /** For reads: the device contents at the slot when the read completed. */
  deviceAtCompletion?: Buffer;
}

const settle = () => new Promise<void>((r) => setImmediate(r));

async function runSchedule(steps: Step[], end: string): Promise<void> {
  const { dm, backing } = testMapper();
  const devs = {
    a: backing.add("a", new ControlledDevice(SIZE, { name: "a" })),
    b: backing.add("b", new ControlledDevice(SIZE, { name: "b" })),
  };
  await dm.create("md", { table: `0 ${SIZE} linear a 0` });
  const md = dm.device("md");

  const errors: string[] = [];
  const recs: Rec[] = [];
  const byBio = new Map<Bio, Rec>();
  const byClone = new Map<Bio, Rec>();
  let arrivalSeq = 0;

  // Invariant (1): count completions; a second one throws (and is recorded, in case a promise
  // chain swallows the throw).
  const tracker: BioEndIo = {
    bioDone(bio: Bio): void {
      const rec = byBio.get(bio);
      if (!rec) {
        errors.push(`completion of an unknown bio ${bio.op}@${bio.sector}`);
        throw new Error("unknown bio completed");
      }
      if (++rec.completions > 1) {
        errors.push(`#${rec.id} ${rec.op} slot ${rec.slot} completed ${rec.completions} times`);
        throw new Error(`#${rec.id} completed twice`);
      }
      rec.status = bio.status;
      const arrival = rec.arrivals[0];
      // A released read executes and completes synchronously inside release(): nothing can write
      // the slot in between, so this is exactly what the read saw.
      if (rec.op === "read" && arrival) rec.deviceAtCompletion = devs[arrival.dev].readSync(rec.slot * SLOT, SLOT);
    },
  };

  for (const name of ["a", "b"] as const) {
    // Every bio is held; the predicate observes it arriving (ControlledDevice.submit is synchronous).
    devs[name].hold((clone) => {
      const io = clone.endIo;
      const rec = io instanceof DmIo ? byBio.get(io.bio) : undefined;
      if (!rec) {
        errors.push(`unknown bio ${clone.op}@${clone.sector} reached ${name}`);
        return true;
      }
      byClone.set(clone, rec);
      rec.arrivals.push({ dev: name, order: arrivalSeq++, suspended: md.suspended, liveDev: md.deps()[0]?.tableName });
      return true;
    });
  }

  const control: { what: string; settled: boolean; promise: Promise<void> }[] = [];
  const start = (what: string, p: Promise<void>) => {
    const c = { what, settled: false, promise: p };
    c.promise = p.then(
      () => void (c.settled = true),
      (err: unknown) => {
        c.settled = true;
        errors.push(`${what} rejected: ${String(err)}`);
      },
    );
    control.push(c);
  };

  const writes: Rec[] = [];
  const submit = (rec: Rec) => {
    recs.push(rec);
    byBio.set(rec.bio, rec);
    rec.bio.submitTo(md);
    rec.deferred = rec.arrivals.length === 0 && rec.completions === 0;
  };
  const newRec = (op: "read" | "write", slot: number, seed: number, data: Buffer): Rec => ({
    id: recs.length,
    op,
    slot,
    seed,
    bio: new Bio(op, slot * SLOT, SLOT, data, 0, tracker),
    arrivals: [],
    failed: false,
    deferred: false,
    completions: 0,
  });
  const pickHeld = (dev: DevName, k: number): HeldIo | undefined => {
    for (const d of [dev, dev === "a" ? "b" : "a"] as const) {
      const held = devs[d].held();
      if (held.length > 0) return held[k % held.length];
    }
    return undefined;
  };

  // (7) a suspended device has nothing in flight: suspend really waited for the I/O it let in.
  const checkQuiesced = () => {
    const held = devs.a.held().length + devs.b.held().length;
    if (md.suspended && (md.inFlight !== 0 || held !== 0)) {
      errors.push(`suspended with ${md.inFlight} bios in flight and ${held} held`);
    }
  };

  let lastLoaded: DevName = "a";
  for (const { action, settle: doSettle } of steps) {
    switch (action.kind) {
      case "write": {
        const slot = writes.length;
        const rec = newRec("write", slot, 1000 + slot, pattern(1000 + slot, SLOT_BYTES));
        writes.push(rec);
        submit(rec);
        break;
      }
      case "read": {
        if (writes.length === 0) break;
        const w = writes[action.pick % writes.length]!;
        const rec = newRec("read", w.slot, w.seed, Buffer.alloc(SLOT_BYTES));
        rec.write = w;
        rec.writeDoneBefore = w.completions === 1 && w.status === "ok";
        submit(rec);
        break;
      }
      case "release":
      case "fail": {
        const io = pickHeld(action.dev, action.k);
        if (!io) break;
        if (action.kind === "fail") {
          const rec = byClone.get(io.bio);
          if (rec) rec.failed = true;
          io.fail("EIO");
        } else {
          io.release();
        }
        break;
      }
      case "suspend":
        start(`suspend${action.noflush ? " --noflush" : ""}`, dm.suspend("md", { noflush: action.noflush }));
        break;
      case "load": {
        lastLoaded = lastLoaded === "a" ? "b" : "a";
        start(`load ${lastLoaded}`, dm.load("md", `0 ${SIZE} linear ${lastLoaded} 0`));
        break;
      }
      case "resume":
        start("resume", dm.resume("md"));
        break;
    }
    if (doSettle) await settle();
    checkQuiesced();
  }

  const removed = end !== "resume";
  if (end !== "remove") start("final resume", dm.resume("md"));
  if (removed) start("remove", dm.remove("md"));

  // Release everything until quiet: no held I/O and every control operation settled.
  for (let round = 0; ; round++) {
    await settle();
    checkQuiesced();
    const held = [...devs.a.held(), ...devs.b.held()];
    if (held.length === 0 && control.every((c) => c.settled)) break;
    if (round > 1000) {
      const pending = control.filter((c) => !c.settled).map((c) => c.what);
      throw new Error(`did not quiesce: ${held.length} held, pending ${pending.join(", ")}, queued ${md.queued}`);
    }
    for (const io of held) io.release();
  }
  await Promise.all(control.map((c) => c.promise));

  expect(errors.join("\n"), "errors recorded during the run").toBe("");

  for (const rec of recs) {
    const what = `#${rec.id} ${rec.op} slot ${rec.slot}`;
    // (1) exactly one completion.
    expect(rec.completions, `${what}: completions`).toBe(1);
    expect(rec.arrivals.length, `${what}: reached a device more than once`).toBeLessThanOrEqual(1);
    const arrival = rec.arrivals[0];
    // (2) EIO iff its held I/O was failed; a bio that never reached a device can only have been
    // failed by the remove while it was queued.
    if (!arrival) {
      expect(removed, `${what}: never reached a device, yet the device was not removed`).toBe(true);
      expect(rec.deferred, `${what}: never reached a device but was not deferred`).toBe(true);
      expect(rec.status, `${what}: queued at remove`).toBe("EIO");
    } else {
      expect(rec.status, `${what}: status`).toBe(rec.failed ? "EIO" : "ok");
      // (4) nothing reaches a device while the mapped device is suspended.
      expect(arrival.suspended, `${what}: reached ${arrival.dev} while suspended`).toBe(false);
      // (3) mapped through the table that was live at that moment.
      expect(arrival.liveDev, `${what}: reached ${arrival.dev} but the live table pointed at ${arrival.liveDev}`).toBe(
        arrival.dev,
      );
    }
  }

  // (3) each write's data is at its slot on exactly the device it was mapped to (and only if it
  // succeeded); slots are never shared, so everything else is zeros.
  for (const w of writes) {
    const onDev = w.status === "ok" ? w.arrivals[0]?.dev : undefined;
    for (const name of ["a", "b"] as const) {
      const got = devs[name].readSync(w.slot * SLOT, SLOT);
      const want = name === onDev ? pattern(w.seed, SLOT_BYTES) : ZEROS;
      expect(
        got.equals(want),
        `write #${w.id} slot ${w.slot} (status ${w.status}, mapped to ${w.arrivals[0]?.dev}) on ${name}`,
      ).toBe(true);
    }
  }

  // (3) reads: they return what their device held at the slot; and if the write had completed
  // before the read was submitted, what it wrote (when both were mapped to the same device; the
  // other device never holds this slot's data, so a read there returns zeros).
  for (const r of recs) {
    if (r.op !== "read" || r.status !== "ok") continue;
    const data = r.bio.data;
    const arrival = r.arrivals[0]!;
    expect(data.equals(r.deviceAtCompletion!), `read #${r.id}: data differs from ${arrival.dev} at completion`).toBe(
      true,
    );
    if (r.writeDoneBefore) {
      const want = r.write!.arrivals[0]!.dev === arrival.dev ? pattern(r.seed, SLOT_BYTES) : ZEROS;
      expect(data.equals(want), `read #${r.id} of slot ${r.slot} after write #${r.write!.id} completed`).toBe(true);
    }
  }

  // (5) FIFO across the barrier: a bio that waited in the deferred queue is never overtaken by a
  // bio submitted after it, and if it never reached a device, neither did anything submitted later.
  for (const d of recs) {
    if (!d.deferred) continue;
    for (const x of recs) {
      if (x.id <= d.id || x.arrivals.length === 0) continue;
      expect(d.arrivals.length, `#${x.id} reached a device but the earlier deferred #${d.id} never did`).toBe(1);
      expect(x.arrivals[0]!.order, `#${x.id} overtook the earlier deferred #${d.id}`).toBeGreaterThan(
        d.arrivals[0]!.order,
      );
    }
  }

  // (6) quiet.
  expect(md.inFlight).toBe(0);
  expect(md.queued).toBe(0);
  if (removed) expect(md.removed).toBe(true);
  else await dm.close();
}

describe("suspend/resume/reload property", () => {
  it("random schedules: exactly-once completion, data on the live table's device, no I/O while suspended, FIFO deferral", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(stepArb, { minLength: 1, maxLength: MAX_STEPS, size: "max" }), endArb, runSchedule),
      { numRuns: 200 },
    );
  });
});
