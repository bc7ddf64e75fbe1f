/**
 * The thin workload's I/O to its volumes: stamped writes (a quarter FUA, some whole blocks, which
 * take the pool's overwrite path), discards (mostly whole blocks, some with partial ends), reads
 * checked at once against the model, flushes, and batches of them in flight together. Every
 * write, discard and flush goes into the volume's history with the clock stamps of its submission
 * and acknowledgement.
 */
import { Bio, BioFlags, SECTOR_SIZE } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import type { CrashClock } from "../crash/devices.js";
import { type TopFlush, type TopWrite, decodeSector, writeData } from "../crash/model.js";
import type { Rng } from "../rng.js";
import type { ThinPoolModel, ThinVolume } from "./model.js";
import type { ThinRunStats } from "./report.js";

/** Sector ranges [start, end) in flight, per volume: concurrent I/O of one volume never overlaps. */
export type BusyRanges = Map<string, [number, number][]>;

export class ThinIo {
  private nextId = 1;

  constructor(
    private readonly rng: Rng,
    private readonly clock: CrashClock,
    private readonly dm: DeviceMapper,
    private readonly model: ThinPoolModel,
    private readonly stats: ThinRunStats,
    private readonly problem: (text: string) => void,
  ) {}

  write(volume: ThinVolume, sector: number, sectors: number, fua: boolean): Promise<void> {
    const mayProvision = this.model.skipZeroing && this.touchesUnprovisioned(volume, sector, sectors);
    const fills = this.unzeroedFills(volume, sector, sectors, fua);
    const write = this.record(volume, sector, sectors, fua);
    if (mayProvision) this.model.mayProvisionIds.add(write.id);
    this.stats.writes++;
    const data = writeData(write.id, sector, sectors);
    return this.submit(volume, write, "write", data, fua ? BioFlags.FUA : 0, `write #${write.id}`, fills);
  }

  private touchesUnprovisioned(volume: ThinVolume, sector: number, sectors: number): boolean {
    const bs = this.model.blockSize;
    for (let block = Math.floor(sector / bs); block * bs < sector + sectors; block++) {
      if (this.model.mayBeUnprovisioned(volume, block)) return true;
    }
    return false;
  }

  /**
   * With skip_block_zeroing, a write that covers part of a block that may have no data block yet
   * leaves the rest of the block as the data device had it: in the model, a fill of "anything"
   * over the block, submitted and acknowledged with the write.
   */
  private unzeroedFills(volume: ThinVolume, sector: number, sectors: number, fua: boolean): TopWrite[] {
    if (!this.model.skipZeroing) return [];
    const bs = this.model.blockSize;
    const fills: TopWrite[] = [];
    for (let block = Math.floor(sector / bs); block * bs < sector + sectors; block++) {
      const from = block * bs;
      const to = from + bs;
      if ((sector <= from && sector + sectors >= to) || !this.model.mayBeUnprovisioned(volume, block)) continue;
      // The whole block, the write's own sectors too, ordered before the write: its mapping may
      // be committed before the write's data is on disk, and then a crash shows whatever was
      // there until the write is durable.
      const fill = this.record(volume, from, bs, fua);
      fill.unzeroedFill = true;
      this.model.unzeroedIds.add(fill.id);
      fills.push(fill);
    }
    return fills;
  }

  /** A discard of `sector`+`sectors`: in the model, a write of zeros over the whole blocks it covers. */
  discard(volume: ThinVolume, sector: number, sectors: number): Promise<void> {
    const bs = this.model.blockSize;
    const begin = Math.ceil(sector / bs);
    const end = Math.floor((sector + sectors) / bs);
    const write = begin < end ? this.record(volume, begin * bs, (end - begin) * bs, false) : null;
    if (write) this.model.discardIds.add(write.id);
    this.stats.discards++;
    return new Promise<void>((resolve) => {
      const bio = new Bio("discard", sector, sectors, null, 0, {
        bioDone: (done) => {
          const ack = this.clock.tick();
          if (write) write.ack = ack;
          if (done.status !== "ok") {
            if (write) write.failed = true;
            this.problem(`discard of ${volume.name} sectors ${sector}+${sectors} failed: ${done.status}`);
          } else if (write) {
            volume.history.acked(write);
          }
          resolve();
        },
      });
      const submitted = this.clock.tick();
      if (write) write.submit = submitted;
      bio.submitTo(this.dm.device(volume.name));
    });
  }

  private record(volume: ThinVolume, sector: number, sectors: number, fua: boolean): TopWrite {
    const write: TopWrite = {
      id: this.nextId++,
      device: volume.name,
      sector,
      sectors,
      fua,
      submit: 0,
      ack: Infinity,
      failed: false,
      durableAt: Infinity,
    };
    volume.history.addWrite(write);
    return write;
  }

  private submit(
    volume: ThinVolume,
    write: TopWrite,
    op: "write",
    data: Buffer,
    flags: number,
    what: string,
    alongside: TopWrite[] = [],
  ): Promise<void> {
    return new Promise<void>((resolve) => {
      const bio = new Bio(op, write.sector, write.sectors, data, flags, {
        bioDone: (done) => {
          write.ack = this.clock.tick();
          if (done.status !== "ok") {
            write.failed = true;
            this.problem(`${what} to ${volume.name} sectors ${write.sector}+${write.sectors} failed: ${done.status}`);
          }
          for (const w of [...alongside, write]) {
            w.ack = write.ack;
            w.failed = write.failed;
            if (!w.failed) volume.history.acked(w);
          }
          resolve();
        },
      });
      write.submit = this.clock.tick();
      for (const w of alongside) w.submit = write.submit;
      bio.submitTo(this.dm.device(volume.name));
    });
  }

