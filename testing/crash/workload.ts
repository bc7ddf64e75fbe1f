/**
 * The seeded workload on the snapshot stack: I/O batches, flushes, suspends with I/O in flight,
 * snapshot creation and removal, and merges, each operation followed by a `mark op<n>` to every
 * log-writes device. The model records what each mapped device was asked to do. With reused COW
 * devices, each snapshot's COW device starts with an older store on it, and origin sweeps (long
 * runs of writes) fill metadata areas.
 */
import { SECTOR_SIZE } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { readCowImage } from "../../targets/snapshot/cow-image.js";
import type { CrashClock } from "./devices.js";
import type { LoggedDevices } from "./logged-devices.js";
import { waitForMerge } from "./merge.js";
import { DeviceHistory, type SnapshotModel, type TopWrite, stampSector } from "./model.js";
import { cowSectorsFor } from "./ram-disks.js";
import { reusedCowImage } from "./reused-cow.js";
import type { RunStats } from "./report.js";
import type { Rng } from "../rng.js";
import type { StackModel } from "./stack-model.js";
import { type BusyRanges, WorkloadIo } from "./workload-io.js";

const CHUNK_SIZES = [8, 16, 32] as const;

/** One workload operation, for describing crash points. */
export interface OpRecord {
  index: number;
  /** Clock stamp when it started. */
  at: number;
  desc: string;
}

export interface WorkloadSettings {
  maxSnapshots: number;
  /** Target types of the snapshot and merge tables. */
  snapshotTarget: string;
  mergeTarget: string;
  mergesEnabled: boolean;
  /** COW devices start as reused ones (reused-cow.ts), and the workload sweeps the origin. */
  reusedCow: boolean;
}

export class Workload {
  readonly ops: OpRecord[] = [];
  /** Clock stamp of every mark sent, by name. */
  readonly markStamps = new Map<string, number>();
  mergesDone = 0;
  private readonly io: WorkloadIo;

  constructor(
    private readonly rng: Rng,
    private readonly clock: CrashClock,
    private readonly dm: DeviceMapper,
    private readonly model: StackModel,
    private readonly logged: LoggedDevices,
    private readonly settings: WorkloadSettings,
    private readonly stats: RunStats,
    private readonly problem: (text: string) => void,
  ) {
    this.io = new WorkloadIo(rng, clock, dm, model, stats, problem);
  }

  private get originSectors(): number {
    return this.model.originSectors;
  }

  /** The origin's log-writes device over its stamped initial data, and snapshot-origin over that. */
  async setUp(): Promise<void> {
    const initial = Buffer.allocUnsafe(this.originSectors * SECTOR_SIZE);
    for (let sector = 0; sector < this.originSectors; sector++) stampSector(initial, sector * SECTOR_SIZE, 0, sector);
    const device = await this.logged.create(this.dm, "origin", this.originSectors, initial, null);
    await this.dm.create("origin", {
      table: `0 ${this.originSectors} snapshot-origin /dev/mapper/${device.logWritesName}`,
    });
  }

  async tearDown(): Promise<void> {
    for (const snapshot of this.model.liveSnapshots()) await this.dm.remove(snapshot.name);
    await this.dm.remove("origin");
    for (const device of this.logged.list) await this.dm.remove(device.logWritesName);
  }

  async step(index: number): Promise<void> {
    const live = this.model.liveSnapshots();
    const at = this.clock.tick();
    const kind =
      index === 0 && this.settings.maxSnapshots > 0
        ? "create"
        : this.rng.weighted<string>([
            ["io", 70],
            ["flush", 8],
            ["suspend", 6],
            ["create", live.length < this.settings.maxSnapshots ? (live.length === 0 ? 30 : 6) : 0],
            ["remove", live.length > 0 ? 3 : 0],
            ["merge", this.settings.mergesEnabled && live.length > 0 ? 3 : 0],
            // Last, and weight 0 unless asked for: other runs draw exactly as before.
            ["sweep", this.settings.reusedCow ? 6 : 0],
          ]);
    let desc: string = kind;
    switch (kind) {
      case "io":
        desc = await this.io.batch(this.rng.range(1, 6));
        break;
      case "flush": {
        const device = this.rng.chance(0.6) || live.length === 0 ? "origin" : this.rng.pick(live).name;
        desc = `flush ${device}`;
        await this.io.flush(device);
        break;
      }
      case "suspend":
        desc = await this.suspendWithIo();
        break;
      case "create":
        desc = await this.createSnapshot();
        break;
      case "remove":
        desc = await this.removeSnapshot(this.rng.pick(live));
        break;
      case "merge":
        desc = await this.mergeSnapshot(this.rng.pick(live));
        break;
      case "sweep":
        desc = await this.sweep();
        break;
    }
    this.ops.push({ index, at, desc });
    await this.mark(`op${index}`);
  }

