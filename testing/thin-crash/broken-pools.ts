/**
 * Deliberately broken thin pools, to show that the thin crash runner fails when the pool breaks
 * its ordering rules (`runThinCrashHarness({ broken })`, `npm run crash -- --target thin --broken
 * NAME`). Each is the real thin-pool with one rule taken out:
 *
 * - `no-data-flush`: a commit does not flush the data device first (dm-thin.c:
 *   metadata_pre_commit_callback left out). A flush of a thin volume then makes its new mappings
 *   durable while the data they point to, and the zeroing of the new blocks, may still be lost.
 * - `no-metadata-flush`: the metadata device never sees a flush (dm_bm_flush_and_unlock's flush
 *   before the superblock left out), so the superblock can be on disk before the blocks it points to.
 */
import type { Bio } from "../../core/bio.js";
import { BioFlags } from "../../core/bio.js";
import type { Copier } from "../../core/copier.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { Logger } from "../../core/logger.js";
import { target } from "../../core/registry.js";
import { type Clock, type DeviceLookup, Services } from "../../core/services.js";
import type { TargetClass } from "../../core/target.js";
import { TargetFeatures } from "../../core/target.js";
import type { WorkQueues } from "../../core/work-queue.js";
import { THIN_VERSION, ThinPoolTarget } from "../../targets/thin/pool-target.js";

const POOL_FEATURES = TargetFeatures.SINGLETON | TargetFeatures.ALWAYS_WRITEABLE | TargetFeatures.IMMUTABLE;
const POOL_SERVICES = [Services.DeviceLookup, Services.WorkQueues, Services.Copier, Services.Logger, Services.Clock];

@target({ name: "thin-pool-nodf", version: THIN_VERSION, features: POOL_FEATURES, inject: POOL_SERVICES })
class NoDataFlushPool extends ThinPoolTarget {
  override async ctr(args: string[]): Promise<void> {
    await super.ctr(args);
    this.pool.pmd.preCommit = async () => {};
  }
}

@target({
  name: "thin-pool-nomf",
  version: THIN_VERSION,
  features: POOL_FEATURES,
  inject: POOL_SERVICES,
})
class NoMetadataFlushPool extends ThinPoolTarget {
  constructor(devices: DeviceLookup, queues: WorkQueues, copier: Copier, logger: Logger, clock: Clock) {
    super(metadataWithoutFlushes(devices), queues, copier, logger, clock);
  }
}

/** A lookup whose first device (pool_ctr opens the metadata device first) loses every flush. */
function metadataWithoutFlushes(devices: DeviceLookup): DeviceLookup {
  let opened = 0;
  const inner = new Map<BlockDevice, BlockDevice>();
  return {
    async get(path, mode) {
      const device = await devices.get(path, mode);
      if (opened++ > 0) return device;
      const wrapped = withSubmit(device, (bio, dev) => {
        if (bio.op === "flush") return bio.complete("ok");
        bio.flags &= ~BioFlags.PREFLUSH;
        dev.submit(bio);
      });
      inner.set(wrapped, device);
      return wrapped;
    },
    put(device) {
      return devices.put(inner.get(device) ?? device);
    },
  };
}

function withSubmit(inner: BlockDevice, submit: (bio: Bio, inner: BlockDevice) => void): BlockDevice {
  return new Proxy(inner, {
    get(t, prop, receiver) {
      if (prop === "submit") return (bio: Bio) => submit(bio, t);
      return Reflect.get(t, prop, receiver) as unknown;
    },
  });
}

/** The broken pools by name: the target type the workload's pool table names, and its class. */
export const BROKEN_POOLS: Readonly<Record<string, { type: string; target: TargetClass }>> = {
  "no-data-flush": { type: "thin-pool-nodf", target: NoDataFlushPool },
  "no-metadata-flush": { type: "thin-pool-nomf", target: NoMetadataFlushPool },
};
