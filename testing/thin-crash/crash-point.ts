/**
 * One crash point of a thin run: fresh devices with the metadata and data a crash at that moment
 * leaves, the metadata checked (check.ts always, thin_check when asked), the pool and every thin
 * volume in its metadata activated again, and each volume's data and status checked against the
 * model. At random points the recovered pool must go on working: writes to the volumes, a flush,
 * the metadata checked again, a second activation reading the same.
 */
import { Bio, BioFlags, SECTOR_SIZE, submitAndWait } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { checkPoolMetadata } from "../../targets/thin/metadata/check.js";
import { firstDifference } from "../crash/content-checks.js";
import type { NamedDevices } from "../crash/devices.js";
import type { IncrementalReplay } from "../crash/incremental-replay.js";
import { writeData } from "../crash/model.js";
import { readAll } from "../crash/ram-disks.js";
import { Problems } from "../crash/report.js";
import type { CrashPoint } from "../crash/schedule.js";
import { Rng } from "../rng.js";
import { checkVolume, checkVolumeStatus } from "./content-checks.js";
import type { ThinPoolModel, ThinVolume } from "./model.js";
import type { ThinRunStats } from "./report.js";
import type { ThinCheckTool } from "./thin-check-tool.js";

/** Ids of writes made while checking a recovered pool (never in the model). */
const RECOVERY_ID_BASE = 0x4000_0000;

export interface ThinPointSettings {
  dataSectors: number;
  /** Clock stamp from which the pool's metadata must be formatted. */
  poolReadyAt: number;
  postRecovery: boolean;
  /** The pool table's feature arguments, as the workload's. */
  features: string;
  /** A leaked data block fails the point (else it is only counted). */
  leaksFail: boolean;
}

export interface ThinPointResult {
  problems: string[];
  metadataChecked: boolean;
  thinChecked: boolean;
  postRecovery: boolean;
  volumes: number;
  /** Leaked data blocks found and not counted as problems (leaksFail off). */
  leaks: number;
}

/** check.ts's words for a data block counted in the space map more often than the mappings refer to it. */
export function isDataLeak(error: string): boolean {
  const m = /^data space map: block \d+ has count (\d+), but (\d+) references$/.exec(error);
  return m !== null && Number(m[1]) > Number(m[2]);
}

type Mappings = Map<number, Map<number, { block: number; time: number }>>;

export class ThinCrashPointChecker {
  private nextRecoveryId = RECOVERY_ID_BASE;
  private readonly buffers: Buffer[] = [];

  constructor(
    private readonly dm: DeviceMapper,
    private readonly backing: NamedDevices,
    private readonly model: ThinPoolModel,
    private readonly metaReplay: IncrementalReplay,
    private readonly dataReplay: IncrementalReplay,
    private readonly settings: ThinPointSettings,
    private readonly stats: ThinRunStats,
    private readonly thinCheck: ThinCheckTool | null,
  ) {}

  /** Check crash point `point` (number `pointNumber`, which names its devices); thin_check too when `withThinCheck`. */
  async check(point: CrashPoint, pointNumber: number, withThinCheck: boolean): Promise<ThinPointResult> {
    const problems = new Problems();
    const result: ThinPointResult = {
      problems: problems.list,
      metadataChecked: false,
      thinChecked: false,
      postRecovery: false,
      volumes: 0,
      leaks: 0,
    };
    const crashAt = point.at;
    const prefix = `c${pointNumber}`;
    const rng = point.kind === "random" ? new Rng(point.seed) : null;
    const meta = await this.metaReplay.crashImage(`${prefix}-m`, rng, point.keep, this.stats);
    const data = await this.dataReplay.crashImage(`${prefix}-d`, rng, point.keep, this.stats);
    this.backing.add(`${prefix}-m`, meta);
    this.backing.add(`${prefix}-d`, data);
    const created: string[] = [];
    try {
      let mappings: Mappings = new Map();
      const formatted = !(await readAll(meta, 8)).every((byte) => byte === 0);
      if (!formatted) {
        if (crashAt >= this.settings.poolReadyAt) {
          problems.add("metadata", "the metadata device is not formatted, though the pool's table was live");
        }
      } else {
        const report = await checkPoolMetadata(meta).catch((err: Error) => ({
          errors: [`check.ts failed: ${err.stack ?? err.message}`],
          mappings: new Map() as Mappings,
        }));
        result.metadataChecked = true;
        for (const error of report.errors) {
          if (!isDataLeak(error)) problems.add("metadata", `metadata: ${error}`, 6);
          else if (this.settings.leaksFail) problems.add("leak", `metadata: ${error} (a leaked data block)`);
          else result.leaks++;
        }
        if (withThinCheck && this.thinCheck) {
          for (const error of await this.thinCheck.check(meta)) problems.add("thin_check", error);
          result.thinChecked = true;
        }
        mappings = report.mappings;
      }
      if (!problems.empty) return result;
      const volumes = this.recoveredVolumes(mappings, crashAt, problems);
      if (!problems.empty) return result;
      await this.activate(prefix, volumes, created, problems);
      if (!problems.empty) return result;
      const contents = new Map<ThinVolume, Buffer>();
      for (const volume of volumes) {
        const name = `${prefix}-t${volume.id}`;
        const content = await this.readVolume(name, contents.size);
        contents.set(volume, content);
        checkVolume(this.model, volume, content, crashAt, problems);
        const status = this.dm.status(name)[0]?.params ?? "";
        checkVolumeStatus(this.model, volume, status, mappings.get(volume.id)!, problems);
      }
      result.volumes = volumes.length;
      if (problems.empty && rng && this.settings.postRecovery && volumes.length > 0) {
        result.postRecovery = true;
        await this.postRecovery(prefix, meta, volumes, contents, created, rng, problems);
      }
    } finally {
      for (const name of created.reverse()) await this.dm.remove(name).catch(() => undefined);
      this.backing.delete(`${prefix}-m`);
      this.backing.delete(`${prefix}-d`);
    }
    return result;
  }

