/**
 * Devices of the crash-consistency runner:
 *
 * - `CrashClock`: one counter shared by every event the runner cares about (I/O submitted to and
 *   acknowledged by the mapped devices, completions on the data devices, marks). JavaScript runs
 *   one thing at a time and every completion below is delivered synchronously up the stack, so
 *   the order of the stamps is the order in which things happened.
 * - `RecordingDevice`: sits under a log-writes target (its `<dev>`) and stamps every completed
 *   write, FUA write and flush. log-writes logs an entry when (and in the order in which) those
 *   complete, so the stamps tell when each log entry became durable.
 * - `OverlayDevice`: a throw-away RAM disk over a base RAM disk, for one crash point: reads see
 *   the base with the overlay's sectors on top, writes only touch the overlay.
 * - `NamedDevices`: the `BackingDevices` of the runner's device mappers (tables name RAM disks by
 *   short names, as the test backing does).
 */
import { Bio, type BioEndIo, SECTOR_SIZE } from "../../core/bio.js";
import type { BlockDevice, OpenMode } from "../../core/devices/block-device.js";
import { DeviceWrapper } from "../../core/devices/device-wrapper.js";
import type { BackingDevices } from "../../core/devices/shared-devices.js";

export class CrashClock {
  now = 0;
  tick(): number {
    return ++this.now;
  }
}

/** What log-writes turns a completed bio into: a FLUSH entry, a FUA entry or a plain write/discard entry. */
export type CompletionKind = "flush" | "fua" | "plain";

export interface Completion {
  kind: CompletionKind;
  /** Clock stamp of the submission (for log-writes: when it mapped the bio). */
  submitted: number;
  /** Clock stamp of the completion. */
  at: number;
  sector: number;
  sectors: number;
  ok: boolean;
}

/** Delays some bios by a few turns of the event loop, so that I/O completes out of order. */
export interface Jitter {
  /** Probability that a bio is delayed. */
  probability: number;
  /** A random number generator: (n) => integer in [0, n). */
  int(n: number): number;
  chance(p: number): boolean;
}

/**
 * Forwards to `inner` and records every completed non-read bio with a clock stamp. With `jitter`,
 * some bios (reads too) reach `inner` only after 1-4 turns of the event loop: a RAM disk then
 * behaves like a device that completes I/O out of order, and the data lands when the bio
 * completes, so the device's content always follows completion order.
 */
export class RecordingDevice extends DeviceWrapper {
  readonly completions: Completion[] = [];

  constructor(
    inner: BlockDevice,
    private readonly clock: CrashClock,
    private readonly jitter: Jitter | null = null,
  ) {
    super(inner);
  }

  override submit(bio: Bio): void {
    const submitted = bio.op === "read" ? 0 : this.clock.tick();
    const jitter = this.jitter;
    if (jitter && jitter.chance(jitter.probability)) {
      let turns = 1 + jitter.int(4);
      const later = () => (--turns > 0 ? setImmediate(later) : this.forward(bio, submitted));
      setImmediate(later);
      return;
    }
    this.forward(bio, submitted);
  }

  private forward(bio: Bio, submitted: number): void {
    if (bio.op === "read") {
      this.inner.submit(bio);
      return;
    }
    const upper = bio.endIo;
    const record = (done: Bio) => {
      const kind: CompletionKind = done.op === "flush" ? "flush" : done.isFua ? "fua" : "plain";
      const { sector, sectors } = done;
      this.completions.push({ kind, submitted, at: this.clock.tick(), sector, sectors, ok: done.status === "ok" });
    };
    const hook: BioEndIo = {
      bioDone(done) {
        done.endIo = upper;
        record(done);
        upper?.bioDone(done);
      },
    };
    bio.endIo = hook;
    this.inner.submit(bio);
  }

  /** The runner owns the RAM disks underneath: closing the recorder leaves them as they are. */
  override async close(): Promise<void> {}
}

/**
 * A RAM disk made of `base` (read through synchronously: a MemoryDevice) and a sector map on top.
 * Completes every bio synchronously, like a RAM disk.
 */
export class OverlayDevice implements BlockDevice {
  readonly logicalBlockSize = SECTOR_SIZE;
  readonly readOnly = false;
  readonly supportsDiscard = true;
  readonly supportsWriteZeroes = true;
  private readonly sectors = new Map<number, Buffer>();

  constructor(
    private readonly base: BlockDevice,
    readonly tableName: string,
  ) {}

  get displayName(): string {
    return this.tableName;
  }

  get sizeSectors(): number {
    return this.base.sizeSectors;
  }

  /** Sectors written since the overlay was made. */
  get written(): number {
    return this.sectors.size;
  }

  submit(bio: Bio): void {
    if (bio.op === "flush") return bio.complete("ok");
    if (bio.sector < 0 || bio.sector + bio.sectors > this.sizeSectors) return bio.complete("EIO");
    switch (bio.op) {
      case "read": {
        const inner = new Bio("read", bio.sector, bio.sectors, bio.data, 0, null);
        inner.submitTo(this.base); // a MemoryDevice: completes before submit returns
        if (inner.status !== "ok") return bio.complete(inner.status);
        for (let i = 0; i < bio.sectors; i++) {
          const s = this.sectors.get(bio.sector + i);
          if (s) s.copy(bio.data, i * SECTOR_SIZE);
        }
        return bio.complete("ok");
      }
      case "write":
        for (let i = 0; i < bio.sectors; i++) {
          this.sectors.set(bio.sector + i, Buffer.from(bio.data.subarray(i * SECTOR_SIZE, (i + 1) * SECTOR_SIZE)));
        }
        return bio.complete("ok");
      case "discard":
      case "write-zeroes":
        for (let i = 0; i < bio.sectors; i++) this.sectors.set(bio.sector + i, Buffer.alloc(SECTOR_SIZE));
        return bio.complete("ok");
    }
  }

  async close(): Promise<void> {}
}

/** Tables name devices by short names; closing is left to the runner (the devices outlive tables). */
export class NamedDevices implements BackingDevices {
  private readonly devices = new Map<string, BlockDevice>();

  add<D extends BlockDevice>(name: string, device: D): D {
    this.devices.set(name, device);
    return device;
  }

  delete(name: string): void {
    this.devices.delete(name);
  }

  get(name: string): BlockDevice | undefined {
    return this.devices.get(name);
  }

  async identify(spec: string): Promise<string> {
    if (!this.devices.has(spec)) throw noSuchDevice(spec);
    return spec;
  }

  async open(spec: string, _opts: { mode: OpenMode }): Promise<BlockDevice> {
    const dev = this.devices.get(spec);
    if (!dev) throw noSuchDevice(spec);
    return new KeepOpen(dev);
  }
}

function noSuchDevice(spec: string): Error {
  return Object.assign(new Error(`${spec}: no such crash-runner device`), { code: "ENOENT" });
}

/** A table's handle on a runner device: closing it leaves the device to the runner. */
class KeepOpen extends DeviceWrapper {
  override async close(): Promise<void> {}
}
