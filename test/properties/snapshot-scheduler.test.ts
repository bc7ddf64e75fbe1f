/**
 * Property: a seeded scheduler over the snapshot engine. Each run builds an origin with 2–3
 * snapshots (chunk sizes 8/16/32 sectors, persistent or transient stores), holds every I/O on the
 * origin and COW devices (ControlledDevices), and plays a random schedule of origin writes and
 * reads, snapshot reads and writes (partial and whole-chunk), flushes, suspends and resumes of the
 * origin and the snapshots, table reloads of the snapshots (`udmsetup reload` + `resume`: the new
 * table takes the old one's exception store over, R12), and releases of held I/Os: at random,
 * newest first (adversarial) or oldest first (a FIFO device). Some persistent snapshots sit on a
 * reused COW device: garbage and an older store's records under a zeroed header
 * (testing/crash/reused-cow.ts).
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
 *   - at the end: origin and every snapshot equal the model, and nothing is left pending, tracked
 *     or held in the gate; nothing was logged as a thrown callback;
 *   - then each persistent snapshot is reactivated from its COW device (removed and created again,
 *     the origin suspended, as LVM does), sometimes with its last metadata area filled exactly
 *     (B3's case); its status is the usage its image implies, it equals the model, and writes
 *     after that reactivation (origin writes and snapshot writes that allocate new chunks) leave
 *     origin and snapshots equal to the model, before and after one more reactivation.
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
 * time, by patching a prototype) and expects a counterexample. docs/testing.md ("The snapshot
 * scheduler property") lists what each disabled fix gives, seeds included.
 *
 * Runs: UDM_SCHEDULER_RUNS (default 200) schedules for the main property and UDM_SCHEDULER_SEED
 * (default 20240611) its seed; the other properties scale with the runs.
 *
 * Deterministic: fixed seeds, no timers; `settle` (setImmediate) only lets promise chains run.
 */
import fc from "fast-check";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../core/bio.js";
import { exceptionsPerArea, isMetadataChunk } from "../../targets/snapshot/cow-format.js";
import { readCowImage } from "../../targets/snapshot/cow-image.js";
import { Origin } from "../../targets/snapshot/origin-registry.js";
import { InOrderGate, type PendingException } from "../../targets/snapshot/pending.js";
import { SnapshotTarget } from "../../targets/snapshot/snapshot.js";
import { PersistentStore } from "../../targets/snapshot/store-persistent.js";
import type { Bio } from "../../core/bio.js";
import { Table } from "../../core/table.js";
import { TrackedChunks } from "../../targets/snapshot/tracked-chunks.js";
import type { ControlledDevice } from "../../testing/controlled-device.js";
import { reusedCowImage } from "../../testing/crash/reused-cow.js";
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