  private async mark(name: string): Promise<void> {
    const at = this.clock.tick();
    this.markStamps.set(name, at);
    // Sent without awaiting in between: target.message runs synchronously inside dm.message.
    const devices = this.logged.list.filter((device) => this.dm.has(device.logWritesName));
    for (const device of devices) device.marks.push({ name, at });
    await Promise.all(devices.map((device) => this.dm.message(device.logWritesName, 0, `mark ${name}`)));
  }

  private async suspendWithIo(): Promise<string> {
    const live = this.model.liveSnapshots();
    const device = live.length > 0 && this.rng.chance(0.4) ? this.rng.pick(live).name : "origin";
    this.stats.suspends++;
    const busy: BusyRanges = new Map();
    const first = this.io.start(this.rng.range(1, 4), busy);
    const suspended = this.dm.suspend(device);
    // Some I/O arrives while the device is suspending or suspended: it waits for the resume.
    const second = this.io.start(this.rng.range(0, 3), busy);
    await suspended;
    await this.dm.resume(device);
    await Promise.all([...first.done, ...second.done]);
    return `suspend ${device} with ${[...first.desc, ...second.desc].join(", ") || "no I/O"}`;
  }

  /**
   * Origin writes over a long run of sectors, all in flight together: many chunks are copied at
   * once, so the snapshots' metadata areas fill and the stores seal them (and zero the next).
   */
  private async sweep(): Promise<string> {
    // A quarter of the origin up to all of it, in 32-sector writes.
    const piece = 32;
    const pieces = this.rng.range(Math.ceil(this.originSectors / 128), Math.floor(this.originSectors / piece));
    const start = this.rng.int(this.originSectors - pieces * piece + 1);
    const done: Promise<void>[] = [];
    for (let k = 0; k < pieces; k++) done.push(this.io.write("origin", start + k * piece, piece, false));
    await Promise.all(done);
    return `sweep origin ${start}+${pieces * piece}`;
  }

  private async createSnapshot(): Promise<string> {
    const index = this.model.snapshots.length;
    const chunkSize = this.rng.pick(CHUNK_SIZES);
    const cowSectors = cowSectorsFor(chunkSize, this.originSectors);
    // A reused device: an older store of this chunk size half the time (its areas where the new
    // store's are), of any size otherwise.
    const reused = this.settings.reusedCow
      ? reusedCowImage({
          sectors: cowSectors,
          staleChunkSize: this.rng.chance(0.5) ? chunkSize : this.rng.pick(CHUNK_SIZES),
          originSectors: this.originSectors,
          seed: this.rng.u32(),
        })
      : null;
    const name = `snap${index}`;
    const snapshot: SnapshotModel = {
      index,
      name,
      chunkSize,
      cowSectors,
      createdAt: 0,
      removedAt: Infinity,
      pointInTime: new Int32Array(this.originSectors),
      history: new DeviceHistory(name, this.originSectors),
      mergeStartedAt: Infinity,
      mergeDoneAt: Infinity,
      recordedAtMerge: null,
    };
    const cow = await this.logged.create(this.dm, `cow${index}`, cowSectors, reused, snapshot);
    // Nothing is in flight between operations: the origin's content is its acknowledged writes.
    for (let sector = 0; sector < this.originSectors; sector++) {
      snapshot.pointInTime[sector] = this.model.expectedNow("origin", sector);
    }
    snapshot.createdAt = this.clock.tick();
    this.model.snapshots.push(snapshot);
    await this.dm.suspend("origin");
    try {
      await this.dm.create(name, {
        table:
          `0 ${this.originSectors} ${this.settings.snapshotTarget} ` +
          `/dev/mapper/lw-origin /dev/mapper/${cow.logWritesName} P ${chunkSize}`,
      });
    } finally {
      await this.dm.resume("origin");
    }
    this.stats.snapshotsCreated++;
    return `create ${name} (chunk size ${chunkSize})`;
  }

