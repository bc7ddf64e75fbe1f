/**
 * runTargetCrashCheck: is a target crash consistent? A device mapped with the target's table over
 * ControlledDevices with a volatile write cache takes a seeded workload of concurrent reads,
 * writes (some FUA) and flushes, whose bios reach the devices in an order the seed picks
 * (SeededScheduler). Every read must return the last acknowledged write. Between batches, at
 * random, the devices "lose power" (each keeps its durable data plus a random part of its cache),
 * the same table is loaded over the crashed copies in a fresh mapper, and every sector must hold
 * what the DurabilityModel allows: a target that loses a flush or a FUA, reorders a write past a
 * flush, or cannot read its own data after a crash is caught, with the seed to replay it.
 */
import { SECTOR_SHIFT } from "../../core/bio.js";
import type { DeviceHandle, DeviceMapper } from "../../core/device-mapper.js";
import type { TargetClass } from "../../core/target.js";
import { ControlledDevice } from "../controlled-device.js";
import { testMapper } from "../memory-backing.js";
import { Rng } from "../rng.js";
import { SeededScheduler } from "../scheduler.js";
import { DurabilityModel, type ModelWrite, readStamp, stampedData } from "./model.js";

export interface TargetCrashCheckOptions {
  /** The target classes the table uses that are not built in (a plugin's). */
  targets: TargetClass[];
  /** The table of the device under test; it names the devices of `devices`. */
  table: string;
  /** Devices the table names: name → size in sectors. */
  devices: Record<string, number>;
  seed: number;
  /** Batches of concurrent I/O (default 200). */
  ops?: number;
  /** Crash points, at random batch ends (default ops / 4). */
  crashPoints?: number;
  /** I/Os in flight together in a batch, at most (default 4). */
  maxInFlight?: number;
  /** Largest write or read, in sectors (default 16). */
  maxIoSectors?: number;
}

export interface TargetCrashReport {
  seed: number;
  writes: number;
  flushes: number;
  crashPoints: number;
  /** Empty when the target passed. At most 20 are listed; `problemCount` has them all. */
  problems: string[];
  problemCount: number;
}

interface PlannedIo {
  kind: "write" | "read" | "flush";
  sector: number;
  sectors: number;
  fua: boolean;
}

export async function runTargetCrashCheck(options: TargetCrashCheckOptions): Promise<TargetCrashReport> {
  return new TargetCrashCheck(options).run();
}

class TargetCrashCheck {
  private readonly rng: Rng;
  private readonly model = new DurabilityModel();
  private readonly devices = new Map<string, ControlledDevice>();
  private readonly report: TargetCrashReport;
  private initial: Buffer = Buffer.alloc(0);

  constructor(private readonly options: TargetCrashCheckOptions) {
    this.rng = new Rng(options.seed);
    this.report = { seed: options.seed, writes: 0, flushes: 0, crashPoints: 0, problems: [], problemCount: 0 };
  }

  async run(): Promise<TargetCrashReport> {
    const ops = this.options.ops ?? 200;
    const crashChance = Math.min(1, (this.options.crashPoints ?? Math.ceil(ops / 4)) / ops);
    for (const [name, sectors] of Object.entries(this.options.devices)) {
      this.devices.set(name, new ControlledDevice(sectors, { name, volatileCache: true }));
    }
    const dm = this.mapper(this.devices);
    await dm.create("under-test", { table: this.options.table });
    const handle = dm.open("under-test");
    this.initial = await handle.read(0, handle.sizeSectors);
    const scheduler = new SeededScheduler([...this.devices.values()], this.rng.u32());
    for (let batch = 1; batch <= ops; batch++) {
      await scheduler.run(() => this.runBatch(handle, batch));
      if (this.rng.chance(crashChance)) await this.crashPoint(batch);
    }
    await handle.close();
    await dm.close();
    return this.report;
  }

  /** A mapper with the targets registered and `devices` behind their names. */
  private mapper(devices: Map<string, ControlledDevice>): DeviceMapper {
    const { dm, backing } = testMapper();
    dm.registry.register(...this.options.targets);
    for (const [name, device] of devices) backing.add(name, device);
    return dm;
  }

