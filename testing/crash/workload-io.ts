/**
 * The workload's I/O to the mapped devices: stamped writes (some FUA), reads checked at once
 * against the model, flushes, and batches of them in flight together. Every write and flush goes
 * into the model's history with the clock stamps of its submission and acknowledgement.
 */
import { Bio, BioFlags, SECTOR_SIZE } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import type { CrashClock } from "./devices.js";
import { type TopFlush, type TopWrite, decodeSector, describeValue, writeData } from "./model.js";
import type { RunStats } from "./report.js";
import type { Rng } from "../rng.js";
import type { StackModel } from "./stack-model.js";

/** Sector ranges [start, end) in flight, per device: concurrent I/O of one device never overlaps. */
export type BusyRanges = Map<string, [number, number][]>;

export class WorkloadIo {
  private nextWriteId = 1;

  constructor(
    private readonly rng: Rng,
    private readonly clock: CrashClock,
    private readonly dm: DeviceMapper,
    private readonly model: StackModel,
    private readonly stats: RunStats,
    private readonly problem: (text: string) => void,
  ) {}

  write(device: string, sector: number, sectors: number, fua: boolean): Promise<void> {
    const history = this.model.historyOf(device);
    const id = this.nextWriteId++;
    const write: TopWrite = {
      id,
      device,
      sector,
      sectors,
      fua,
      submit: 0,
      ack: Infinity,
      failed: false,
      durableAt: Infinity,
    };
    history.addWrite(write);
    this.stats.writes++;
    const data = writeData(id, sector, sectors);
    return new Promise<void>((resolve) => {
      const bio = new Bio("write", sector, sectors, data, fua ? BioFlags.FUA : 0, {
        bioDone: (done) => {
          write.ack = this.clock.tick();
          if (done.status !== "ok") {
            write.failed = true;
            this.problem(`write #${id} to ${device} sectors ${sector}+${sectors} failed: ${done.status}`);
          } else {
            history.acked(write);
          }
          resolve();
        },
      });
      write.submit = this.clock.tick();
      bio.submitTo(this.dm.device(device));
    });
  }

  /** Read and check every sector against what the model says `device` holds now. */
  read(device: string, sector: number, sectors: number): Promise<void> {
    return this.readExpecting(device, sector, sectors, (at) => this.model.expectedNow(device, at));
  }

  readExpecting(device: string, sector: number, sectors: number, expected: (sector: number) => number): Promise<void> {
    this.stats.reads++;
    const buffer = Buffer.alloc(sectors * SECTOR_SIZE);
    return new Promise<void>((resolve) => {
      const bio = new Bio("read", sector, sectors, buffer, 0, {
        bioDone: (done) => {
          if (done.status !== "ok") {
            this.problem(`read of ${device} sectors ${sector}+${sectors} failed: ${done.status}`);
          } else {
            let wrong = 0;
            for (let i = 0; i < sectors; i++) {
              const got = decodeSector(buffer, i * SECTOR_SIZE, sector + i);
              const want = expected(sector + i);
              if (got !== want && wrong++ < 2) {
                this.problem(
                  `live read of ${device} sector ${sector + i}: ${describeValue(got)}, expected ${describeValue(want)}`,
                );
              }
            }
          }
          resolve();
        },
      });
      bio.submitTo(this.dm.device(device));
    });
  }

  flush(device: string): Promise<void> {
    const history = this.model.historyOf(device);
    const flush: TopFlush = { device, submit: 0, ack: Infinity, failed: false };
    history.flushes.push(flush);
    this.stats.flushes++;
    return new Promise<void>((resolve) => {
      const bio = new Bio("flush", 0, 0, null, BioFlags.PREFLUSH, {
        bioDone: (done) => {
          flush.ack = this.clock.tick();
          if (done.status !== "ok") {
            flush.failed = true;
            this.problem(`flush of ${device} failed: ${done.status}`);
          }
          resolve();
        },
      });
      flush.submit = this.clock.tick();
      bio.submitTo(this.dm.device(device));
    });
  }

  /** Start `count` concurrent I/Os (no two of one device overlapping); returns their description and completion. */
  start(count: number, busy: BusyRanges = new Map()): { desc: string[]; done: Promise<void>[] } {
    const live = this.model.liveSnapshots();
    const desc: string[] = [];
    const done: Promise<void>[] = [];
    for (let k = 0; k < count; k++) {
      const what = this.rng.weighted<string>([
        ["origin-write", 40],
        ["snap-write", live.length ? 20 : 0],
        ["snap-read", live.length ? 15 : 0],
        ["origin-read", 8],
        ["flush", 12],
      ]);
      const device = what.startsWith("origin") || live.length === 0 ? "origin" : this.rng.pick(live).name;
      if (what === "flush") {
        const flushed = this.rng.chance(0.5) ? "origin" : device;
        desc.push(`flush ${flushed}`);
        done.push(this.flush(flushed));
        continue;
      }
      const isWrite = what.endsWith("write");
      const range = this.pickRange(device, busy, isWrite ? 24 : 32);
      if (!range) continue;
      const [sector, sectors] = range;
      if (isWrite) {
        const fua = this.rng.chance(0.25);
        desc.push(`write ${device} ${sector}+${sectors}${fua ? " FUA" : ""}`);
        done.push(this.write(device, sector, sectors, fua));
      } else {
        desc.push(`read ${device} ${sector}+${sectors}`);
        done.push(this.read(device, sector, sectors));
      }
    }
    return { desc, done };
  }

  /** `count` concurrent I/Os, waited for; returns their description. */
  async batch(count: number): Promise<string> {
    const { desc, done } = this.start(count);
    await Promise.all(done);
    return desc.join(", ");
  }

  /** A range on `device` that overlaps nothing in `busy` (same device), or null. */
  private pickRange(device: string, busy: BusyRanges, maxLength: number): [number, number] | null {
    const live = this.model.liveSnapshots();
    const originSectors = this.model.originSectors;
    for (let attempt = 0; attempt < 6; attempt++) {
      let start: number;
      let length: number;
      const snapshot = live.length > 0 ? this.rng.pick(live) : null;
      if (snapshot && this.rng.chance(0.25)) {
        // Whole chunks of some snapshot (a snapshot write of a whole chunk skips the copy).
        const chunkSize = snapshot.chunkSize;
        const chunks = this.rng.range(1, 2);
        start = this.rng.int(Math.floor(originSectors / chunkSize) - chunks + 1) * chunkSize;
        length = chunks * chunkSize;
      } else {
        length = Math.min(maxLength, this.rng.pick([1, 1, 2, 3, 4, 5, 7, 8, 8, 12, 16, 24]));
        // Half of the I/O goes to a hot quarter, so chunks are hit again and again.
        const span = this.rng.chance(0.5) ? Math.floor(originSectors / 4) : originSectors;
        start = this.rng.int(span - length + 1);
      }
      const ranges = busy.get(device) ?? [];
      if (ranges.some(([from, to]) => start < to && from < start + length)) continue;
      ranges.push([start, start + length]);
      busy.set(device, ranges);
      return [start, length];
    }
    return null;
  }
}
