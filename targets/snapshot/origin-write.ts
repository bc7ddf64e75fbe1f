/**
 * The origin write path, shared by snapshot-origin, snapshot (whose origin writes come through
 * snapshot-origin) and snapshot-merge: before a write reaches the origin, every snapshot of that
 * origin must have preserved the chunk it overwrites (dm-snap.c: __origin_write, do_origin).
 */
import type { Bio } from "../../core/bio.js";
import { MapResult } from "../../core/target.js";
import type { Origin } from "./origin-registry.js";
import type { PendingException } from "./pending.js";
import type { SnapshotTarget } from "./snapshot.js";

/**
 * The origin write path (dm-snap.c: __origin_write): for every active, valid snapshot of the origin
 * (largest chunk first) make sure the chunk under `sector` is preserved. The bio waits on the
 * first pending exception that needs it and is retried when that completes. Returns REMAPPED
 * when nothing needs copying, SUBMITTED when the bio was queued.
 */
export function originWrite(origin: Origin<SnapshotTarget>, sector: number, bio: Bio | null): MapResult {
  let r: MapResult = MapResult.REMAPPED;
  let waitOn: { snap: SnapshotTarget; pe: PendingException } | null = null;
  const startNow: { snap: SnapshotTarget; pe: PendingException }[] = [];
  for (const snap of origin.snapshots) {
    if (snap.isMerge || !snap.valid || !snap.active || sector >= snap.len) continue;
    const chunk = Math.floor(sector / snap.chunkSize);
    const pe = snap.findOrAllocatePending(chunk, false);
    if (!pe) continue;
    r = MapResult.SUBMITTED;
    if (bio) {
      pe.originBios.push(bio);
      bio = null;
      if (!pe.started) {
        pe.started = true;
        waitOn = { snap, pe };
      }
    } else if (!pe.started) {
      pe.started = true;
      startNow.push({ snap, pe });
    }
  }
  // The copy the bio waits on starts last, giving the others a head start (as the kernel does);
  // copies of equal chunk size share one origin read.
  const jobs = waitOn ? [...startNow, waitOn] : startNow;
  if (jobs.length > 0) jobs[0]!.snap.startCopy(jobs);
  return r;
}

/**
 * How many sectors of a write of `sectors` at origin sector `sector`, from its start, have
 * nothing to copy in any snapshot: for each snapshot originWrite would consider, every chunk they
 * touch already has a completed exception and none is pending. That part may go to the origin in
 * one piece, however many chunks it spans: splitting at chunk boundaries (the kernel's
 * max_io_len) only pays off where a chunk needs its copy first, and a 1 MiB write cut into 4 KiB
 * pieces costs 256 device writes. Stops at the first chunk that needs a copy (so a long write
 * is scanned once, piece by piece, not again from its start for every chunk).
 */
export function originSettledSectors(origin: Origin<SnapshotTarget>, sector: number, sectors: number): number {
  let settled = sectors;
  for (const snap of origin.snapshots) {
    if (snap.isMerge || !snap.valid || !snap.active || sector >= snap.len) continue;
    const cs = snap.chunkSize;
    const end = Math.min(sector + settled, snap.len);
    for (let chunk = Math.floor(sector / cs); chunk * cs < end; chunk++) {
      if (snap.pending.has(chunk) || snap.complete.lookup(chunk) < 0) {
        settled = Math.max(0, chunk * cs - sector);
        break;
      }
    }
    if (settled === 0) return 0;
  }
  return settled;
}

/**
 * Origin writes: wait out COW throttling (limit), then originWrite; submit if nothing to copy.
 * (snapshot-origin sends a settled multi-chunk write straight to the device, unthrottled: it
 * starts no copy.)
 */
export function originRetry(origin: Origin<SnapshotTarget>, bio: Bio, limit: boolean): void {
  const r = originMapWrite(origin, bio, limit);
  if (r === MapResult.REMAPPED) bio.device!.submit(bio);
}

export function originMapWrite(origin: Origin<SnapshotTarget>, bio: Bio, limit: boolean): MapResult {
  if (limit && origin.snapshots.some((s) => s.copyThrottled)) {
    origin.throttled.push(bio);
    return MapResult.SUBMITTED;
  }
  return originWrite(origin, bio.sector, bio);
}
