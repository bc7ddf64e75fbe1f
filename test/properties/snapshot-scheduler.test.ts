/**
 * Property: a seeded scheduler over the snapshot engine. Each run builds an origin with 2–3
 * snapshots (chunk sizes 8/16/32 sectors, persistent or transient stores), holds every I/O on the
 * origin and COW devices (ControlledDevices), and plays a random schedule of origin writes and
 * reads, snapshot reads and writes (partial and whole-chunk), flushes, suspends and resumes of the
 * origin and the snapshots, and releases of held I/Os: at random, newest first (adversarial) or
 * oldest first (a FIFO device).
 *
 * Checked against a model (each snapshot = the origin when it was taken + its own writes; the
 * origin = all origin writes):
 *   - every read returns the model's data as of its submission. Two snapshot I/Os that overlap,
 *     one of them a write, are never in flight together; overlapping origin writes may be (the
 *     model then keeps every value a sector may hold), but never with an overlapping origin read;
 *   - every bio completes exactly once, successfully;
 *   - whenever a metadata commit completes, the crashed COW image (only flushed/FUA writes kept)
 *     has no duplicate exception and no unrecorded chunk below next_free (R5, R11 in
 *     docs/snapshot.md, "Race and bug tests");
 *   - at the end: origin and every snapshot equal the model, each persistent snapshot again after
 *     a reload from its COW device, and nothing is left pending, tracked or held in the gate;
 *     nothing was logged as a thrown callback.
 *
 * Persistent 8-sector-chunk snapshots start with 253 exceptions of their own (whole-chunk writes
 * outside the region the schedule uses), so metadata area 0 fills up during the run: that is where
 * out-of-order completion would leave holes (R11).
 *
 * The same property also runs with the COW throttle (dm-snap.c: wait_for_in_progress) at threshold
 * 0, so snapshot and origin writes are parked and re-mapped whenever a copy is in flight.
 *
 * A second property injects I/O errors (any held I/O may be failed) and checks what must still
 * hold: every bio completes exactly once, a successful read never returns data that the model
 * does not allow (never garbage), a snapshot is either Invalid (all its I/O fails) or still equal
 * to its model wherever no write to it failed, and the engine drains.
 *
 * The last describe runs the property against deliberately broken engines (one fix disabled at a
 * time, by patching a prototype) and expects a counterexample.
 *
 * Deterministic: fixed seeds, no timers; `settle` (setImmediate) only lets promise chains run.
 */
