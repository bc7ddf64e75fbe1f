/**
 * linear: map a range onto a contiguous range of another device (dm-linear.c).
 * The model target: parse and check the arguments, open the device, remap in one line.
 */
import { deviceLookupError, parseSector } from "../core/args.js";
import type { Bio } from "../core/bio.js";
import type { BlockDevice } from "../core/devices/block-device.js";
import { target } from "../core/registry.js";
import { type DeviceLookup, Services } from "../core/services.js";
import { type DeviceAreaCallback, MapResult, type StatusType, Target, TargetError } from "../core/target.js";

@target({ name: "linear", version: [1, 5, 0], inject: [Services.DeviceLookup] })
export class LinearTarget extends Target {
  private device!: BlockDevice;
  private start = 0;

  constructor(private readonly devices: DeviceLookup) {
    super();
    this.zeroCopyReads = true; // reads are only remapped
  }

  async ctr(args: string[]): Promise<void> {
    if (args.length !== 2) throw new TargetError("Invalid argument count");
    const start = parseSector(args[1]!);
    if (start === null) throw new TargetError("Invalid device sector");
    this.start = start;
    try {
      this.device = await this.devices.get(args[0]!, this.table.readOnly ? "r" : "rw");
    } catch (err) {
      throw deviceLookupError("Device lookup failed", err);
    }
    this.numFlushBios = 1;
    this.numDiscardBios = 1;
    this.numWriteZeroesBios = 1;
  }

  map(bio: Bio): MapResult {
    bio.device = this.device;
    if (bio.sectors > 0) bio.sector = this.start + (bio.sector - this.begin);
    return MapResult.REMAPPED;
  }

  override status(type: StatusType): string {
    return type === "table" ? `${this.device.tableName} ${this.start}` : "";
  }

  override iterateDevices(fn: DeviceAreaCallback): boolean {
    return fn(this.device, this.start, this.len) === true;
  }
}
