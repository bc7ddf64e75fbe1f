/**
 * Backing devices for tests: tables name RAM disks (or controllable test devices) by a short name
 * instead of a path, e.g. `0 100 linear mem0 0`.
 */
import type { BlockDevice } from "../core/devices/block-device.js";
import type { BackingDevices } from "../core/devices/shared-devices.js";
import { MemoryDevice } from "../core/devices/memory-device.js";
import { DeviceWrapper } from "../core/devices/device-wrapper.js";
import { type CreateDeviceMapperOptions, createDeviceMapper } from "../index.js";
import type { DeviceMapper } from "../core/device-mapper.js";

export class NamedBacking implements BackingDevices {
  readonly devices = new Map<string, BlockDevice>();
  readonly opened: string[] = [];

  add<D extends BlockDevice>(name: string, device: D): D {
    this.devices.set(name, device);
    return device;
  }

  memory(name: string, sizeSectors: number): MemoryDevice {
    return this.add(name, new MemoryDevice(sizeSectors, { tableName: name, displayName: name }));
  }

  async identify(spec: string): Promise<string> {
    if (!this.devices.has(spec)) throw Object.assign(new Error(`${spec}: no such test device`), { code: "ENOENT" });
    return spec;
  }

  async open(spec: string): Promise<BlockDevice> {
    this.opened.push(spec);
    const dev = this.devices.get(spec);
    if (!dev) throw Object.assign(new Error(`${spec}: no such test device`), { code: "ENOENT" });
    return new KeepOpen(dev);
  }
}

/** Tests keep using a device after the tables that used it are gone: closing is a no-op. */
class KeepOpen extends DeviceWrapper {
  override async close(): Promise<void> {}
}

/** A device mapper whose tables name test devices; `options.targets` registers a plugin's targets. */
export function testMapper(options: Omit<CreateDeviceMapperOptions, "backing"> = {}): {
  dm: DeviceMapper;
  backing: NamedBacking;
} {
  const backing = new NamedBacking();
  return { dm: createDeviceMapper({ ...options, backing }), backing };
}

/** Deterministic bytes for a region, so any mix-up of offsets is visible. */
export function pattern(seed: number, bytes: number): Buffer {
  const buf = Buffer.alloc(bytes);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < bytes; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  return buf;
}
