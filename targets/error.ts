/**
 * error: every read and write fails with EIO (dm-target.c: io_err_map). It is the wildcard
 * target: `remove --force` and `wipe_table` swap it in for any table, even an immutable one.
 */
import { deviceLookupError, parseSector } from "../core/args.js";
import type { Bio } from "../core/bio.js";
import type { BlockDevice } from "../core/devices/block-device.js";
import { target } from "../core/registry.js";
import { type DeviceLookup, Services } from "../core/services.js";
import { type DeviceAreaCallback, MapResult, Target, TargetError, TargetFeatures } from "../core/target.js";

@target({ name: "error", version: [1, 7, 0], features: TargetFeatures.WILDCARD, inject: [Services.DeviceLookup] })
export class ErrorTarget extends Target {
  private device: BlockDevice | undefined;
  private start = 0;

  constructor(private readonly devices: DeviceLookup) {
    super();
  }

  async ctr(args: string[]): Promise<void> {
    // Current kernels accept an optional `<dev> <offset>` (to inherit limits from a device) and
    // silently ignore any other argument count.
    if (args.length === 2) {
      const start = parseSector(args[1]!);
      if (start === null) throw new TargetError("Invalid device sector");
      this.start = start;
      try {
        // dm_get_device(..., dm_table_get_mode(ti->table)): the table's mode, like linear.
        this.device = await this.devices.get(args[0]!, this.table.readOnly ? "r" : "rw");
      } catch (err) {
        throw deviceLookupError("Device lookup failed", err);
      }
    }
    // Discards fail with EIO rather than "not supported"; flushes never reach it and succeed.
    this.numDiscardBios = 1;
  }

  map(_bio: Bio): MapResult {
    return MapResult.KILL;
  }

  /** io_err_iterate_devices: the given device's area `(dev, offset, ti->len)`, as linear. */
  override iterateDevices(fn: DeviceAreaCallback): boolean {
    return this.device ? fn(this.device, this.start, this.len) === true : false;
  }
}
