/**
 * One logged device's state as the crash points move forward in time: a RAM disk holding every
 * log entry durable by the current moment, the plain writes completed but not yet durable, and
 * from those the device a crash at that moment leaves (crashImage).
 */
import { Bio, SECTOR_SIZE, submitAndWait } from "../../core/bio.js";
import { LOG_DISCARD_FLAG } from "../../targets/log-writes/format.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { OverlayDevice } from "./devices.js";
import type { MappedEntry } from "./log-mapping.js";
import type { LoggedDevice } from "./logged-devices.js";
import { markedWrite } from "./ram-disks.js";
import type { RunStats } from "./report.js";
import type { Rng } from "../rng.js";

export class IncrementalReplay {
  /** The first `appliedCount` entries of `byDurableAt` applied to the device's initial content. */
  readonly replayed: MemoryDevice;
  appliedCount = 0;
  /** Plain writes completed by the current moment and not durable yet, in completion order. */
  readonly unflushed = new Set<MappedEntry>();
  private readonly byDurableAt: MappedEntry[];
  /** Plain writes by completion; the first `completedCount` have completed by the current moment. */
  private readonly plainByCompletion: MappedEntry[];
  private completedCount = 0;
  /** Per sector: completion stamp of the write whose data `replayed` holds there (0: the initial content). */
  private readonly sectorStamps: Float64Array;

  constructor(
    readonly device: LoggedDevice,
    readonly entries: MappedEntry[],
    /** Sectors where the log order put an older write after a newer one (see applyEntry). */
    readonly reorderedSectors: Set<number>,
  ) {
    const { key, sectors, initial } = device;
    this.replayed = new MemoryDevice(sectors, { tableName: `${key}-replay`, displayName: `${key}-replay` });
    if (initial) this.replayed.submit(markedWrite(0, initial));
    this.byDurableAt = [...entries].sort((a, b) => a.durableAt - b.durableAt);
    this.plainByCompletion = entries
      .filter((mapped) => mapped.kind === "plain")
      .sort((a, b) => a.completedAt - b.completedAt);
    this.sectorStamps = new Float64Array(sectors);
  }

  /** Move to moment `at`: every entry durable by then applied, every plain write completed by then noted. */
  async advanceTo(at: number): Promise<void> {
    while (
      this.completedCount < this.plainByCompletion.length &&
      this.plainByCompletion[this.completedCount]!.completedAt <= at
    ) {
      this.unflushed.add(this.plainByCompletion[this.completedCount++]!);
    }
    while (this.appliedCount < this.byDurableAt.length && this.byDurableAt[this.appliedCount]!.durableAt <= at) {
      const mapped = this.byDurableAt[this.appliedCount++]!;
      await applyEntry(
        this.replayed,
        mapped,
        (sector) => this.sectorStamps[sector]!,
        (sector) => (this.sectorStamps[sector] = mapped.completedAt),
      );
      mapped.applied = true;
      this.unflushed.delete(mapped);
    }
  }

  /**
   * A fresh device (`name`) holding the state a crash now leaves: what is durable, plus, with
   * `rng`, each unflushed write kept with probability `keep`.
   */
  async crashImage(name: string, rng: Rng | null, keep: number, stats: RunStats): Promise<OverlayDevice> {
    const overlay = new OverlayDevice(this.replayed, name);
    if (rng) {
      const keptStamps = new Map<number, number>();
      for (const mapped of this.unflushed) {
        if (rng.chance(keep)) {
          await applyEntry(
            overlay,
            mapped,
            (sector) => keptStamps.get(sector) ?? this.sectorStamps[sector]!,
            (sector) => keptStamps.set(sector, mapped.completedAt),
          );
          stats.unflushedKept++;
        } else {
          stats.unflushedDropped++;
        }
      }
    }
    return overlay;
  }
}

/**
 * Apply a log entry the way the device would have ended up: sector by sector, only where no write
 * that completed later is already there. Entries are applied in the order they became durable,
 * and log-writes logs a FUA write as soon as it completes but a plain write only at the flush
 * that takes it, so a plain write followed (before any flush) by a FUA write to the same sector
 * comes *after* it in the log: a replay in log order would put the older data back.
 */
async function applyEntry(
  device: BlockDevice,
  mapped: MappedEntry,
  stampOf: (sector: number) => number,
  setStamp: (sector: number) => void,
): Promise<void> {
  const entry = mapped.entry;
  if (mapped.kind === "flush" || mapped.kind === "mark" || entry.nrSectors === 0) return;
  // A discard leaves zeros on the runner's RAM disks (a MemoryDevice gives the pages back).
  const written = entry.flags & LOG_DISCARD_FLAG ? Buffer.alloc(entry.nrSectors * SECTOR_SIZE) : entry.data;
  if (!written) return;
  let runStart = -1;
  const writeRun = async (end: number) => {
    if (runStart < 0) return;
    const data = written.subarray((runStart - entry.sector) * SECTOR_SIZE, (end - entry.sector) * SECTOR_SIZE);
    await submitAndWait(device, new Bio("write", runStart, end - runStart, data, 0, null));
    runStart = -1;
  };
  for (let sector = entry.sector; sector < entry.sector + entry.nrSectors; sector++) {
    if (mapped.completedAt > stampOf(sector)) {
      if (runStart < 0) runStart = sector;
      setStamp(sector);
    } else {
      await writeRun(sector);
    }
  }
  await writeRun(entry.sector + entry.nrSectors);
}