import fc from "fast-check";
import { afterEach, describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../core/bio.js";
import { exceptionsPerArea, isMetadataChunk } from "../../targets/snapshot/cow-format.js";
import { readCowImage } from "../../targets/snapshot/cow-image.js";
import { Origin } from "../../targets/snapshot/origin-registry.js";
import { InOrderGate, type PendingException } from "../../targets/snapshot/pending.js";
import { SnapshotTarget } from "../../targets/snapshot/snapshot.js";
import { TrackedChunks } from "../../targets/snapshot/tracked-chunks.js";
import type { ControlledDevice } from "../../testing/controlled-device.js";
import {
  IDLE,
  type IoRec,
  type Rig,
  cowSectorsFor,
  engineState,
  pattern,
  settle,
  snapshotRig,
} from "../support/snapshot-rig.js";

const SIZE = 2304; // origin sectors: 288 chunks of 8
const HOT = 64; // origin writes and most I/O stay in [0, HOT)
const PREFILL_FROM = 16; // prefilled 8-sector chunks start after the hot region
const PREFILL = exceptionsPerArea(8) - 3; // area 0 fills after 3 more exceptions

interface SnapConf {
  cs: 8 | 16 | 32;
  store: "P" | "N";
}

type Action =
  | { kind: "owrite"; sector: number; len: number }
  | { kind: "oread"; sector: number; len: number }
  /** A snapshot read and an origin write of the same sectors, back to back (R4/R17's opening). */
  | { kind: "pair"; snap: number; sector: number; len: number }
  /** Another origin write to the sectors of the previous origin write (R17's second writer). */
  | { kind: "again" }
  | { kind: "swrite"; snap: number; sector: number; len: number; whole: boolean }
  | { kind: "sread"; snap: number; sector: number; len: number; anywhere: boolean }
  | { kind: "flush"; dev: number }
  | { kind: "suspend"; dev: number }
  | { kind: "resume"; dev: number }
  /** Release held I/Os: `any` picks at random, `newest`/`oldest` by arrival. */
  | { kind: "release"; mode: "any" | "newest" | "oldest"; picks: number[] }
  /** Fail one held I/O with EIO (fault-injection runs only). */
  | { kind: "fail"; pick: number };

interface Step {
  action: Action;
  settle: boolean;
}

const snapArb: fc.Arbitrary<SnapConf> = fc.record({
  cs: fc.constantFrom(8, 8, 16, 32),
  store: fc.constantFrom("P", "P", "N"),
});
const confArb = fc.array(snapArb, { minLength: 2, maxLength: 3 });
const sectorArb = fc.nat({ max: HOT - 1 });
const lenArb = fc.integer({ min: 1, max: 8 });

function stepsArb(faults: boolean): fc.Arbitrary<Step[]> {
  const actionArb: fc.Arbitrary<Action> = fc.oneof(
    { weight: 5, arbitrary: fc.record({ kind: fc.constant("owrite" as const), sector: sectorArb, len: lenArb }) },
    { weight: 1, arbitrary: fc.record({ kind: fc.constant("oread" as const), sector: sectorArb, len: lenArb }) },
    {
      weight: 3,
      arbitrary: fc.record({ kind: fc.constant("pair" as const), snap: fc.nat(), sector: sectorArb, len: lenArb }),
    },
    { weight: 2, arbitrary: fc.constant({ kind: "again" as const }) },
    {
      weight: 3,
      arbitrary: fc.record({
        kind: fc.constant("swrite" as const),
        snap: fc.nat(),
        sector: sectorArb,
        len: lenArb,
        whole: fc.boolean(),
      }),
    },
    {
      weight: 5,
      arbitrary: fc.record({
        kind: fc.constant("sread" as const),
        snap: fc.nat(),
        sector: sectorArb,
        len: lenArb,
        anywhere: fc.boolean(),
      }),
    },
    { weight: 1, arbitrary: fc.record({ kind: fc.constant("flush" as const), dev: fc.nat() }) },
    { weight: 1, arbitrary: fc.record({ kind: fc.constant("suspend" as const), dev: fc.nat() }) },
    { weight: 1, arbitrary: fc.record({ kind: fc.constant("resume" as const), dev: fc.nat() }) },
    {
      weight: 8,
      arbitrary: fc.record({
        kind: fc.constant("release" as const),
        mode: fc.constantFrom("any", "any", "newest", "newest", "oldest"),
        picks: fc.array(fc.nat(), { minLength: 1, maxLength: 8 }),
      }),
    },
    { weight: faults ? 1 : 0, arbitrary: fc.record({ kind: fc.constant("fail" as const), pick: fc.nat() }) },
  );
  return fc.array(fc.record({ action: actionArb, settle: fc.boolean() }), {
    minLength: 20,
    maxLength: 100,
    size: "medium",
  });
}

/** A bio the schedule submitted, with what the model expects of it. */
interface Tracked {
  rec: IoRec;
  dev: string;
  /** Snapshot index, or -1 for the origin. */
  snap: number;
  sector: number;
  len: number;
  write: boolean;
  /** Snapshot reads: the model's data at submission. */
  expect?: Buffer;
  /** Origin reads: the values each sector may hold. */
  cands?: Buffer[][];
  /** Origin writes: each sector's possible values before this write (restored if it fails). */
  before?: Buffer[][];
  /** Completion processed by the model. */
  seen?: boolean;
}

const sectorOf = (buf: Buffer, s: number) => buf.subarray(s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE);

/** Run one schedule; returns the violations found (empty: the run is fine). */
async function runSchedule(conf: SnapConf[], steps: Step[], faults: boolean, cowThreshold?: number): Promise<string[]> {
  const violations: string[] = [];
  const names = conf.map((_, i) => `s${i}`);
  const r: Rig = await snapshotRig({
    originSectors: SIZE,
    cowThreshold,
    seed: 7,
    snaps: conf.map((c, i) => ({
      name: names[i]!,
      cs: c.cs,
      store: c.store,
      cowSectors: cowSectorsFor(c.cs, SIZE / c.cs),
      cowOptions: { volatileCache: true },
    })),
  });
  // Each hot origin sector keeps the set of values it may hold (overlapping writes in flight
  // together may land in either order).
  const originCand: Buffer[][] = Array.from({ length: HOT }, (_, s) => [Buffer.from(sectorOf(r.initial, s))]);
  const snapModel = names.map(() => Buffer.from(r.initial));
  /** Snapshot sectors whose last write failed: their contents are unknown. */
  const unknown = names.map(() => new Set<number>());

  // Persistent 8-sector snapshots: fill area 0 up to 3 records short of full.
  const prefill: Promise<IoRec>[] = [];
  conf.forEach((c, i) => {
    if (c.store !== "P" || c.cs !== 8) return;
    for (let k = 0; k < PREFILL; k++) {
      const sector = (PREFILL_FROM + k) * 8;
      const data = pattern(10_000 * (i + 1) + k, 8 * SECTOR_SIZE);
      data.copy(snapModel[i]!, sector * SECTOR_SIZE);
      prefill.push(r.io.write(r.snaps[names[i]!]!, sector, data).promise);
    }
  });
  for (const p of await Promise.all(prefill))
    if (p.status !== "ok") violations.push(`prefill write failed: ${p.status}`);

  const devices: ControlledDevice[] = [r.origin, ...names.map((n) => r.cows[n]!)];
  // Every bio is held; remember the global order of arrival across the devices.
  const arrival = new WeakMap<object, number>();
  let arrivals = 0;
  const holds = devices.map((d) => d.hold((bio) => (arrival.set(bio, ++arrivals), true)));
  const heldIos = () => devices.flatMap((d) => d.held()).sort((x, y) => arrival.get(x.bio)! - arrival.get(y.bio)!);
  const mds = [r.base, ...names.map((n) => r.snaps[n]!)];
  const tracked: Tracked[] = [];
  const admin: Promise<unknown>[] = [];
  const fuaSeen = devices.map((d) => d.counters.fuaWrites);

  const inFlight = (dev: string) => tracked.filter((t) => t.dev === dev && t.rec.completions === 0);
  const overlaps = (t: Tracked, sector: number, len: number) => t.sector < sector + len && sector < t.sector + t.len;

  let lastOriginWrite = { sector: 0, len: 1 };
  const submitOriginWrite = (sector: number, len: number, seed: number) => {
    if (inFlight("base").some((t) => !t.write && overlaps(t, sector, len))) return;
    lastOriginWrite = { sector, len };
    const data = pattern(seed, len * SECTOR_SIZE);
    const writing = inFlight("base").filter((t) => t.write && t.len > 0);
    const before = originCand.slice(sector, sector + len).map((c) => [...c]);
    for (let s = sector; s < sector + len; s++) {
      const value = Buffer.from(sectorOf(data, s - sector));
      if (writing.some((t) => overlaps(t, s, 1))) originCand[s]!.push(value);
      else originCand[s] = [value];
    }
    tracked.push({ rec: r.io.write(r.base, sector, data), dev: "base", snap: -1, sector, len, write: true, before });
  };
  const submitOriginRead = (sector: number, len: number) => {
    if (inFlight("base").some((t) => t.write && overlaps(t, sector, len))) return;
    const cands = originCand.slice(sector, sector + len).map((c) => [...c]);
    tracked.push({ rec: r.io.read(r.base, sector, len), dev: "base", snap: -1, sector, len, write: false, cands });
  };
  const submitSnap = (i: number, write: boolean, sector: number, len: number, seed: number) => {
    const md = r.snaps[names[i]!]!;
    if (inFlight(md.name).some((t) => (write || t.write) && overlaps(t, sector, len))) return;
    if (write) {
      const data = pattern(seed, len * SECTOR_SIZE);
      data.copy(snapModel[i]!, sector * SECTOR_SIZE);
      for (let s = sector; s < sector + len; s++) unknown[i]!.delete(s);
      tracked.push({ rec: r.io.write(md, sector, data), dev: md.name, snap: i, sector, len, write: true });
    } else {
      const expectData = Buffer.from(snapModel[i]!.subarray(sector * SECTOR_SIZE, (sector + len) * SECTOR_SIZE));
      tracked.push({
        rec: r.io.read(md, sector, len),
        dev: md.name,
        snap: i,
        sector,
        len,
        write: false,
        expect: expectData,
      });
    }
  };

  /** Fold completions into the model and check reads. */
  const poll = () => {
    for (const t of tracked) {
      if (t.seen || t.rec.completions === 0) continue;
      t.seen = true;
      const ok = t.rec.status === "ok";
      if (t.write && !ok) {
        // A failed write may or may not have landed.
        if (t.snap >= 0) for (let s = t.sector; s < t.sector + t.len; s++) unknown[t.snap]!.add(s);
        else t.before!.forEach((c, k) => originCand[t.sector + k]!.push(...c));
      }
      if (!ok) continue;
      if (t.cands && t.cands.some((c, k) => !c.some((v) => v.equals(sectorOf(t.rec.data, k))))) {
        violations.push(`origin read @${t.sector}+${t.len} (bio #${t.rec.id}) returned data no write put there`);
      }
      if (t.expect) {
        for (let k = 0; k < t.len; k++) {
          if (unknown[t.snap]!.has(t.sector + k) || sectorOf(t.rec.data, k).equals(sectorOf(t.expect, k))) continue;
          violations.push(
            `read ${t.dev}@${t.sector}+${t.len} (bio #${t.rec.id}) returned data other than the model's at sector ${t.sector + k}`,
          );
          break;
        }
      }
    }
  };
  const crashChecks = async () => {
    for (let i = 0; i < names.length; i++) {
      const cow = devices[i + 1]!;
      if (conf[i]!.store !== "P" || cow.counters.fuaWrites === fuaSeen[i + 1]) continue;
      fuaSeen[i + 1] = cow.counters.fuaWrites;
      violations.push(...(await cowImageProblems(cow.crash(), conf[i]!.cs, `${names[i]} crash after commit`)));
    }
  };

  let seq = 0;
  for (const { action: a, settle: doSettle } of steps) {
    seq++;
    poll();
    switch (a.kind) {
      case "owrite":
        submitOriginWrite(a.sector, Math.min(a.len, HOT - a.sector), 100_000 + seq);
        break;
      case "oread":
        submitOriginRead(a.sector, Math.min(a.len, HOT - a.sector));
        break;
      case "again":
        submitOriginWrite(lastOriginWrite.sector, lastOriginWrite.len, 100_000 + seq);
        break;
      case "pair": {
        const len = Math.min(a.len, HOT - a.sector);
        submitSnap(a.snap % names.length, false, a.sector, len, 0);
        submitOriginWrite(a.sector, len, 100_000 + seq);
        break;
      }
      case "swrite": {
        const i = a.snap % names.length;
        const cs = conf[i]!.cs;
        const sector = a.whole ? a.sector - (a.sector % cs) : a.sector;
        submitSnap(i, true, sector, a.whole ? cs : Math.min(a.len, HOT - sector), 200_000 + seq);
        break;
      }
      case "sread": {
        const sector = a.anywhere ? (a.sector * 17) % (SIZE - 16) : a.sector;
        submitSnap(a.snap % names.length, false, sector, a.anywhere ? a.len : Math.min(a.len, HOT - sector), 0);
        break;
      }
      case "flush": {
        const md = mds[a.dev % mds.length]!;
        tracked.push({ rec: r.io.flush(md), dev: md.name, snap: -2, sector: 0, len: 0, write: false });
        break;
      }
      case "suspend":
        admin.push(
          r.dm.suspend(mds[a.dev % mds.length]!.name).catch((e: Error) => violations.push(`suspend: ${e.message}`)),
        );
        break;
      case "resume":
        admin.push(
          r.dm.resume(mds[a.dev % mds.length]!.name).catch((e: Error) => violations.push(`resume: ${e.message}`)),
        );
        break;
      case "release":
        for (const pick of a.picks) {
          const held = heldIos();
          if (held.length === 0) break;
          held[a.mode === "any" ? pick % held.length : a.mode === "newest" ? held.length - 1 : 0]!.release();
        }
        break;
      case "fail": {
        const held = heldIos();
        if (held.length > 0) held[a.pick % held.length]!.fail("EIO");
        break;
      }
    }
    if (doSettle || a.kind === "release" || a.kind === "fail") await settle();
    poll();
    await crashChecks();
  }

  // Drain: resume everything, stop holding, release until nothing is left.
  devices.forEach((d, i) => d.stopHolding(holds[i]!));
  for (let round = 0; round < 40; round++) {
    for (const md of mds)
      if (md.suspended) admin.push(r.dm.resume(md.name).catch((e: Error) => violations.push(`resume: ${e.message}`)));
    for (const d of devices) for (const h of d.held()) h.release();
    await settle();
    await settle();
    poll();
    if (
      tracked.every((t) => t.rec.completions > 0) &&
      devices.every((d) => d.held().length === 0) &&
      mds.every((md) => !md.suspended)
    )
      break;
  }
  await Promise.race([Promise.all(admin), settle().then(settle)]);
  poll();
  await crashChecks();

  for (const t of tracked) {
    if (t.rec.completions !== 1)
      violations.push(`bio #${t.rec.id} ${t.rec.op} ${t.dev}@${t.sector} completed ${t.rec.completions} times`);
    else if (!faults && t.rec.status !== "ok")
      violations.push(`bio #${t.rec.id} ${t.rec.op} ${t.dev}@${t.sector} failed: ${t.rec.status}`);
  }
  violations.push(...r.io.errors);
  for (const rec of r.logger.records)
    if (/threw|target bug/.test(rec.msg)) violations.push(`logged: ${rec.msg} ${JSON.stringify(rec.fields)}`);
  if (violations.length > 0) return violations;

  // Final state against the model.
  const originNow = r.origin.readSync(0, SIZE);
  if (!originNow.subarray(HOT * SECTOR_SIZE).equals(r.initial.subarray(HOT * SECTOR_SIZE)))
    violations.push("origin changed outside the written region");
  for (let s = 0; s < HOT; s++) {
    if (!originCand[s]!.some((v) => v.equals(sectorOf(originNow, s))))
      violations.push(`origin sector ${s} holds data no write put there`);
  }
  const invalid = names.map((n) => r.dm.status(n)[0]!.params === "Invalid");
  for (let i = 0; i < names.length; i++) {
    const t = r.target<SnapshotTarget>(names[i]!);
    const state = engineState(t);
    if (JSON.stringify(state) !== JSON.stringify(IDLE))
      violations.push(`${names[i]} not idle: ${JSON.stringify(state)}`);
    if (invalid[i] && !faults) violations.push(`${names[i]} became invalid without any I/O error`);
    const rd = r.io.read(r.snaps[names[i]!]!, 0, SIZE);
    await settle();
    if (invalid[i]) {
      if (rd.status !== "EIO") violations.push(`${names[i]} is Invalid but a read gave ${rd.status}`);
    } else if (rd.status !== "ok") {
      violations.push(`${names[i]}: read failed with ${rd.status}`);
    } else {
      for (let s = 0; s < SIZE; s++) {
        if (unknown[i]!.has(s) || sectorOf(rd.data, s).equals(sectorOf(snapModel[i]!, s))) continue;
        violations.push(`${names[i]} differs from the model at sector ${s}`);
        break;
      }
    }
  }
  // Reload the persistent snapshots from their COW devices (origin suspended, as LVM does), unless
  // an I/O error on that COW device makes its on-disk state undefined.
  const reload = names.filter((_, i) => conf[i]!.store === "P" && !invalid[i] && devices[i + 1]!.counters.failed === 0);
  if (violations.length === 0 && reload.length > 0) {
    await r.dm.suspend("base");
    for (const n of reload) {
      const i = names.indexOf(n);
      violations.push(...(await cowImageProblems(r.cows[n]!, conf[i]!.cs, `${n} final image`)));
      await r.dm.remove(n);
      await r.dm.create(n, { table: `0 ${SIZE} snapshot origin cow-${n} P ${conf[i]!.cs}` });
    }
    await r.dm.resume("base");
    for (const n of reload) {
      const i = names.indexOf(n);
      const rd = r.io.read(r.dm.device(n), 0, SIZE);
      await settle();
      const same =
        rd.status === "ok" &&
        [...Array(SIZE).keys()].every(
          (s) => unknown[i]!.has(s) || sectorOf(rd.data, s).equals(sectorOf(snapModel[i]!, s)),
        );
      if (!same) violations.push(`${n} differs from the model after reload (${rd.status})`);
    }
  }
  await r.dm.close();
  return violations;
}

/** R5/R11 invariants of a (crashed) persistent COW image. */
async function cowImageProblems(image: ControlledDevice, cs: number, where: string): Promise<string[]> {
  const img = await readCowImage(image);
  const out = img.problems.filter((p) => !p.startsWith("snapshot is marked invalid")).map((p) => `${where}: ${p}`);
  const epa = exceptionsPerArea(cs);
  const recorded = new Set(img.records.map((x) => x.newChunk));
  const missing: number[] = [];
  for (let c = 2; c < img.nextFree; c++) if (!isMetadataChunk(epa, c) && !recorded.has(c)) missing.push(c);
  if (missing.length > 0)
    out.push(`${where}: chunks ${missing.join(",")} below next_free ${img.nextFree} are not recorded`);
  return out;
}

function propertyOf(faults: boolean, cowThreshold?: number) {
  return fc.asyncProperty(confArb, stepsArb(faults), async (conf, steps) => {
    const violations = await runSchedule(conf, steps, faults, cowThreshold);
    if (violations.length > 0) throw new Error(violations.slice(0, 5).join("\n"));
  });
}
const property = propertyOf(false);

describe("snapshot scheduler property", () => {
  // 250 schedules take ~10 s alone and nearly 30 s on a loaded 2-core machine: a bound that a slow
  // machine does not hit, which a hang still does.
  it(
    "origin and snapshots match the model under random I/O, suspends and release orders",
    { timeout: 120_000 },
    async () => {
      await fc.assert(property, { seed: 20240611, numRuns: 250, endOnFailure: true });
    },
  );

  it("with I/O errors injected: every bio completes once, nothing unexpected is read, the engine drains", async () => {
    await fc.assert(propertyOf(true), { seed: 20240612, numRuns: 150, endOnFailure: true });
  });

  it("with COW throttling at its tightest (writes wait whenever a copy is in flight), with and without I/O errors", async () => {
    await fc.assert(propertyOf(false, 0), { seed: 20240613, numRuns: 40, endOnFailure: true });
    await fc.assert(propertyOf(true, 0), { seed: 20240614, numRuns: 40, endOnFailure: true });
  });
});

/**
 * Broken engines: each patch disables one fix; the property must find a counterexample within a
 * bounded number of runs (no shrinking, to keep this fast). Seeds fixed; with the seeds below the
 * first counterexample comes within a few dozen runs.
 */
describe("the property catches a disabled fix", () => {
  const restore: (() => void)[] = [];
  afterEach(() => {
    for (const undo of restore.splice(0).reverse()) undo();
  });

  function patch<T extends object, K extends keyof T>(obj: T, key: K, value: T[K]): void {
    const old = obj[key];
    obj[key] = value;
    restore.push(() => (obj[key] = old));
  }

  async function expectCounterexample(seed: number, numRuns: number): Promise<void> {
    const out = await fc.check(property, { seed, numRuns, endOnFailure: true });
    expect(out.failed, "no counterexample found").toBe(true);
  }

  it("tracked-read wait skipped (R4)", async () => {
    patch(TrackedChunks.prototype, "isTracked", () => false);
    await expectCounterexample(1, 150);
  });

  it("in-order gate bypassed (R11)", async () => {
    patch(InOrderGate.prototype, "copied", (pe: PendingException, complete: (pe: PendingException) => void) =>
      complete(pe),
    );
    await expectCounterexample(3, 150);
  });

  it("origin writes look at the complete table before the pending one (R17)", async () => {
    const find = SnapshotTarget.prototype.findOrAllocatePending;
    patch(
      SnapshotTarget.prototype,
      "findOrAllocatePending",
      function (this: SnapshotTarget, chunk: number, snapshotWrite: boolean) {
        if (!snapshotWrite && this.complete.lookup(chunk) >= 0) return null;
        return find.call(this, chunk, snapshotWrite);
      },
    );
    await expectCounterexample(3, 150);
  });

  it("smallest chunk first: no counterexample, the origin-bio retry covers it (R3)", async () => {
    // The kernel needed largest-first because its old primary-pe scheme released an origin bio
    // when one exception completed. Here a queued bio is re-run through originWrite when its
    // exception completes, so it re-queues on any other pending one whatever the list order
    // (R3's "finish C, then B" case). Sorting stays for parity with the kernel; disabling it
    // together with the retry is caught by this property and by R1/R3 in test/races.
    patch(Origin.prototype, "sort", function (this: Origin<SnapshotTarget>) {
      this.snapshots.sort((a, b) => a.chunkSize - b.chunkSize);
    });
    const out = await fc.check(property, { seed: 4, numRuns: 60, endOnFailure: true });
    expect(out.failed).toBe(false);
  });
});
