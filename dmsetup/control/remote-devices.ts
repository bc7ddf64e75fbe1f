/**
 * What `udmsetup info` says about the remote devices (NBD exports named by URI) a device's table
 * uses: each one's connection state as the NBD client keeps it (docs/nbd.md, "Connection state").
 * dmsetup's `status` line is the target's own and stays as it is; `deps` lists the URIs.
 */
import type { BlockDevice } from "../../core/devices/block-device.js";
import { NbdDevice, type NbdConnectionState } from "../../core/devices/nbd/index.js";

/** One remote device: its URI as the table gave it, and its connection state. */
export interface RemoteDeviceInfo extends NbdConnectionState {
  uri: string;
}

/** The remote devices among `deps` (a table's devices), in `deps`' order. */
export function remoteDevices(deps: readonly BlockDevice[]): RemoteDeviceInfo[] {
  return deps
    .filter((d): d is NbdDevice => d instanceof NbdDevice)
    .map((d) => ({ uri: d.tableName, ...d.connectionState() }));
}
