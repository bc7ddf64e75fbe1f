/**
 * Remote devices: NBD exports named by URI in tables (docs/nbd.md, "Remote devices"). SharedDevices
 * sends every device argument that is an NBD URI here instead of to the file system.
 */
import type { OpenOptions } from "../block-device.js";
import type { BackingDevices } from "../shared-devices.js";
import { NbdDevice } from "./nbd-device.js";
import { isNbdUri, nbdUriKey, parseNbdUri } from "./uri.js";

export { NbdDevice, type NbdConnectionState, type NbdDeviceOptions, setNbdClientLogger } from "./nbd-device.js";
export { isNbdUri, parseNbdUri, type NbdUri } from "./uri.js";

/** NBD URIs as backing devices: one connection set per distinct export (and set of options). */
export const nbdBackingDevices: BackingDevices = {
  identify: async (spec: string) => `nbd:${nbdUriKey(parseNbdUri(spec))}`,
  open: (spec: string, opts: OpenOptions) => NbdDevice.open(spec, opts),
};

/** Whether `spec` is for nbdBackingDevices. */
export const isRemoteDevice = isNbdUri;