  private async removeSnapshot(snapshot: SnapshotModel): Promise<string> {
    snapshot.removedAt = this.clock.tick();
    await this.dm.remove(snapshot.name);
    this.stats.snapshotsRemoved++;
    return `remove ${snapshot.name}`;
  }

  /**
   * lvconvert --merge: the origin's device gets a snapshot-merge table that takes over the
   * snapshot's store (the snapshot device is suspended first), reads as the snapshot at once and
   * copies its chunks back; once the merge has finished the origin goes back to snapshot-origin
   * and the snapshot device is removed. In the model, every sector of a chunk the snapshot had
   * recorded gets a "merged" write carrying the snapshot's content there, durable once the merge
   * has finished; a crash before that reactivates the merge (see crash-point.ts).
   */
  private async mergeSnapshot(snapshot: SnapshotModel): Promise<string> {
    const cow = this.logged.cowOf(snapshot);
    // Nothing is in flight: what the COW device holds is what the store has committed.
    const image = await readCowImage(cow.recorder.inner);
    snapshot.recordedAtMerge = new Set(image.records.map((record) => record.oldChunk));
    snapshot.mergeStartedAt = this.clock.tick();
    snapshot.removedAt = snapshot.mergeStartedAt;
    // From now on the origin device reads as the snapshot.
    const merged: TopWrite[] = [];
    for (const chunk of snapshot.recordedAtMerge) {
      const end = Math.min(this.originSectors, (chunk + 1) * snapshot.chunkSize);
      for (let sector = chunk * snapshot.chunkSize; sector < end; sector++) {
        const write: TopWrite = {
          id: this.model.expectedNow(snapshot.name, sector),
          device: "origin",
          sector,
          sectors: 1,
          fua: false,
          submit: snapshot.mergeStartedAt,
          ack: snapshot.mergeStartedAt,
          failed: false,
          durableAt: Infinity,
          merged: true,
        };
        this.model.origin.addWrite(write);
        merged.push(write);
      }
    }
    for (const write of merged) this.model.origin.acked(write);
    const mergeTable =
      `0 ${this.originSectors} ${this.settings.mergeTarget} ` +
      `/dev/mapper/lw-origin /dev/mapper/${cow.logWritesName} P ${snapshot.chunkSize}`;
    await this.dm.load("origin", mergeTable);
    await this.dm.suspend(snapshot.name);
    await this.dm.resume("origin");
    // I/O while it merges: writes to merged, merging and not yet merged chunks (R10 in
    // docs/snapshot.md), flushes.
    const during: string[] = [];
    for (let k = this.rng.range(0, 4); k > 0; k--) during.push(await this.io.batch(this.rng.range(1, 5)));
    const failure = await waitForMerge(this.dm, "origin", 30_000);
    if (failure) this.problem(`merge of ${snapshot.name}: ${failure}`);
    snapshot.mergeDoneAt = this.clock.tick();
    for (const write of merged) write.durableAt = snapshot.mergeDoneAt;
    await this.io.readExpecting("origin", 0, this.originSectors, (sector) => this.model.expectedNow("origin", sector));
    await this.dm.load("origin", `0 ${this.originSectors} snapshot-origin /dev/mapper/lw-origin`);
    await this.dm.resume("origin");
    await this.dm.remove(snapshot.name);
    this.mergesDone++;
    const meanwhile = during.length ? `, meanwhile ${during.join("; ")}` : "";
    return `merge ${snapshot.name} (${snapshot.recordedAtMerge.size} chunks)${meanwhile}`;
  }
}
