/**
 * error: every read and write fails with EIO (dm-target.c io_err, §7.4). It is the wildcard
 * target: `remove --force` and `wipe_table` swap it in for any table, even an immutable one.
 */
import { parseSector } from "../core/args.js";
import type { Bio } from "../core/bio.js";
import type { BlockDevice } from "../core/devices/block-device.js";
import { target } from "../core/registry.js";
import { type DeviceLookup, Services } from "../core/services.js";
import { MapResult, Target, TargetError, TargetFeatures } from "../core/target.js";

@target({ name: "error", version: [1, 7, 0], features: TargetFeatures.WILDCARD, inject: [Services.DeviceLookup] })
export class ErrorTarget extends Target {
  private device: BlockDevice | undefined;

  constructor(private readonly devices: DeviceLookup) {
    super();
  }

  async ctr(args: string[]): Promise<void> {
    // Current kernels accept an optional `<dev> <offset>` (to inherit limits from a device) and
    // silently ignore any other argument count.
    if (args.length === 2) {
      if (parseSector(args[1]!) === null) throw new TargetError("Invalid device sector");
      try {
        this.device = await this.devices.get(args[0]!, "r");
      } catch {
        throw new TargetError("Device lookup failed");
      }
    }
    // Discards fail with EIO rather than "not supported"; flushes never reach it and succeed.
    this.numDiscardBios = 1;
  }

  map(_bio: Bio): MapResult {
    return MapResult.KILL;
  }
}
