/**
 * The seeded thin workload: a pool on log-writes devices (metadata and data, each over a recorded
 * RAM disk), thin volumes and their snapshots taking batches of concurrent writes (some FUA, some
 * whole blocks), discards, reads and flushes; snapshot creation with the origin suspended around
 * `create_snap` (and I/O to the other volumes meanwhile), volume deletion, suspends of a volume
 * or of the pool with I/O in flight, and the pool's periodic commit fired with I/O in flight.
 * Every operation is followed by a `mark op<n>` to both log-writes devices.
 */
import { SECTOR_SIZE } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { Services } from "../../core/services.js";
import type { WorkQueues } from "../../core/work-queue.js";
import { poolByName } from "../../targets/thin/pool-registry.js";
import type { CrashClock } from "../crash/devices.js";
import type { LoggedDevices } from "../crash/logged-devices.js";
import { stampSector } from "../crash/model.js";
import type { OpRecord } from "../crash/workload.js";
import type { Rng } from "../rng.js";
import type { ManualClock } from "./clock.js";
import { STALE_ID, type ThinPoolModel, type ThinVolume } from "./model.js";
import type { ThinRunStats } from "./report.js";
import { type BusyRanges, ThinIo } from "./workload-io.js";

/** The metadata device: 2 MiB, far more than the workload's trees need. */
export const METADATA_SECTORS = 4096;
/** The pool's device name in the workload's mapper. */
export const POOL_NAME = "pool";

export interface ThinWorkloadSettings {
  /** Target type of the workload's pool table (thin-pool, or a broken pool). */
  poolTarget: string;
  maxVolumes: number;
  dataBlocks: number;
  /** The pool table's feature arguments, "" or " <n> <feature>...". */
  features: string;
}

export class ThinWorkload {
  readonly ops: OpRecord[] = [];
  readonly markStamps = new Map<string, number>();
  /** Clock stamp once the pool's table is live (its metadata formatted and sized). */
  poolReadyAt = Infinity;
  private nextDevId = 0;
  private readonly io: ThinIo;

  constructor(
    private readonly rng: Rng,
    private readonly clock: CrashClock,
    private readonly timers: ManualClock,
    private readonly dm: DeviceMapper,
    private readonly model: ThinPoolModel,
    private readonly logged: LoggedDevices,
    private readonly settings: ThinWorkloadSettings,
    private readonly stats: ThinRunStats,
    private readonly problem: (text: string) => void,
  ) {
    this.io = new ThinIo(rng, clock, dm, model, stats, problem);
  }

  get dataSectors(): number {
    return this.settings.dataBlocks * this.model.blockSize;
  }

  /** log-writes over the metadata RAM disk (zeros) and the data RAM disk (stale stamps), the pool, and a first volume. */
  async setUp(): Promise<void> {
    const stale = Buffer.allocUnsafe(this.dataSectors * SECTOR_SIZE);
    for (let sector = 0; sector < this.dataSectors; sector++) {
      stampSector(stale, sector * SECTOR_SIZE, STALE_ID, sector);
    }
    await this.logged.create(this.dm, "meta", METADATA_SECTORS, null, null);
    await this.logged.create(this.dm, "data", this.dataSectors, stale, null);
    await this.dm.create(POOL_NAME, {
      table:
        `0 ${this.dataSectors} ${this.settings.poolTarget} /dev/mapper/lw-meta /dev/mapper/lw-data ` +
        `${this.model.blockSize} 0${this.settings.features}`,
    });
    this.poolReadyAt = this.clock.tick();
    await this.createThin([]);
  }

  async tearDown(): Promise<void> {
    for (const volume of this.model.live()) await this.dm.remove(volume.name);
    await this.dm.remove(POOL_NAME);
    for (const device of this.logged.list) await this.dm.remove(device.logWritesName);
  }

  async step(index: number): Promise<void> {
    const live = this.model.live();
    const room = live.length < this.settings.maxVolumes;
    const at = this.clock.tick();
    const kind = this.rng.weighted<string>([
      ["io", 55],
      ["flush", 8],
      ["suspend", 4],
      ["pool-suspend", 3],
      ["commit", 6],
      ["thin", room ? 2 : 0],
      ["snap", room ? 8 : 0],
      ["delete", live.length > 1 ? 3 : 0],
    ]);
    let desc: string;
    switch (kind) {
      case "io":
        desc = await this.io.batch(live, this.rng.range(1, 6));
        break;
      case "flush": {
        const volume = this.rng.pick(live);
        desc = `flush ${volume.name}`;
        await this.io.flush(volume);
        break;
      }
      case "suspend":
        desc = await this.suspendWithIo(live);
        break;
      case "pool-suspend":
        desc = await this.suspendPoolWithIo(live);
        break;
      case "commit":
        desc = await this.periodicCommit(live);
        break;
      case "thin":
        desc = await this.createThin(live);
        break;
      case "snap":
        desc = await this.createSnapshot(this.rng.pick(live), live);
        break;
      default:
        desc = await this.deleteVolume(this.rng.pick(live), live);
        break;
    }
    this.ops.push({ index, at, desc });
    await this.mark(`op${index}`);
  }

  private async mark(name: string): Promise<void> {
    const at = this.clock.tick();
    this.markStamps.set(name, at);
    const devices = this.logged.list;
    for (const device of devices) device.marks.push({ name, at });
    await Promise.all(devices.map((device) => this.dm.message(device.logWritesName, 0, `mark ${name}`)));
  }

