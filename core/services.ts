/**
 * Injection tokens for the core services a target may ask for. Explicit tokens (not
 * `design:paramtypes`) so injection works the same under tsc, esbuild/vitest and plain JavaScript
 * plugins, none of which can be relied on to emit decorator metadata.
 */
import type { BlockDevice, OpenMode } from "./devices/block-device.js";

export const Services = {
  /** `WorkQueues`: creates named ordered/concurrent work queues (ksnapd). */
  WorkQueues: Symbol.for("udm.WorkQueues"),
  /** `Copier`: sector-range copies between devices (kcopyd). */
  Copier: Symbol.for("udm.Copier"),
  /** `Logger`: structured log lines. */
  Logger: Symbol.for("udm.Logger"),
  /** `DeviceLookup`: opens the devices a table line names (dm_get_device); one per table. */
  DeviceLookup: Symbol.for("udm.DeviceLookup"),
  /** `Clock`: time source, replaceable in tests (flakey/delay intervals). */
  Clock: Symbol.for("udm.Clock"),
} as const;

/** dm_get_device / dm_put_device for one table: devices are shared and reference counted. */
export interface DeviceLookup {
  /**
   * Open `path` (a file, a block device node, `major:minor`, `/dev/mapper/NAME` for another
   * udm device, or an NBD URI such as `nbd+unix:///EXPORT?socket=PATH` for a remote export).
   * Mode "rw" is silently reduced to "r" for a read-only table. Rejects with an Error whose
   * `code` is an errno name; targets turn that into their own message ("Device lookup failed").
   */
  get(path: string, mode?: OpenMode): Promise<BlockDevice>;
  /** Release one reference taken by `get` (optional: the table releases the rest when destroyed). */
  put(device: BlockDevice): Promise<void>;
}

export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): { cancel(): void };
}

/** Node's timers fire after 1 ms (with a TimeoutOverflowWarning) when asked for more than this. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export const systemClock: Clock = {
  now: () => Date.now(),
  setTimeout(fn, ms) {
    // Longer waits (a delay table may ask for up to 2^32 - 1 ms, as the kernel's u32 allows) are
    // chained: each link waits at most MAX_TIMER_MS, the last one runs `fn`.
    const due = Date.now() + ms;
    let t: NodeJS.Timeout;
    const arm = (wait: number) => {
      t = setTimeout(
        () => {
          const left = due - Date.now();
          if (left > 0) arm(left);
          else fn();
        },
        Math.min(Math.max(0, wait), MAX_TIMER_MS),
      );
    };
    arm(ms);
    return { cancel: () => clearTimeout(t) };
  },
};
