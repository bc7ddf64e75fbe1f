/**
 * The RAM disks under the workload's log-writes devices. The origin and each snapshot's COW device
 * get a data RAM disk `<key>-data` (behind a RecordingDevice) and a sparse log RAM disk
 * `<key>-log`, joined by a `log-writes` device `lw-<key>` that the snapshot tables name.
 */
import type { DeviceMapper } from "../../core/device-mapper.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { type CrashClock, type Jitter, type NamedDevices, RecordingDevice } from "./devices.js";
import type { SnapshotModel } from "./model.js";
import { markedWrite } from "./ram-disks.js";

/** Log RAM disks are sparse: only what is logged takes memory. */
const LOG_SECTORS = 1 << 24;

export interface LoggedDevice {
  /** "origin" or "cow<k>". */
  key: string;
  /** The log-writes device over the two RAM disks: lw-<key>. */
  logWritesName: string;
  sectors: number;
  /** The data RAM disk as log-writes sees it: every completion stamped by the clock. */
  recorder: RecordingDevice;
  log: MemoryDevice;
  /** What the data RAM disk held before the workload (null: zeros). */
  initial: Buffer | null;
  /** The snapshot whose COW device this is; null for the origin. */
  snapshot: SnapshotModel | null;
  /** Marks sent to its log-writes device, with their clock stamps. */
  marks: { name: string; at: number }[];
}

export class LoggedDevices {
  /** The origin first, then the COW devices in order of creation. */
  readonly list: LoggedDevice[] = [];

  constructor(
    private readonly backing: NamedDevices,
    private readonly clock: CrashClock,
    private readonly jitter: Jitter | null,
  ) {}

  /** Make the two RAM disks for `key`, then the log-writes device over them. */
  async create(
    dm: DeviceMapper,
    key: string,
    sectors: number,
    initial: Buffer | null,
    snapshot: SnapshotModel | null,
  ): Promise<LoggedDevice> {
    const data = new MemoryDevice(sectors, { tableName: `${key}-data`, displayName: `${key}-data` });
    if (initial) data.submit(markedWrite(0, initial));
    const recorder = new RecordingDevice(data, this.clock, this.jitter);
    const log = new MemoryDevice(LOG_SECTORS, { tableName: `${key}-log`, displayName: `${key}-log` });
    this.backing.add(`${key}-data`, recorder);
    this.backing.add(`${key}-log`, log);
    const device: LoggedDevice = {
      key,
      logWritesName: `lw-${key}`,
      sectors,
      recorder,
      log,
      initial,
      snapshot,
      marks: [],
    };
    this.list.push(device);
    await dm.create(device.logWritesName, { table: `0 ${sectors} log-writes ${key}-data ${key}-log` });
    return device;
  }

  cowOf(snapshot: SnapshotModel): LoggedDevice {
    return this.list.find((device) => device.snapshot === snapshot)!;
  }
}

/** Whether the device existed at moment `at`: the origin always; a COW device while its snapshot (or merge) lived. */
export function existedAt(device: LoggedDevice, at: number): boolean {
  const snapshot = device.snapshot;
  return (
    snapshot === null ||
    (snapshot.createdAt <= at && at < snapshot.removedAt) ||
    (snapshot.mergeStartedAt <= at && at < snapshot.mergeDoneAt)
  );
}