  /** A pool message; for the model, a flush of every volume (the commit flushes the data device first). */
  private async poolMessage(text: string): Promise<{ sent: number; done: number; ok: boolean }> {
    const sent = this.clock.tick();
    let ok = true;
    try {
      await this.dm.message(POOL_NAME, 0, text);
    } catch (err) {
      ok = false;
      this.problem(`pool message "${text}" failed: ${(err as Error).message}`);
    }
    const done = this.clock.tick();
    this.model.poolFlush(sent, done, !ok);
    return { sent, done, ok };
  }

  private thinTable(volume: ThinVolume): string {
    return `0 ${this.model.volumeSectors} thin /dev/mapper/${POOL_NAME} ${volume.id}`;
  }

  private async createThin(live: ThinVolume[]): Promise<string> {
    const busy: BusyRanges = new Map();
    const meanwhile = this.io.start(live, this.rng.range(0, 3), busy);
    const volume = this.model.newVolume(this.nextDevId++, null, null);
    const message = await this.poolMessage(`create_thin ${volume.id}`);
    volume.createSent = message.sent;
    if (message.ok) {
      volume.createDone = message.done;
      await this.dm.create(volume.name, { table: this.thinTable(volume) });
      this.stats.thinsCreated++;
    }
    await Promise.all(meanwhile.done);
    return `create_thin ${volume.id}${withIo(meanwhile.desc)}`;
  }

  /**
   * lvcreate -s of a thin volume: the origin is suspended (its I/O in flight finishes first), the
   * pool takes `create_snap`, the origin resumes. The other volumes' I/O goes on throughout.
   */
  private async createSnapshot(origin: ThinVolume, live: ThinVolume[]): Promise<string> {
    const others = live.filter((volume) => volume !== origin);
    const busy: BusyRanges = new Map();
    const before = this.io.start(live, this.rng.range(0, 3), busy);
    await this.dm.suspend(origin.name);
    const during = this.io.start(others, this.rng.range(0, 3), busy);
    // Nothing of the origin is in flight: its content is its acknowledged writes.
    const base = new Int32Array(this.model.volumeSectors);
    for (let sector = 0; sector < base.length; sector++) base[sector] = this.model.expectedNow(origin, sector);
    const volume = this.model.newVolume(this.nextDevId++, base, origin.id);
    let message;
    try {
      message = await this.poolMessage(`create_snap ${volume.id} ${origin.id}`);
    } finally {
      await this.dm.resume(origin.name);
    }
    volume.createSent = message.sent;
    if (message.ok) {
      volume.createDone = message.done;
      await this.dm.create(volume.name, { table: this.thinTable(volume) });
      this.stats.snapshotsCreated++;
    }
    await Promise.all([...before.done, ...during.done]);
    return `create_snap ${volume.id} ${origin.id}${withIo([...before.desc, ...during.desc])}`;
  }

  /** lvremove: the volume's device goes, then the pool deletes it; the other volumes' I/O goes on. */
  private async deleteVolume(volume: ThinVolume, live: ThinVolume[]): Promise<string> {
    const others = live.filter((other) => other !== volume);
    const meanwhile = this.io.start(others, this.rng.range(0, 3));
    await this.dm.remove(volume.name);
    const message = await this.poolMessage(`delete ${volume.id}`);
    volume.deleteSent = message.sent;
    if (message.ok) volume.deleteDone = message.done;
    this.stats.deletes++;
    if (volume.origin !== null) this.stats.snapshotsRemoved++;
    await Promise.all(meanwhile.done);
    return `delete ${volume.id}${withIo(meanwhile.desc)}`;
  }

  /** A volume suspended and resumed with I/O in flight and arriving meanwhile (it waits for the resume). */
  private async suspendWithIo(live: ThinVolume[]): Promise<string> {
    const volume = this.rng.pick(live);
    this.stats.suspends++;
    const busy: BusyRanges = new Map();
    const first = this.io.start(live, this.rng.range(1, 4), busy);
    const suspended = this.dm.suspend(volume.name);
    const second = this.io.start(live, this.rng.range(0, 3), busy);
    await suspended;
    await this.dm.resume(volume.name);
    await Promise.all([...first.done, ...second.done]);
    return `suspend ${volume.name}${withIo([...first.desc, ...second.desc])}`;
  }

  /**
   * The pool suspended and resumed with I/O to the volumes in flight and arriving: the pool
   * suspends its thin devices first and commits (dm-thin.c: pool_presuspend, pool_postsuspend).
   */
  private async suspendPoolWithIo(live: ThinVolume[]): Promise<string> {
    this.stats.suspends++;
    const busy: BusyRanges = new Map();
    const first = this.io.start(live, this.rng.range(1, 4), busy);
    const suspended = this.dm.suspend(POOL_NAME);
    const second = this.io.start(live, this.rng.range(0, 3), busy);
    await suspended;
    await this.dm.resume(POOL_NAME);
    await Promise.all([...first.done, ...second.done]);
    return `suspend the pool${withIo([...first.desc, ...second.desc])}`;
  }

  /**
   * The pool's waker (a commit every second while something changed) fired with I/O in flight; the
   * operation ends when that commit has, so nothing is in flight at the mark.
   */
  private async periodicCommit(live: ThinVolume[]): Promise<string> {
    const io = this.io.start(live, this.rng.range(1, 5));
    const pool = poolByName(this.dm.container.resolve<WorkQueues>(Services.WorkQueues), POOL_NAME);
    const pending = pool?.pmd.changedThisTransaction() ?? false;
    this.timers.advance(1000);
    // The waker's commit has not started yet: commit() joins it.
    const commit = pending && pool ? pool.commit().catch(() => {}) : null;
    if (commit) this.stats.periodicCommits++;
    await Promise.all([...io.done, commit]);
    return `periodic commit${commit ? "" : " (nothing to commit)"}${withIo(io.desc)}`;
  }
}

function withIo(desc: string[]): string {
  return desc.length ? ` with ${desc.join(", ")}` : "";
}
