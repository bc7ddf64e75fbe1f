/**
 * Which snapshots belong to which origin (dm-snap.c: `_origins`, `__lookup_origin`). Snapshot and snapshot-origin
 * targets find each other through the identity of the origin device they both open: the
 * SharedDevices shares one device object per underlying device, so that object is the key. The
 * list is kept sorted by chunk size, largest first: an origin write waits on the pending exception
 * of the largest-chunk snapshot, which covers every smaller chunk it overlaps (race R3).
 */
import type { Bio } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { TableContext } from "../../core/target.js";

/** What the origin path needs from a snapshot. */
export interface OriginSnapshot {
  readonly cow: BlockDevice;
  readonly chunkSize: number;
  /** Size of the snapshot's table: origin writes beyond it are ignored. */
  readonly len: number;
  readonly isMerge: boolean;
  /** Create or join the pending exception for `chunk` on behalf of an origin write. */
}

export class Origin<S extends OriginSnapshot = OriginSnapshot> {
  readonly snapshots: S[] = [];
  /** Origin writes parked by COW throttling, retried when copies finish (dm-snap.c: wait_for_in_progress). */
  readonly throttled: Bio[] = [];
  /**
   * The table of the snapshot-origin target serving this origin, registered at its resume and
   * dropped at its postsuspend (`_dm_origins`): handover suspends that device internally.
   */
  originTable: TableContext | null = null;

  constructor(readonly device: BlockDevice) {}

  add(snap: S): void {
    this.snapshots.push(snap);
    this.sort();
  }

  remove(snap: S): void {
    const i = this.snapshots.indexOf(snap);
    if (i >= 0) this.snapshots.splice(i, 1);
  }

  sort(): void {
    this.snapshots.sort((a, b) => b.chunkSize - a.chunkSize);
  }

  /** Smallest chunk size among the snapshots; 0 when there are none (R21). */
  minChunkSize(): number {
    let min = 0;
    for (const s of this.snapshots) if (s.chunkSize > 0 && (min === 0 || s.chunkSize < min)) min = s.chunkSize;
    return min;
  }
}

const origins = new WeakMap<BlockDevice, Origin>();

/**
 * `_pending_exceptions_done_count`: goes up every time any pending exception of any snapshot
 * finishes (successfully or not). A merge that triggered copies in other snapshots before a batch
 * (R9) waits for it to change and then looks again, as the kernel does.
 */
let exceptionsDone = 0;
let exceptionsDoneWaiters: (() => void)[] = [];

export function pendingExceptionDone(): void {
  exceptionsDone++;
  const wake = exceptionsDoneWaiters;
  exceptionsDoneWaiters = [];
  for (const w of wake) w();
}

export function pendingExceptionsDoneCount(): number {
  return exceptionsDone;
}

/** Resolves once the done count differs from `seen` (at once if it already does). */
export function whenPendingExceptionDone(seen: number): Promise<void> {
  if (exceptionsDone !== seen) return Promise.resolve();
  return new Promise((resolve) => exceptionsDoneWaiters.push(resolve));
}

export function originOf<S extends OriginSnapshot>(device: BlockDevice, create = false): Origin<S> | undefined {
  let o = origins.get(device);
  if (!o && create) {
    o = new Origin<S>(device);
    origins.set(device, o);
  }
  return o as Origin<S> | undefined;
}