interface SnapConf {
  cs: 8 | 16 | 32;
  store: "P" | "N";
  /**
   * Persistent 8-sector snapshots: records left free in area 0 after the prefill. 3: area 0
   * fills during the schedule; 12: it never does, so its last area can be filled exactly
   * before the final reactivation (B3).
   */
  room: 3 | 12;
  /** Persistent only: the COW device is reused (garbage and an older store's records, header zeroed). */
  reused: boolean;
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
  /** `udmsetup reload` of a snapshot's table (the same text) and `udmsetup resume`: an exception-store handover. */
  | { kind: "reload"; snap: number }
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
  room: fc.constantFrom(3, 3, 12),
  reused: fc.boolean(),
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
    { weight: 1, arbitrary: fc.record({ kind: fc.constant("reload" as const), snap: fc.nat() }) },
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

/** A reused COW device's content, made once per size, chunk size and snapshot index. */
const reusedCows = new Map<string, Buffer>();
function reusedCow(sectors: number, cs: number, index: number): Buffer {
  const key = `${sectors}/${cs}/${index}`;
  let image = reusedCows.get(key);
  if (!image) {
    image = reusedCowImage({ sectors, staleChunkSize: cs, originSectors: SIZE, seed: 1000 + index });
    reusedCows.set(key, image);
  }
  return image;
}

/** After the schedule: how the final reactivation is prepared, and the writes made after it. */
interface Final {
  /** Fill each persistent snapshot's last metadata area exactly before reactivating it (B3's case). */
  fillArea: boolean;
  /** Writes after the reactivation: `target` picks a snapshot, or the origin (one more than the snapshots). */
  after: { target: number; sector: number; len: number }[];
}

const finalArb: fc.Arbitrary<Final> = fc.record({
  fillArea: fc.boolean(),
  after: fc.array(fc.record({ target: fc.nat(), sector: sectorArb, len: lenArb }), { minLength: 1, maxLength: 6 }),
});

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
async function runSchedule(
  conf: SnapConf[],
  steps: Step[],
  faults: boolean,
  final: Final,
  cowThreshold?: number,
): Promise<string[]> {
  const violations: string[] = [];
  const names = conf.map((_, i) => `s${i}`);
  const tableOf = (i: number) => `0 ${SIZE} snapshot origin cow-${names[i]} ${conf[i]!.store} ${conf[i]!.cs}`;
  const r: Rig = await snapshotRig({
    originSectors: SIZE,
    cowThreshold,
    seed: 7,
    snaps: conf.map((c, i) => {
      const cowSectors = cowSectorsFor(c.cs, SIZE / c.cs);
      const reused = c.store === "P" && c.reused;
      return {
        name: names[i]!,
        cs: c.cs,
        store: c.store,
        cowSectors,
        cowOptions: { volatileCache: true },
        prepareCow: reused ? (cow: ControlledDevice) => cow.writeSync(0, reusedCow(cowSectors, c.cs, i)) : undefined,
      };
    }),
  });
  // Each hot origin sector keeps the set of values it may hold (overlapping writes in flight
  // together may land in either order).
  const originCand: Buffer[][] = Array.from({ length: HOT }, (_, s) => [Buffer.from(sectorOf(r.initial, s))]);
  const snapModel = names.map(() => Buffer.from(r.initial));
  /** Snapshot sectors whose last write failed: their contents are unknown. */
  const unknown = names.map(() => new Set<number>());
  /** Chunks outside the hot region each snapshot has written (never offered as fresh chunks). */
  const written = names.map(() => new Set<number>());

  // Persistent 8-sector snapshots: fill area 0 up to `room` records short of full.
  const prefill: Promise<IoRec>[] = [];
  conf.forEach((c, i) => {
    if (c.store !== "P" || c.cs !== 8) return;
    for (let k = 0; k < exceptionsPerArea(8) - c.room; k++) {
      const sector = (PREFILL_FROM + k) * 8;
      const data = pattern(10_000 * (i + 1) + k, 8 * SECTOR_SIZE);
      data.copy(snapModel[i]!, sector * SECTOR_SIZE);
      written[i]!.add(PREFILL_FROM + k);
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
  /** A reload of this snapshot is under way (one at a time: a second table would be refused). */
  const reloading = names.map(() => false);
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
      case "reload": {
        const i = a.snap % names.length;
        if (reloading[i]) break;
        reloading[i] = true;
        admin.push(
          r.dm
            .load(names[i]!, tableOf(i))
            .then(() => r.dm.resume(names[i]!))
            .catch((e: Error) => violations.push(`reload of ${names[i]}: ${e.message}`))
            .finally(() => (reloading[i] = false)),
        );
        break;
      }
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
      mds.every((md) => !md.suspended) &&
      !reloading.includes(true)
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
  // Reactivate the persistent snapshots from their COW devices, unless an I/O error on that COW
  // device makes its on-disk state undefined; then write, and reactivate once more.
  const reload = names.filter((_, i) => conf[i]!.store === "P" && !invalid[i] && devices[i + 1]!.counters.failed === 0);
  if (violations.length === 0 && reload.length > 0) {
    /** Chunks of snapshot i outside the hot region it has never written (nothing recorded there). */
    const freshChunks = (i: number) => {
      const cs = conf[i]!.cs;
      const out: number[] = [];
      for (let c = Math.ceil(HOT / cs); c < SIZE / cs; c++) if (!written[i]!.has(c)) out.push(c);
      return out;
    };
    /** Write whole fresh chunks of snapshot i, `count` of them (the model follows). */
    const writeFresh = (i: number, count: number, seed: number): IoRec[] =>
      freshChunks(i)
        .slice(0, count)
        .map((c, k) => {
          const cs = conf[i]!.cs;
          const data = pattern(seed + k, cs * SECTOR_SIZE);
          data.copy(snapModel[i]!, c * cs * SECTOR_SIZE);
          written[i]!.add(c);
          return r.io.write(r.snaps[names[i]!]!, c * cs, data);
        });
    if (final.fillArea) {
      // Fill the last metadata area exactly, where there are fresh chunks enough: the reloaded
      // store must then allocate past the next area's chunk (B3).
      const fills: IoRec[] = [];
      for (const n of reload) {
        const i = names.indexOf(n);
        const epa = exceptionsPerArea(conf[i]!.cs);
        const need = (epa - ((await readCowImage(r.cows[n]!)).records.length % epa)) % epa;
        if (need > 0 && need <= freshChunks(i).length) fills.push(...writeFresh(i, need, 300_000 + 1000 * i));
      }
      violations.push(...(await finish(fills, "area fill")));
    }
    const model: Model = { names, conf, snapModel, unknown, originCand, invalid };
    violations.push(...(await reactivate(r, model, reload, "final")));
    violations.push(...(await compare(r, model, reload, "after the final reactivation")));

    // Writes after the reactivation: one whole fresh chunk per reactivated snapshot (a new
    // exception in the reloaded store), then the schedule's own origin and snapshot writes.
    const after: IoRec[] = [];
    for (const n of reload) after.push(...writeFresh(names.indexOf(n), 1, 400_000 + 1000 * names.indexOf(n)));
    violations.push(...(await finish(after, "writes after the reactivation")));
    // One at a time: two of them may overlap, and the model takes them in this order.
    for (const [k, w] of final.after.entries()) {
      const target = w.target % (names.length + 1);
      const len = Math.min(w.len, HOT - w.sector);
      const data = pattern(500_000 + k, len * SECTOR_SIZE);
      if (target === names.length) {
        for (let s = 0; s < len; s++) originCand[w.sector + s] = [Buffer.from(sectorOf(data, s))];
        violations.push(...(await finish([r.io.write(r.base, w.sector, data)], "origin write after the reactivation")));
      } else if (!invalid[target]) {
        data.copy(snapModel[target]!, w.sector * SECTOR_SIZE);
        for (let s = w.sector; s < w.sector + len; s++) unknown[target]!.delete(s);
        const rec = r.io.write(r.snaps[names[target]!]!, w.sector, data);
        violations.push(...(await finish([rec], "snapshot write after the reactivation")));
      }
    }
    violations.push(...(await compare(r, model, ["base", ...names], "after writes that followed it")));
    if (violations.length === 0) {
      violations.push(...(await reactivate(r, model, reload, "second")));
      violations.push(...(await compare(r, model, reload, "after a second reactivation")));
    }
  }
  await r.dm.close();
  return violations;
}

/** What the final phase checks against. */
interface Model {
  names: string[];
  conf: SnapConf[];
  snapModel: Buffer[];
  unknown: Set<number>[];
  originCand: Buffer[][];
  /** Snapshots invalidated by an injected I/O error: not read any more. */
  invalid: boolean[];
}

/** Let unheld I/O complete (a bounded number of turns: a broken engine may never complete it). */
async function finish(recs: IoRec[], what: string): Promise<string[]> {
  for (let turn = 0; turn < 50 && recs.some((rec) => rec.completions === 0); turn++) await settle();
  return recs
    .filter((rec) => rec.completions !== 1 || rec.status !== "ok")
    .map(
      (rec) =>
        `${what}: bio #${rec.id} ${rec.op} ${rec.device}@${rec.sector} ${rec.completions ? rec.status : "never completed"}`,
    );
}

/**
 * Remove and create the snapshots `names` again from their COW devices, the origin suspended (as
 * LVM does); each image must be sound and each reloaded status the usage its image implies.
 */
async function reactivate(r: Rig, m: Model, reload: string[], label: string): Promise<string[]> {
  const out: string[] = [];
  await r.dm.suspend("base");
  for (const n of reload) {
    const i = m.names.indexOf(n);
    const cs = m.conf[i]!.cs;
    out.push(...(await cowImageProblems(r.cows[n]!, cs, `${n} ${label} image`)));
    const { usage } = await readCowImage(r.cows[n]!);
    await r.dm.remove(n);
    r.snaps[n] = await r.dm.create(n, { table: `0 ${SIZE} snapshot origin cow-${n} P ${cs}` });
    const status = r.dm.status(n)[0]!.params;
    const want = `${usage.allocated}/${usage.total} ${usage.metadata}`;
    if (status !== want)
      out.push(`${n}: status after the ${label} reactivation is "${status}", its image implies "${want}"`);
  }
  await r.dm.resume("base");
  return out;
}

/** The devices `which` ("base" and snapshot names; invalid snapshots skipped) read back whole against the model. */
async function compare(r: Rig, m: Model, which: string[], when: string): Promise<string[]> {
  const out: string[] = [];
  if (which.includes("base")) {
    const origin = r.io.read(r.base, 0, SIZE);
    out.push(...(await finish([origin], `origin read ${when}`)));
    if (origin.status === "ok") {
      if (!origin.data.subarray(HOT * SECTOR_SIZE).equals(r.initial.subarray(HOT * SECTOR_SIZE)))
        out.push(`origin changed outside the written region ${when}`);
      const s = [...Array(HOT).keys()].find((k) => !m.originCand[k]!.some((v) => v.equals(sectorOf(origin.data, k))));
      if (s !== undefined) out.push(`origin sector ${s} holds data no write put there ${when}`);
    }
  }
  for (const [i, n] of m.names.entries()) {
    if (m.invalid[i] || !which.includes(n)) continue;
    const rd = r.io.read(r.snaps[n]!, 0, SIZE);
    out.push(...(await finish([rd], `${n} read ${when}`)));
    if (rd.status !== "ok") continue;
    if (rd.data.equals(m.snapModel[i]!)) continue;
    const s = [...Array(SIZE).keys()].find(
      (k) => !m.unknown[i]!.has(k) && !sectorOf(rd.data, k).equals(sectorOf(m.snapModel[i]!, k)),
    );
    if (s !== undefined) out.push(`${n} differs from the model at sector ${s} ${when}`);
  }
  return out;
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
  return fc.asyncProperty(confArb, stepsArb(faults), finalArb, async (conf, steps, final) => {
    const violations = await runSchedule(conf, steps, faults, final, cowThreshold);
    if (violations.length > 0) throw new Error(violations.slice(0, 5).join("\n"));
  });
}
const property = propertyOf(false);

/** Schedules of the main property (UDM_SCHEDULER_RUNS); the other properties run a share of them. */
const RUNS = positiveEnv("UDM_SCHEDULER_RUNS") ?? 200;
const SEED = positiveEnv("UDM_SCHEDULER_SEED") ?? 20240611;
const share = (fraction: number) => Math.max(1, Math.round(RUNS * fraction));

function positiveEnv(name: string): number | undefined {
  const text = process.env[name];
  if (text === undefined || text === "") return undefined;
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n <= 0) throw new Error(`${name}: expected a positive integer, got ${text}`);
  return n;
}

describe("snapshot scheduler property", () => {
  // 200 schedules take ~15 s alone and about twice that on a loaded 2-core machine: a bound that a
  // slow machine does not hit, which a hang still does.
  it(
    "origin and snapshots match the model under random I/O, suspends, reloads and release orders",
    { timeout: 120_000 },
    async () => {
      console.log(`snapshot scheduler property: seed ${SEED}, ${RUNS} runs (UDM_SCHEDULER_SEED, UDM_SCHEDULER_RUNS)`);
      await fc.assert(property, { seed: SEED, numRuns: RUNS, endOnFailure: true });
    },
  );

  it(
    "with I/O errors injected: every bio completes once, nothing unexpected is read, the engine drains",
    { timeout: 60_000 },
    async () => {
      await fc.assert(propertyOf(true), { seed: 20240612, numRuns: share(0.5), endOnFailure: true });
    },
  );

  it(
    "with COW throttling at its tightest (writes wait whenever a copy is in flight), with and without I/O errors",
    { timeout: 60_000 },
    async () => {
      await fc.assert(propertyOf(false, 0), { seed: 20240613, numRuns: share(0.15), endOnFailure: true });
      await fc.assert(propertyOf(true, 0), { seed: 20240614, numRuns: share(0.15), endOnFailure: true });
    },
  );
});

/**
 * Broken engines: each patch disables one fix, as its race test's "Disable check" describes; the
 * property must find a counterexample within a bounded number of runs (no shrinking, to keep this
 * fast). Seeds fixed; with the seeds below the first counterexample comes within 20 runs. R12 and
 * B3 are caught only because schedules reload tables and write after the final reactivation.
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

  // A broken engine fails in ways a working one never does: a second exception for one chunk throws
  // inside pendingComplete, whose promise nobody awaits (the store's commit callback starts it).
  // Swallowed here: the property's own checks report the counterexample (a second exception for
  // a chunk is one of their violations), and an unhandled rejection would fail the whole run.
  beforeEach(() => {
    type Completing = { pendingComplete(pe: PendingException, ok: boolean): Promise<void> };
    const proto = SnapshotTarget.prototype as unknown as Completing;
    const complete = proto.pendingComplete;
    patch(proto, "pendingComplete", async function (this: SnapshotTarget, pe: PendingException, ok: boolean) {
      try {
        await complete.call(this, pe, ok);
      } catch {
        // see above
      }
    });
  });

  async function expectCounterexample(seed: number, numRuns: number): Promise<void> {
    const out = await fc.check(property, { seed, numRuns, endOnFailure: true });
    expect(out.failed, "no counterexample found").toBe(true);
  }

  it("origin writes do not join the chunk's pending exception (R1, first half)", async () => {
    const find = SnapshotTarget.prototype.findOrAllocatePending;
    patch(
      SnapshotTarget.prototype,
      "findOrAllocatePending",
      function (this: SnapshotTarget, chunk: number, snapshotWrite: boolean) {
        // As if the pending lookup at the top were gone: a second exception replaces the first.
        const first = this.pending.get(chunk);
        this.pending.delete(chunk);
        const pe = find.call(this, chunk, snapshotWrite);
        if (!pe && first) this.pending.set(chunk, first);
        return pe;
      },
    );
    await expectCounterexample(1, 50);
  });

  it("queued origin writes go to the origin when the first exception completes (R1, second half)", async () => {
    type Completing = { pendingComplete(pe: PendingException, ok: boolean): Promise<void> };
    const proto = SnapshotTarget.prototype as unknown as Completing;
    const complete = proto.pendingComplete;
    patch(proto, "pendingComplete", async function (this: SnapshotTarget, pe: PendingException, ok: boolean) {
      // Submitted as they are instead of retried through the origin path (originRetry).
      const bios: Bio[] = pe.originBios.splice(0);
      await complete.call(this, pe, ok);
      for (const b of bios) b.device!.submit(b);
    });
    await expectCounterexample(1, 50);
  });

  it("handover without quiescing the origin (R12)", async () => {
    const suspend = Table.prototype.internalSuspend;
    patch(Table.prototype, "internalSuspend", function (this: Table, opts?: { noflush?: boolean }) {
      void suspend.call(this, opts); // not awaited
      return Promise.resolve();
    });
    await expectCounterexample(1, 50);
  });

  it("a reloaded store allocates the next area's metadata chunk (B3)", async () => {
    type Loading = { readExceptions(cb: (o: number, n: number) => void): Promise<void>; nextFree: number };
    const proto = PersistentStore.prototype as unknown as Loading;
    const load = proto.readExceptions;
    patch(proto, "readExceptions", async function (this: Loading, cb: (o: number, n: number) => void) {
      // next_free = last recorded chunk + 1, without skip_metadata.
      let last = 1;
      await load.call(this, (o, n) => ((last = Math.max(last, n)), cb(o, n)));
      this.nextFree = last + 1;
    });
    await expectCounterexample(1, 50);
  });

  it("tracked-read wait skipped (R4)", async () => {
    patch(TrackedChunks.prototype, "isTracked", () => false);
    await expectCounterexample(5, 150);
  });

  it("in-order gate bypassed (R11)", async () => {
    patch(InOrderGate.prototype, "copied", (pe: PendingException, complete: (pe: PendingException) => void) =>
      complete(pe),
    );
    await expectCounterexample(1, 150);
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
    const out = await fc.check(property, { seed: 4, numRuns: 40, endOnFailure: true });
    expect(out.failed).toBe(false);
  });
});
