/**
 * udm as a library: `createDeviceMapper()` gives a DeviceMapper with the built-in targets and the
 * core services (work queues, copier) registered. Everything a plugin author needs is re-exported.
 */
import "./core/node-version.js";
import "reflect-metadata";
import { Copier } from "./core/copier.js";
import { DeviceMapper, type DeviceMapperOptions } from "./core/device-mapper.js";
import { Services } from "./core/services.js";
import { WorkQueues } from "./core/work-queue.js";
import { builtinTargets } from "./targets/index.js";
import { defaultSnapshotParams, type SnapshotParams, SnapshotParamsToken } from "./targets/snapshot/params.js";

export interface CreateDeviceMapperOptions extends DeviceMapperOptions {
  /** The snapshot targets' module parameters (default: the kernel's). */
  snapshot?: Partial<SnapshotParams>;
}

export function createDeviceMapper(opts: CreateDeviceMapperOptions = {}): DeviceMapper {
  const snapshotParams: SnapshotParams = { ...defaultSnapshotParams, ...opts.snapshot };
  return new DeviceMapper({
    ...opts,
    targets: [...builtinTargets, ...(opts.targets ?? [])],
    services: (container) => {
      const logger = opts.logger;
      container.register(Services.WorkQueues, { useValue: new WorkQueues({ logger }) });
      container.register(Services.Copier, { useValue: new Copier({ logger }) });
      container.register(SnapshotParamsToken, { useValue: snapshotParams });
      opts.services?.(container);
    },
  });
}

export * from "./core/args.js";
export * from "./core/bio.js";
export * from "./core/copier.js";
export * from "./core/devices/shared-devices.js";
export * from "./core/device-mapper.js";
export * from "./core/file-ranges.js";
export * from "./core/devices/block-device.js";
export * from "./core/devices/file-device.js";
export * from "./core/devices/memory-device.js";
export * from "./core/dm-io.js";
export * from "./core/errors.js";
export * from "./core/logger.js";
export * from "./core/mapped-device.js";
export * from "./core/registry.js";
export * from "./core/services.js";
export * from "./core/table-text.js";
export * from "./core/target.js";
export * from "./core/work-queue.js";
export { builtinTargets } from "./targets/index.js";
export type { SnapshotParams } from "./targets/snapshot/params.js";
export * from "./core/devices/device-wrapper.js";
// A plugin imports only "udm": tsyringe's `inject`, evaluated after udm has loaded reflect-metadata
// (importing tsyringe before it throws "tsyringe requires a reflect polyfill").
export { inject } from "tsyringe";
export type { InjectionToken } from "tsyringe";