  private async runBatch(handle: DeviceHandle, batch: number): Promise<void> {
    const ios = this.plan(handle.sizeSectors);
    await Promise.all(
      ios.map(async (io) => {
        if (io.kind === "flush") {
          this.report.flushes++;
          if (await this.attempt(`flush in batch ${batch}`, () => handle.flush().then(() => true))) {
            this.model.flushed(batch);
          }
        } else if (io.kind === "write") {
          this.report.writes++;
          const w = this.model.issue(io.sector, io.sectors, io.fua, batch);
          const data = stampedData(w.id, io.sector, io.sectors);
          if (await this.attempt(describe(w), () => handle.write(io.sector, data, { fua: io.fua }))) w.acked = true;
        } else {
          const expected = this.expected(io.sector, io.sectors);
          const what = `read of sectors ${io.sector}+${io.sectors} in batch ${batch}`;
          const got = await this.attempt(what, () => handle.read(io.sector, io.sectors));
          if (got && !got.equals(expected)) this.problem(`${what} returned data other than the last write`);
        }
      }),
    );
  }

  /** Up to maxInFlight I/Os of which no write overlaps another I/O, and at most one flush. */
  private plan(size: number): PlannedIo[] {
    const max = this.options.maxIoSectors ?? 16;
    const ios: PlannedIo[] = [];
    const count = 1 + this.rng.int(this.options.maxInFlight ?? 4);
    for (let i = 0; i < count; i++) {
      const kind = this.rng.weighted<PlannedIo["kind"]>([
        ["write", 6],
        ["read", 3],
        ["flush", ios.some((io) => io.kind === "flush") ? 0 : 1],
      ]);
      if (kind === "flush") {
        ios.push({ kind, sector: 0, sectors: 0, fua: false });
        continue;
      }
      const sectors = 1 + this.rng.int(Math.min(max, size));
      const sector = this.rng.int(size - sectors + 1);
      const clash = ios.some(
        (io) =>
          (io.kind === "write" || kind === "write") && io.sector < sector + sectors && sector < io.sector + io.sectors,
      );
      if (!clash) ios.push({ kind, sector, sectors, fua: kind === "write" && this.rng.chance(0.25) });
    }
    return ios;
  }

  /** Power lost now: reload the table over crashed copies and check every sector. */
  private async crashPoint(batch: number): Promise<void> {
    const point = ++this.report.crashPoints;
    const keep = this.rng.pick([0, 0.5, 1]);
    const crashed = new Map(
      [...this.devices].map(([name, d]) => [name, d.crash({ keep: () => this.rng.chance(keep) })]),
    );
    const dm = this.mapper(crashed);
    const where = `crash point ${point} after batch ${batch} (seed ${this.options.seed})`;
    try {
      await dm.create("recovered", { table: this.options.table });
      const handle = dm.open("recovered");
      const content = await this.attempt(`${where}: reading the recovered device`, () =>
        handle.read(0, handle.sizeSectors),
      );
      if (content) this.checkRecovered(content, where);
      await handle.close();
    } catch (err) {
      this.problem(`${where}: the table does not load over the crashed devices: ${(err as Error).message}`);
    } finally {
      await dm.close();
    }
  }

  private checkRecovered(content: Buffer, where: string): void {
    for (let s = 0; s < content.length >> SECTOR_SHIFT; s++) {
      const got = sectorOf(content, s);
      const { writes, old } = this.model.allowedAfterCrash(s);
      const id = readStamp(got, s);
      const isOld = got.equals(sectorOf(this.initial, s));
      if (id !== null && writes.some((w) => w.id === id)) continue;
      if (old && isOld) continue;
      const holds = id !== null ? `write #${id}` : isOld ? "its old content" : "data no write put there";
      const allowed = writes.map((w) => `#${w.id}${this.model.durable(w) ? " (durable)" : ""}`);
      this.problem(
        `${where}: sector ${s} holds ${holds}; allowed: ${[...(old ? ["old content"] : []), ...allowed].join(", ")}`,
      );
    }
  }

  private expected(sector: number, sectors: number): Buffer {
    return Buffer.concat(
      Array.from({ length: sectors }, (_, i) => {
        const w = this.model.current(sector + i);
        return w ? stampedData(w.id, sector + i, 1) : sectorOf(this.initial, sector + i);
      }),
    );
  }

  /** Run one I/O; a failure is a problem (the workload never fails I/O on purpose). */
  private async attempt<T>(what: string, io: () => Promise<T>): Promise<T | null> {
    try {
      return await io();
    } catch (err) {
      this.problem(`${what} failed: ${(err as Error).message}`);
      return null;
    }
  }

  private problem(text: string): void {
    if (this.report.problems.length < 20) this.report.problems.push(text);
    this.report.problemCount++;
  }
}

function describe(w: ModelWrite): string {
  return `write #${w.id} of sectors ${w.sector}+${w.sectors}${w.fua ? " (FUA)" : ""}`;
}

function sectorOf(buf: Buffer, sector: number): Buffer {
  return buf.subarray(sector << SECTOR_SHIFT, (sector + 1) << SECTOR_SHIFT);
}