  /** Read volume device `name` whole into reusable buffer `slot` (reading 1 MiB volumes at every point adds up). */
  private async readVolume(name: string, slot: number): Promise<Buffer> {
    const sectors = this.model.volumeSectors;
    const buffer = (this.buffers[slot] ??= Buffer.alloc(sectors * SECTOR_SIZE));
    await submitAndWait(this.dm.device(name), new Bio("read", 0, sectors, buffer, 0, null));
    return buffer;
  }

  /** The model's volumes the metadata holds; a problem for each one there that must not be, or missing that must be. */
  private recoveredVolumes(mappings: Mappings, crashAt: number, problems: Problems): ThinVolume[] {
    const volumes: ThinVolume[] = [];
    for (const id of mappings.keys()) {
      const volume = this.model.byId(id);
      if (!volume) problems.add("devices", `thin device ${id} is in the metadata, but the workload never made it`);
      else if (this.model.existence(volume, crashAt) === "absent") {
        const why = crashAt < volume.createSent ? "before it was created" : "after its delete had returned";
        problems.add("devices", `${volume.name} is in the metadata after a crash ${why}`);
      } else volumes.push(volume);
    }
    for (const volume of this.model.volumes) {
      if (this.model.existence(volume, crashAt) === "exists" && !mappings.has(volume.id)) {
        problems.add("devices", `${volume.name} is not in the metadata, though its creating message had returned`);
      }
    }
    return volumes;
  }

  /** The pool over the crash images, then a thin device per recovered volume. */
  private async activate(prefix: string, volumes: ThinVolume[], created: string[], problems: Problems): Promise<void> {
    const poolName = `${prefix}-pool`;
    const bs = this.model.blockSize;
    try {
      await this.dm.create(poolName, {
        table: `0 ${this.settings.dataSectors} thin-pool ${prefix}-m ${prefix}-d ${bs} 0${this.settings.features}`,
      });
      created.push(poolName);
    } catch (err) {
      problems.add("activate", `the pool does not activate: ${(err as Error).message}`);
      return;
    }
    for (const volume of volumes) {
      const name = `${prefix}-t${volume.id}`;
      try {
        await this.dm.create(name, {
          table: `0 ${this.model.volumeSectors} thin /dev/mapper/${poolName} ${volume.id}`,
        });
        created.push(name);
      } catch (err) {
        problems.add("activate", `${volume.name} does not activate: ${(err as Error).message}`);
      }
    }
  }

  /**
   * Writes (some of whole blocks, some to blocks shared with a snapshot) to the recovered volumes
   * and a flush of each: every volume then reads as before plus exactly those writes (a pool that
   * handed out a block still in use would change another volume), the committed metadata passes
   * check.ts, and a second activation reads the same.
   */
  private async postRecovery(
    prefix: string,
    meta: BlockDevice,
    volumes: ThinVolume[],
    contents: Map<ThinVolume, Buffer>,
    created: string[],
    rng: Rng,
    problems: Problems,
  ): Promise<void> {
    const sectors = this.model.volumeSectors;
    const bs = this.model.blockSize;
    // The volumes' contents as read (not needed after this point): what they must read now.
    const expected = contents;
    const touched = new Set<ThinVolume>();
    for (let i = rng.range(2, 6); i > 0; i--) {
      const volume = rng.pick(volumes);
      // Under skip_block_zeroing a partial write may leave the rest of a new block unzeroed.
      const whole = rng.chance(0.3) || this.model.skipZeroing;
      const length = whole ? bs : rng.pick([1, 4, 8, 16, 32]);
      const sector = whole ? rng.int(sectors / bs) * bs : rng.int(sectors - length + 1);
      const data = writeData(this.nextRecoveryId++, sector, length);
      const name = `${prefix}-t${volume.id}`;
      try {
        await submitAndWait(this.dm.device(name), new Bio("write", sector, length, data, 0, null));
      } catch (err) {
        problems.add(
          "post",
          `after recovery: write to ${volume.name} ${sector}+${length} failed: ${(err as Error).message}`,
        );
        return;
      }
      data.copy(expected.get(volume)!, sector * SECTOR_SIZE);
      touched.add(volume);
    }
    for (const volume of touched) {
      await submitAndWait(
        this.dm.device(`${prefix}-t${volume.id}`),
        new Bio("flush", 0, 0, null, BioFlags.PREFLUSH, null),
      ).catch((err: Error) => problems.add("post", `after recovery: flush of ${volume.name} failed: ${err.message}`));
    }
    const verify = async (when: string) => {
      for (const volume of volumes) {
        const got = await this.readVolume(`${prefix}-t${volume.id}`, volumes.length);
        const want = expected.get(volume)!;
        if (!got.equals(want)) problems.add("post", `${when}: ${volume.name} ${firstDifference(got, want)}`);
      }
    };
    await verify("after writes to the recovered volumes");
    for (const name of created.reverse()) await this.dm.remove(name);
    created.length = 0;
    const report = await checkPoolMetadata(meta);
    for (const error of report.errors) {
      if (this.settings.leaksFail || !isDataLeak(error)) {
        problems.add("post", `after recovery and writes: metadata: ${error}`);
      }
    }
    const again = new Problems();
    await this.activate(prefix, volumes, created, again);
    for (const problem of again.list) problems.add("post", `second activation: ${problem}`);
    if (created.length === volumes.length + 1) await verify("after a second activation");
  }
}
