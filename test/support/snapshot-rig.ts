/**
 * A snapshot stack over ControlledDevices for the deterministic race tests and the scheduler
 * property: an origin device seeded with a known pattern, one COW device per snapshot, the
 * snapshot-origin device `base` and one snapshot device per spec, created the way LVM does it
 * (suspend base, create the snapshots, resume base).
 *
 * `IoLog` submits bios to mapped devices without awaiting them, so a test can start I/O, hold and
 * release the device I/O it turns into, and inspect each bio's completion (status, data, how many
 * times it completed) at any moment. Nothing here sleeps; `settle()` only lets promise chains run.
 */
import { expect } from "vitest";
import { Bio, type BioEndIo, BioFlags, type BioOp, type BioStatus, SECTOR_SIZE } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import type { MappedDevice } from "../../core/mapped-device.js";
import type { Target } from "../../core/target.js";
import { ControlledDevice, type ControlledDeviceOptions } from "../../testing/controlled-device.js";
import { MemoryLogger } from "../../core/logger.js";
import { createDeviceMapper } from "../../index.js";
import { NamedBacking, pattern } from "../../testing/memory-backing.js";
import { registerProbe } from "./snapshot-probe.js";

/** Resolves on the next turn of the event loop: lets pending promise chains run, no timing. */
export const settle = () => new Promise<void>((r) => setImmediate(r));

/**
 * Run the event loop until nothing is left to run: no setImmediate callback queued and no
 * file-system request in flight (timers aside: the rigs use none, and vitest's own are always
 * there). A "not yet" asserted after this holds because nothing more can happen until the test
 * acts (releases a held I/O), not because a fixed number of turns went by. Throws if the loop
 * never goes idle (something that reschedules itself forever).
 */
export async function settleAll(): Promise<void> {
  for (let turn = 0; turn < MAX_SETTLE_TURNS; turn++) {
    await settle();
    if (!eventLoopBusy()) return;
  }
  throw new Error(`settleAll: the event loop was still busy after ${MAX_SETTLE_TURNS} turns`);
}

const MAX_SETTLE_TURNS = 10_000;

function eventLoopBusy(): boolean {
  return process.getActiveResourcesInfo().some((r) => r === "Immediate" || r.startsWith("FSReq"));
}

/**
 * Exactly `turns` turns of the event loop: for seeded schedules that interleave their own steps
 * with partly finished work (never for a "not yet" assertion: use settleAll()).
 */
export async function settleTurns(turns: number): Promise<void> {
  for (let i = 0; i < turns; i++) await settle();
}

export interface SnapSpec {
  name: string;
  /** Chunk size in sectors. */
  cs: number;
  /** Store type word: "P", "PO" or "N" (default "P"). */
  store?: string;
  /** COW device size in sectors (default: big enough never to overflow). */
  cowSectors?: number;
  cowOptions?: ControlledDeviceOptions;
  /** Target type name in the table (default "snapshot"; tests register probes under other names). */
  type?: string;
  /** Runs on the COW device before the snapshot is created (e.g. to fill it with stale data). */
  prepareCow?: (cow: ControlledDevice) => void;
}

export interface RigOptions {
  originSectors: number;
  snaps: SnapSpec[];
  /** Seed of the origin's initial contents. */
  seed?: number;
  /** Options of the origin's ControlledDevice (e.g. a volatile write cache). */
  originOptions?: ControlledDeviceOptions;
  /** The snapshot targets' COW threshold (copies in flight per snapshot before writes wait). */
  cowThreshold?: number;
}

export interface Rig {
  dm: DeviceMapper;
  backing: NamedBacking;
  /** Everything the engine and the copier logged ("copier callback threw" and the like). */
  logger: MemoryLogger;
  origin: ControlledDevice;
  cows: Record<string, ControlledDevice>;
  base: MappedDevice;
  snaps: Record<string, MappedDevice>;
  /** The origin's contents when the snapshots were taken. */
  initial: Buffer;
  io: IoLog;
  /** The live target instance of a device (single-target tables). */
  target<T = Target<unknown>>(name: string): T;
}

/**
 * COW sectors for `chunks` data chunks with the persistent layout (docs/snapshot.md, "On-disk
 * format", sizing), plus slack.
 */
export function cowSectorsFor(cs: number, chunks: number): number {
  const epa = (cs * SECTOR_SIZE) / 16;
  return cs * (1 + Math.ceil((chunks + 1) / epa) + chunks + 2);
}

export async function snapshotRig(opts: RigOptions): Promise<Rig> {
  const backing = new NamedBacking();
  const logger = new MemoryLogger();
  const dm = createDeviceMapper({ backing, logger, snapshot: { cowThreshold: opts.cowThreshold } });
  registerProbe(dm);
  const size = opts.originSectors;
  const origin = backing.add("origin", new ControlledDevice(size, { name: "origin", ...opts.originOptions }));
  const initial = pattern(opts.seed ?? 1, size * SECTOR_SIZE);
  origin.writeSync(0, initial);
  const cows: Record<string, ControlledDevice> = {};
  for (const s of opts.snaps) {
    const cowSectors = s.cowSectors ?? cowSectorsFor(s.cs, Math.ceil(size / s.cs));
    cows[s.name] = backing.add(
      `cow-${s.name}`,
      new ControlledDevice(cowSectors, { name: `cow-${s.name}`, ...s.cowOptions }),
    );
    s.prepareCow?.(cows[s.name]!);
  }
  const base = await dm.create("base", { table: `0 ${size} snapshot-origin origin` });
  await dm.suspend("base");
  const snaps: Record<string, MappedDevice> = {};
  for (const s of opts.snaps) {
    snaps[s.name] = await dm.create(s.name, {
      table: `0 ${size} ${s.type ?? "snapshot"} origin cow-${s.name} ${s.store ?? "P"} ${s.cs}`,
    });
  }
  await dm.resume("base");
  return {
    dm,
    backing,
    logger,
    origin,
    cows,
    base,
    snaps,
    initial,
    io: new IoLog(),
    target<T>(name: string): T {
      return dm.device(name).live!.targets[0] as T;
    },
  };
}

