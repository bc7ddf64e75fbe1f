/**
 * The exports attach's own NBD clients (nbdfuse, the kernel's nbd driver) connect to, on a socket
 * of their own: the same devices, but such a connection is not an open of the device. It is the
 * plumbing of the kernel block device that stands for the device; the users of that kernel device
 * are the openers (kernel-openers.ts counts them), as the users of /dev/dm-N are a dm device's.
 * Otherwise an attached device nobody uses would show nbdfuse's connections as its open count and
 * refuse `remove` (the kernel says 0).
 */
import type { Bio } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import type { MappedDevice } from "../../core/mapped-device.js";
import type { ExportDevice, ExportProvider } from "../../nbd/exports.js";

export function attachExports(dm: Pick<DeviceMapper, "list" | "has" | "device">): ExportProvider {
  return {
    list: () => dm.list(),
    get: (name) => (name !== "" && dm.has(name) ? new UncountedExport(dm.device(name)) : undefined),
  };
}

/** A mapped device as an export whose connections do not open it. */
class UncountedExport implements ExportDevice {
  constructor(private readonly md: MappedDevice) {}

  get sizeSectors(): number {
    return this.md.sizeSectors;
  }
  get readOnly(): boolean {
    return this.md.readOnly;
  }
  get supportsDiscard(): boolean {
    return this.md.supportsDiscard;
  }
  get supportsWriteZeroes(): boolean {
    return this.md.supportsWriteZeroes;
  }
  submit(bio: Bio): void {
    this.md.submit(bio);
  }
  open(): void {}
  close(): void {}
}