  /** Read and check every sector against what the model says the volume holds now. */
  read(volume: ThinVolume, sector: number, sectors: number): Promise<void> {
    this.stats.reads++;
    const buffer = Buffer.alloc(sectors * SECTOR_SIZE);
    return new Promise<void>((resolve) => {
      const bio = new Bio("read", sector, sectors, buffer, 0, {
        bioDone: (done) => {
          if (done.status !== "ok") {
            this.problem(`read of ${volume.name} sectors ${sector}+${sectors} failed: ${done.status}`);
          } else {
            let wrong = 0;
            for (let i = 0; i < sectors; i++) {
              const got = decodeSector(buffer, i * SECTOR_SIZE, sector + i);
              const want = this.model.expectedNow(volume, sector + i);
              // A read waiting in a block's cell while a write provisions it unzeroed sees that block.
              const unzeroed = this.model.skipZeroing && this.model.unzeroedInFlight(volume, sector + i);
              if (!unzeroed && !this.model.matches(got, want) && wrong++ < 2) {
                this.problem(
                  `live read of ${volume.name} sector ${sector + i}: ${this.model.describe(got)}, ` +
                    `expected ${this.model.describe(want)}`,
                );
              }
            }
          }
          resolve();
        },
      });
      bio.submitTo(this.dm.device(volume.name));
    });
  }

  flush(volume: ThinVolume): Promise<void> {
    const flush: TopFlush = { device: volume.name, submit: 0, ack: Infinity, failed: false };
    volume.history.flushes.push(flush);
    this.stats.flushes++;
    return new Promise<void>((resolve) => {
      const bio = new Bio("flush", 0, 0, null, BioFlags.PREFLUSH, {
        bioDone: (done) => {
          flush.ack = this.clock.tick();
          if (done.status !== "ok") {
            flush.failed = true;
            this.problem(`flush of ${volume.name} failed: ${done.status}`);
          }
          resolve();
        },
      });
      flush.submit = this.clock.tick();
      bio.submitTo(this.dm.device(volume.name));
    });
  }

  /** Start `count` concurrent I/Os on `volumes` (no two of one volume overlapping); their description and completion. */
  start(volumes: ThinVolume[], count: number, busy: BusyRanges = new Map()): { desc: string[]; done: Promise<void>[] } {
    const desc: string[] = [];
    const done: Promise<void>[] = [];
    if (volumes.length === 0) return { desc, done };
    for (let k = 0; k < count; k++) {
      const volume = this.rng.pick(volumes);
      const what = this.rng.weighted<string>([
        ["write", 45],
        ["read", 20],
        ["discard", 8],
        ["flush", 10],
      ]);
      if (what === "flush") {
        desc.push(`flush ${volume.name}`);
        done.push(this.flush(volume));
        continue;
      }
      const range = this.pickRange(volume, busy, what);
      if (!range) continue;
      const [sector, sectors] = range;
      if (what === "write") {
        const fua = this.rng.chance(0.25);
        desc.push(`write ${volume.name} ${sector}+${sectors}${fua ? " FUA" : ""}`);
        done.push(this.write(volume, sector, sectors, fua));
      } else if (what === "discard") {
        desc.push(`discard ${volume.name} ${sector}+${sectors}`);
        done.push(this.discard(volume, sector, sectors));
      } else {
        desc.push(`read ${volume.name} ${sector}+${sectors}`);
        done.push(this.read(volume, sector, sectors));
      }
    }
    return { desc, done };
  }

  /** `count` concurrent I/Os, waited for; returns their description. */
  async batch(volumes: ThinVolume[], count: number): Promise<string> {
    const { desc, done } = this.start(volumes, count);
    await Promise.all(done);
    return desc.join(", ") || "no I/O";
  }

  /** A range of `volume` that overlaps nothing in flight on it, or null. */
  private pickRange(volume: ThinVolume, busy: BusyRanges, what: string): [number, number] | null {
    const sectors = this.model.volumeSectors;
    const bs = this.model.blockSize;
    const blocks = sectors / bs;
    for (let attempt = 0; attempt < 6; attempt++) {
      let start: number;
      let length: number;
      if (what === "discard" || (what === "write" && this.rng.chance(0.2))) {
        // Whole blocks: a write covering a block skips zeroing and copying; a discard unmaps.
        const count = Math.min(blocks, this.rng.range(1, what === "discard" ? 3 : 2));
        start = this.rng.int(blocks - count + 1) * bs;
        length = count * bs;
        if (what === "discard" && this.rng.chance(0.25)) {
          // Partial blocks at the ends: only the whole blocks inside are unmapped.
          const head = this.rng.int(bs);
          start += head;
          length -= head + this.rng.int(Math.max(1, length - head));
          length = Math.max(1, length);
        }
      } else {
        length = this.rng.pick([1, 1, 2, 3, 4, 5, 7, 8, 8, 12, 16, 24, 32]);
        // Half of the I/O goes to the first quarter, so blocks are hit again and again.
        const span = this.rng.chance(0.5) ? Math.floor(sectors / 4) : sectors;
        start = this.rng.int(span - length + 1);
      }
      const ranges = busy.get(volume.name) ?? [];
      if (ranges.some(([from, to]) => start < to && from < start + length)) continue;
      ranges.push([start, start + length]);
      busy.set(volume.name, ranges);
      return [start, length];
    }
    return null;
  }
}
