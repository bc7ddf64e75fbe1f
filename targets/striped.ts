/**
 * striped: spread chunks round-robin over N devices (dm-stripe.c).
 */
import { deviceLookupError, parseSector, parseUnsigned, UINT_MAX } from "../core/args.js";
import { type Bio, BioFlags } from "../core/bio.js";
import type { BlockDevice } from "../core/devices/block-device.js";
import { target } from "../core/registry.js";
import { type DeviceLookup, Services } from "../core/services.js";
import {
  type DeviceAreaCallback,
  EndIoResult,
  MapResult,
  type StatusType,
  Target,
  TargetError,
} from "../core/target.js";

/** Errors on a stripe after which no more table events are raised for it. */
const DM_IO_ERROR_THRESHOLD = 15;

interface Stripe {
  device: BlockDevice;
  start: number;
  errors: number;
}

@target({ name: "striped", version: [1, 6, 0], inject: [Services.DeviceLookup] })
export class StripedTarget extends Target {
  private stripes: Stripe[] = [];
  private chunkSize = 0;

  constructor(private readonly devices: DeviceLookup) {
    super();
    this.zeroCopyReads = true; // reads are only remapped
  }

  async ctr(args: string[]): Promise<void> {
    if (args.length < 2) throw new TargetError("Not enough arguments");
    const count = parseUnsigned(args[0]!, UINT_MAX);
    if (!count) throw new TargetError("Invalid stripe count");
    const chunk = parseUnsigned(args[1]!, UINT_MAX);
    if (!chunk) throw new TargetError("Invalid chunk_size");
    if (this.len % count !== 0) throw new TargetError("Target length not divisible by number of stripes");
    if ((this.len / count) % chunk !== 0) throw new TargetError("Target length not divisible by chunk size");
    if (args.length !== 2 + 2 * count) throw new TargetError("Not enough destinations specified");
    this.chunkSize = chunk;
    for (let i = 0; i < count; i++) {
      const start = parseSector(args[3 + 2 * i]!);
      if (start === null) throw new TargetError("Couldn't parse stripe destination");
      let device: BlockDevice;
      try {
        device = await this.devices.get(args[2 + 2 * i]!, this.table.readOnly ? "r" : "rw");
      } catch (err) {
        // stripe_ctr returns get_stripe's error, i.e. dm_get_device's errno.
        throw deviceLookupError("Couldn't parse stripe destination", err);
      }
      this.stripes.push({ device, start, errors: 0 });
    }
    this.maxIoLen = chunk;
    this.numFlushBios = count;
    this.numDiscardBios = count;
    this.numWriteZeroesBios = count;
  }

  /** Which stripe holds target offset `offset`, and where on that stripe's device. */
  private locate(offset: number): { stripe: number; sector: number } {
    const chunk = Math.floor(offset / this.chunkSize);
    const within = offset - chunk * this.chunkSize;
    const n = this.stripes.length;
    const stripe = chunk % n;
    const row = Math.floor(chunk / n);
    return { stripe, sector: row * this.chunkSize + within };
  }

  /** Start of the part of stripe `stripe` at or after target offset `offset`, in stripe-local sectors. */
  private stripeBoundary(offset: number, stripe: number): number {
    const { stripe: s, sector } = this.locate(offset);
    if (s === stripe) return sector;
    const rowStart = sector - (sector % this.chunkSize);
    return s < stripe ? rowStart : rowStart + this.chunkSize;
  }

  map(bio: Bio): MapResult {
    if (bio.op === "flush") {
      bio.device = this.stripes[bio.targetBioNr]!.device;
      return MapResult.REMAPPED;
    }
    if (bio.op === "discard" || bio.op === "write-zeroes") {
      // Duplicate i carries the part of the range that lives on stripe i (may be empty).
      const i = bio.targetBioNr;
      const offset = bio.sector - this.begin;
      const begin = this.stripeBoundary(offset, i);
      const end = this.stripeBoundary(offset + bio.sectors, i);
      if (begin >= end) {
        bio.complete("ok");
        return MapResult.SUBMITTED;
      }
      const stripe = this.stripes[i]!;
      bio.device = stripe.device;
      bio.sector = stripe.start + begin;
      bio.sectors = end - begin;
      return MapResult.REMAPPED;
    }
    const { stripe, sector } = this.locate(bio.sector - this.begin);
    const s = this.stripes[stripe]!;
    bio.device = s.device;
    bio.sector = s.start + sector;
    return MapResult.REMAPPED;
  }

  /**
   * stripe_end_io: an error (other than on readahead or EOPNOTSUPP) counts against every stripe
   * on the device that failed (the kernel compares device names and does not stop at the first
   * match); while a stripe is under DM_IO_ERROR_THRESHOLD errors a table event is scheduled. The
   * kernel schedules one work item (trigger_event), so one completion raises at most one event.
   */
  override endIo(bio: Bio): EndIoResult {
    const status = bio.status;
    if (status === "ok" || status === "DM_REQUEUE") return EndIoResult.DONE;
    if (bio.flags & BioFlags.RAHEAD) return EndIoResult.DONE;
    if (status === "EOPNOTSUPP") return EndIoResult.DONE;
    const failed = bio.device;
    const name = (failed as Partial<BlockDevice> | null)?.tableName;
    let trigger = false;
    for (const stripe of this.stripes) {
      if (stripe.device !== failed && (name === undefined || stripe.device.tableName !== name)) continue;
      stripe.errors++;
      if (stripe.errors < DM_IO_ERROR_THRESHOLD) trigger = true;
    }
    if (trigger) this.table.event();
    return EndIoResult.DONE;
  }

  override status(type: StatusType): string {
    const n = this.stripes.length;
    if (type === "info") {
      const devs = this.stripes.map((s) => s.device.tableName).join(" ");
      return `${n} ${devs} 1 ${this.stripes.map((s) => (s.errors > 0 ? "D" : "A")).join("")}`;
    }
    return `${n} ${this.chunkSize} ${this.stripes.map((s) => `${s.device.tableName} ${s.start}`).join(" ")}`;
  }

  override iterateDevices(fn: DeviceAreaCallback): boolean {
    const perStripe = this.len / this.stripes.length;
    return this.stripes.some((s) => fn(s.device, s.start, perStripe) === true);
  }
}
