/**
 * The value of the device-details btree, one per thin device (dm-thin-metadata.c: struct
 * disk_device_details, 24 bytes): how many blocks it maps, the pool transaction it was created in,
 * and the pool times of its creation and of its last snapshot.
 */
import { readU64, writeU64 } from "../persistent-data/space-map.js";

export const DEVICE_DETAILS_SIZE = 24;

export interface DeviceDetails {
  mappedBlocks: number;
  transactionId: bigint;
  creationTime: number;
  snapshottedTime: number;
}

export function decodeDeviceDetails(buf: Buffer): DeviceDetails {
  return {
    mappedBlocks: readU64(buf, 0),
    transactionId: buf.readBigUInt64LE(8),
    creationTime: buf.readUInt32LE(16),
    snapshottedTime: buf.readUInt32LE(20),
  };
}

export function encodeDeviceDetails(d: DeviceDetails): Buffer {
  const buf = Buffer.alloc(DEVICE_DETAILS_SIZE);
  writeU64(buf, 0, d.mappedBlocks);
  buf.writeBigUInt64LE(d.transactionId, 8);
  buf.writeUInt32LE(d.creationTime, 16);
  buf.writeUInt32LE(d.snapshottedTime, 20);
  return buf;
}