/** One bio submitted through an IoLog. */
export interface IoRec {
  id: number;
  device: string;
  op: BioOp;
  sector: number;
  sectors: number;
  bio: Bio;
  /** Data written (writes) or read (reads, valid once done). */
  data: Buffer;
  completions: number;
  status: BioStatus | null;
  /** Called once at completion, after status is recorded. */
  onDone?: (rec: IoRec) => void;
  readonly promise: Promise<IoRec>;
}

/** Submits bios without waiting and records every completion; a double completion is recorded, not thrown. */
export class IoLog implements BioEndIo {
  readonly all: IoRec[] = [];
  readonly errors: string[] = [];
  private readonly byBio = new Map<Bio, { rec: IoRec; resolve: (r: IoRec) => void }>();

  submit(md: MappedDevice, op: BioOp, sector: number, sectors: number, data?: Buffer, flags = 0): IoRec {
    const buf = data ?? (op === "read" || op === "write" ? Buffer.alloc(sectors * SECTOR_SIZE) : null);
    const bio = new Bio(op, sector, op === "flush" ? 0 : sectors, buf, flags, this);
    let resolve!: (r: IoRec) => void;
    const promise = new Promise<IoRec>((r) => (resolve = r));
    const rec: IoRec = {
      id: this.all.length,
      device: md.name,
      op,
      sector,
      sectors,
      bio,
      data: buf ?? Buffer.alloc(0),
      completions: 0,
      status: null,
      promise,
    };
    this.all.push(rec);
    this.byBio.set(bio, { rec, resolve });
    bio.submitTo(md);
    return rec;
  }

  read(md: MappedDevice, sector: number, sectors: number): IoRec {
    return this.submit(md, "read", sector, sectors);
  }

  write(md: MappedDevice, sector: number, data: Buffer, flags = 0): IoRec {
    return this.submit(md, "write", sector, data.length / SECTOR_SIZE, data, flags);
  }

  flush(md: MappedDevice): IoRec {
    return this.submit(md, "flush", 0, 0, undefined, 2 /* PREFLUSH */);
  }

  bioDone(bio: Bio): void {
    const entry = this.byBio.get(bio);
    if (!entry) {
      this.errors.push("completion of an unknown bio");
      return;
    }
    const { rec, resolve } = entry;
    rec.completions++;
    if (rec.completions > 1) {
      this.errors.push(`bio #${rec.id} (${rec.op} ${rec.device}@${rec.sector}) completed ${rec.completions} times`);
      return;
    }
    rec.status = bio.status;
    rec.onDone?.(rec);
    resolve(rec);
  }

  get outstanding(): IoRec[] {
    return this.all.filter((r) => r.completions === 0);
  }
}

/** The chunk-aligned slice [chunk*cs, (chunk+1)*cs) of a buffer holding a whole device. */
export function chunkOf(buf: Buffer, cs: number, chunk: number): Buffer {
  return buf.subarray(chunk * cs * SECTOR_SIZE, (chunk + 1) * cs * SECTOR_SIZE);
}

export function sectorsOf(buf: Buffer, sector: number, sectors: number): Buffer {
  return buf.subarray(sector * SECTOR_SIZE, (sector + sectors) * SECTOR_SIZE);
}

export { pattern };

/** Internal counters of a snapshot target, for leak checks: all zero when it is idle. */
export function engineState(t: unknown): {
  pending: number;
  alive: number;
  tracked: number;
  gateHeld: number;
  inProgress: number;
} {
  const s = t as {
    pending: Map<number, unknown>;
    alive: number;
    tracked: { size: number };
    gate: { held: number };
    inProgress: number;
  };
  return {
    pending: s.pending.size,
    alive: s.alive,
    tracked: s.tracked.size,
    gateHeld: s.gate.held,
    inProgress: s.inProgress,
  };
}

export const IDLE = { pending: 0, alive: 0, tracked: 0, gateHeld: 0, inProgress: 0 };

/** Writes on a device's log (completed), as "sector+sectors", optionally after a log index. */
export function writesOf(dev: ControlledDevice, from = 0): string[] {
  return dev.log
    .slice(from)
    .filter((r) => r.op === "write")
    .map((r) => `${r.sector}+${r.sectors}`);
}

/** A COW data write (copy or snapshot write): no FUA. */
export const dataWrite = (b: Bio) => b.op === "write" && (b.flags & BioFlags.FUA) === 0;
/** A metadata commit (the store's PREFLUSH|FUA area write, or a FUA header write). */
export const metadataWrite = (b: Bio) => b.op === "write" && (b.flags & BioFlags.FUA) !== 0;

/** Every bio in `recs` completed exactly once, with `status`. */
export function expectDone(recs: IoRec[], status = "ok"): void {
  for (const rec of recs) {
    expect(rec.completions, `bio #${rec.id} ${rec.op} ${rec.device}@${rec.sector}`).toBe(1);
    expect(rec.status, `bio #${rec.id} ${rec.op} ${rec.device}@${rec.sector}`).toBe(status);
  }
}
