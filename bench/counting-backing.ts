/**
 * Backing devices for the in-process benchmarks that count what a target sends to its metadata
 * device (bench/snapshot.ts: the COW's commits; bench/thin.ts: the pool's flushes and FUA writes),
 * and sparse files to put them on.
 */
import fs from "node:fs";
import path from "node:path";
import { type Bio, BioFlags } from "../core/bio.js";
import type { BlockDevice, OpenOptions } from "../core/devices/block-device.js";
import { DeviceWrapper } from "../core/devices/device-wrapper.js";
import { type BackingDevices, systemBackingDevices } from "../core/devices/shared-devices.js";

const META = BioFlags.PREFLUSH | BioFlags.FUA;

/** Counts the bios it passes on: flushes (or PREFLUSH), FUA writes, and PREFLUSH|FUA writes. */
export class CountingDevice extends DeviceWrapper {
  flushes = 0;
  fuaWrites = 0;
  /** Writes with PREFLUSH and FUA both: a snapshot store's commit. */
  metaWrites = 0;

  override submit(bio: Bio): void {
    if (bio.op === "flush" || (bio.flags & BioFlags.PREFLUSH) !== 0) this.flushes++;
    if (bio.op === "write" && (bio.flags & BioFlags.FUA) !== 0) this.fuaWrites++;
    if (bio.op === "write" && (bio.flags & META) === META) this.metaWrites++;
    this.inner.submit(bio);
  }
}

/** Files from the file system; those whose name starts with `prefix` are wrapped in a CountingDevice. */
export class CountingBacking implements BackingDevices {
  readonly counted: CountingDevice[] = [];

  constructor(private readonly prefix: string) {}

  identify(spec: string): Promise<string> {
    return systemBackingDevices.identify(spec);
  }

  async open(spec: string, opts: OpenOptions): Promise<BlockDevice> {
    const dev = await systemBackingDevices.open(spec, opts);
    if (!path.basename(spec).startsWith(this.prefix)) return dev;
    const counting = new CountingDevice(dev);
    this.counted.push(counting);
    return counting;
  }
}

/** A sparse file of `bytes` bytes, replacing whatever was there. */
export function sparseFile(file: string, bytes: number): void {
  fs.rmSync(file, { force: true });
  fs.writeFileSync(file, "");
  fs.truncateSync(file, bytes);
}
