/**
 * Test doubles for watching what a mapped device does to its backing devices:
 *
 * - `RecordingDevice` wraps a device, records every bio it receives (optionally into a log shared
 *   by several devices, so the global order is visible) and can fail chosen bios.
 * - `TrackingBacking` is a `NamedBacking` that counts the handles the core opens and closes, so a
 *   test can assert that a rejected table left nothing open.
 */
import { expect } from "vitest";
import { type Bio, type BioOp, type BioStatus, readBio, submitAndWait } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { createDeviceMapper } from "../../index.js";
import { DeviceWrapper } from "../../core/devices/device-wrapper.js";
import { NamedBacking } from "../../testing/memory-backing.js";

export { DeviceWrapper };

/** One bio as a backing device received it. */
export interface IoRecord {
  device: string;
  op: BioOp;
  sector: number;
  sectors: number;
  flags: number;
}

export class RecordingDevice extends DeviceWrapper {
  /** Return a status to fail the bio with it instead of passing it on. */
  failWhen: ((bio: Bio) => BioStatus | undefined) | null = null;

  constructor(
    inner: BlockDevice,
    readonly log: IoRecord[] = [],
  ) {
    super(inner);
  }

  /** What this device received, in order. */
  get received(): IoRecord[] {
    return this.log.filter((r) => r.device === this.tableName);
  }

  count(op: BioOp): number {
    return this.received.filter((r) => r.op === op).length;
  }

  clearLog(): void {
    this.log.length = 0;
  }

  override submit(bio: Bio): void {
    this.log.push({ device: this.tableName, op: bio.op, sector: bio.sector, sectors: bio.sectors, flags: bio.flags });
    const status = this.failWhen?.(bio);
    if (status) bio.complete(status);
    else this.inner.submit(bio);
  }
}

/** NamedBacking that counts every handle handed to the core and every close of one. */
export class TrackingBacking extends NamedBacking {
  opens = 0;
  closes = 0;

  /** Handles the core currently holds open. */
  get openHandles(): number {
    return this.opens - this.closes;
  }

  /** A RAM disk wrapped in a RecordingDevice, registered under `name`. */
  recorded(
    name: string,
    sizeSectors: number,
    opts: { log?: IoRecord[]; logicalBlockSize?: number } = {},
  ): RecordingDevice {
    const mem = new MemoryDevice(sizeSectors, {
      tableName: name,
      displayName: name,
      logicalBlockSize: opts.logicalBlockSize,
    });
    return this.add(name, new RecordingDevice(mem, opts.log));
  }

  override async open(spec: string): Promise<BlockDevice> {
    const handle = await super.open(spec);
    this.opens++;
    const countClose = () => this.closes++;
    return new (class extends DeviceWrapper {
      override async close(): Promise<void> {
        countClose();
        await super.close();
      }
    })(handle);
  }
}

export function trackingMapper(): { dm: DeviceMapper; backing: TrackingBacking } {
  const backing = new TrackingBacking();
  return { dm: createDeviceMapper({ backing }), backing };
}

/** The rejection of `p`, which must reject (with a DmError or BioError). */
export async function rejection(p: Promise<unknown>): Promise<{ message: string; errno?: string; status?: string }> {
  return p.then(
    () => {
      throw new Error("expected the operation to fail, but it succeeded");
    },
    (err: { message: string; errno?: string; status?: string }) => err,
  );
}

/** A table line's ctr must fail with exactly this message (and errno), leaving nothing created or open. */
export async function expectCtrError(
  dm: DeviceMapper,
  backing: TrackingBacking,
  line: string,
  message: string,
  errno = "EINVAL",
): Promise<void> {
  const err = await rejection(dm.create("dev", { table: line }));
  expect({ message: err.message, errno: err.errno }).toEqual({ message, errno });
  expect(dm.list()).toEqual([]);
  expect(backing.openHandles).toBe(0);
}

/** Read `sectors` at `sector` straight from a backing device (not through the mapped device). */
export async function readDevice(dev: BlockDevice, sector: number, sectors: number): Promise<Buffer> {
  const buf = Buffer.alloc(sectors * 512);
  await submitAndWait(dev, readBio(sector, buf));
  return buf;
}
