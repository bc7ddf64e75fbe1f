/**
 * The I/O path of a mapped device (kernel: dm_split_and_process_bio, __map_bio, clone_endio,
 * dm_io_dec_pending). One `DmIo` follows one original bio: it is cut into clones at target
 * boundaries and `maxIoLen`, flush/discard/write-zeroes are fanned out as duplicates, every clone
 * is mapped by its target, and the original completes when the last clone has.
 */
import { Bio, type BioEndIo, BioFlags, type BioStatus, SECTOR_SHIFT } from "./bio.js";
import type { Table } from "./table.js";
import { EndIoResult, MapResult, type Target } from "./target.js";

/** What a DmIo needs from its mapped device. */
export interface DmIoOwner {
  /** Whether a REQUEUE should put the bio back (noflush suspend) rather than fail it. */
  readonly noflushSuspending: boolean;
  /** The original bio is finished with the core (completed or requeued). */
  ioDone(io: DmIo): void;
  /** Put the original bio at the head of the deferred list (REQUEUE during noflush suspend). */
  requeue(bio: Bio): void;
  /** Resubmit the data part of a flush-with-data once its flush has completed. */
  resubmit(bio: Bio): void;
  /** Report a target bug (bad map result) without crashing the process. */
  targetBug(target: Target<unknown>, message: string): void;
}

export class DmIo implements BioEndIo {
  /** One reference for the submitter's loop plus one per clone in flight. */
  private ioCount = 1;
  private status: BioStatus = "ok";
  /** True while this io is the flush half of a PREFLUSH write with data. */
  private flushStage = false;

  constructor(
    private readonly owner: DmIoOwner,
    readonly bio: Bio,
  ) {}

  /** Map the bio through `table`. Synchronous: the table cannot change underneath. */
  process(table: Table): void {
    const bio = this.bio;
    if (bio.op === "flush" || bio.isPreflush) {
      this.flushStage = bio.op !== "flush" && bio.sectors > 0;
      this.sendEmptyFlush(table);
    } else if (bio.op === "discard" || bio.op === "write-zeroes") {
      this.sendDuplicated(table);
    } else {
      this.splitAndMap(table);
    }
    this.dec("ok");
  }

  private sendEmptyFlush(table: Table): void {
    for (const target of table.targets) {
      for (let i = 0; i < target.numFlushBios; i++) {
        this.mapClone(target, "flush", 0, 0, null, BioFlags.PREFLUSH, i);
      }
    }
  }

  /** Discard and write-zeroes: `numXBios` clones of the range clipped to each target. */
  private sendDuplicated(table: Table): void {
    const bio = this.bio;
    const end = bio.sector + bio.sectors;
    for (let sector = bio.sector; sector < end;) {
      const target = table.targets[table.findTarget(sector)]!;
      let len = Math.min(end, target.begin + target.len) - sector;
      const max = target.maxDiscardSectors;
      if (max > 0) len = Math.min(len, max - ((sector - target.begin) % max));
      const n = bio.op === "discard" ? target.numDiscardBios : target.numWriteZeroesBios;
      if (n === 0) this.setError("EOPNOTSUPP");
      for (let i = 0; i < n; i++) this.mapClone(target, bio.op, sector, len, null, bio.flags, i);
      sector += len;
    }
  }

  /** Reads and writes: cut at target boundaries and at each target's maxIoLen (dm.c: max_io_len). */
  private splitAndMap(table: Table): void {
    const bio = this.bio;
    const end = bio.sector + bio.sectors;
    let sector = bio.sector;
    while (sector < end) {
      const target = table.targets[table.findTarget(sector)]!;
      const offset = sector - target.begin;
      let len = Math.min(target.len - offset, end - sector);
      if (target.maxIoLen > 0) len = Math.min(len, target.maxIoLen - (offset % target.maxIoLen));
      const from = (sector - bio.sector) << SECTOR_SHIFT;
      // The common case (one clone covers the whole bio) shares the buffer without a view.
      const data = len === bio.sectors ? bio.data : bio.data.subarray(from, from + (len << SECTOR_SHIFT));
      // A target may accept only part of the clone (acceptPartialBio); the rest is mapped next.
      // Zero-copy reads only through targets that promise to leave read data alone.
      const ranges = target.zeroCopyReads ? bio.fileRanges : null;
      sector += this.mapClone(target, bio.op, sector, len, data, bio.flags & ~BioFlags.PREFLUSH, 0, ranges);
    }
  }

  /** Create one clone, map it, act on the result. Returns the sectors the target accepted. */
  private mapClone(
    target: Target<unknown>,
    op: Bio["op"],
    sector: number,
    sectors: number,
    data: Buffer | null,
    flags: number,
    targetBioNr: number,
    fileRanges: Bio["fileRanges"] = null,
  ): number {
    const clone = new Bio(op, sector, sectors, data, flags, this);
    clone.fileRanges = fileRanges;
    clone.owner = target;
    clone.targetBioNr = targetBioNr;
    if (target.newMapContext) clone.mapContext = target.newMapContext();
    this.ioCount++;
    clone.markInFlight();
    let r: MapResult;
    try {
      r = target.map(clone, clone.mapContext);
    } catch (err) {
      // A plugin's bug must cost this I/O, not the device: an escaped exception would leave the
      // io counted in flight forever (a suspend would never finish) and unwind the submitter.
      this.owner.targetBug(target, `map threw: ${(err as Error)?.message ?? String(err)}`);
      if (clone.isInFlight) {
        clone.abandon();
        this.dec("EIO");
      }
      return sectors;
    }
    const accepted = clone.sectors;
    switch (r) {
      case MapResult.REMAPPED:
        if (!clone.device) {
          this.owner.targetBug(target, "map returned REMAPPED without setting a device");
          clone.complete("EIO");
        } else {
          clone.device.submit(clone);
        }
        break;
      case MapResult.SUBMITTED:
        break;
      case MapResult.REQUEUE:
        clone.abandon();
        this.dec("DM_REQUEUE");
        break;
      case MapResult.KILL:
        clone.abandon();
        this.dec("EIO");
        break;
      default:
        this.owner.targetBug(target, `map returned ${String(r)}, which a bio-based device cannot handle`);
        clone.abandon();
        this.dec("EIO");
    }
    return accepted > 0 ? accepted : sectors;
  }

  /** clone_endio: a clone finished; let its target see it, then drop its reference. */
  bioDone(clone: Bio): void {
    const target = clone.owner as Target<unknown>;
    if (target.endIo) {
      let r: EndIoResult;
      try {
        r = target.endIo(clone, clone.mapContext);
      } catch (err) {
        this.owner.targetBug(target, `endIo threw: ${(err as Error)?.message ?? String(err)}`);
        return this.dec("EIO");
      }
      if (r === EndIoResult.INCOMPLETE) return;
      if (r === EndIoResult.REQUEUE) clone.status = "DM_REQUEUE";
    }
    this.dec(clone.status);
  }

  private setError(status: BioStatus): void {
    // A pending requeue during a noflush suspend is never overwritten (dm_io_set_error).
    if (this.status === "DM_REQUEUE" && this.owner.noflushSuspending) return;
    this.status = status;
  }

  private dec(status: BioStatus): void {
    if (status !== "ok") this.setError(status);
    if (--this.ioCount > 0) return;
    this.finish();
  }

  private finish(): void {
    const bio = this.bio;
    const status = this.status;
    this.owner.ioDone(this);
    if (status === "DM_REQUEUE") {
      // Mapped again later, perhaps through another table: no range this bio took may stay
      // (in a stacked device, the rest of the outer read keeps its own).
      bio.fileRanges?.release(bio.data);
      if (this.owner.noflushSuspending) this.owner.requeue(bio);
      else bio.complete("EIO");
    } else if (this.flushStage && status === "ok") {
      // The flush half is done: the data goes through the device again, now without PREFLUSH.
      bio.flags &= ~BioFlags.PREFLUSH;
      this.owner.resubmit(bio);
    } else {
      bio.complete(status);
    }
  }
}

/**
 * dm_accept_partial_bio: called from `map`, keep only the first `sectors` of a read/write clone;
 * the core maps the remainder as another clone.
 */
export function acceptPartialBio(clone: Bio, sectors: number): void {
  if (clone.op !== "read" && clone.op !== "write")
    throw new Error("acceptPartialBio: only reads and writes can be split");
  if (sectors <= 0 || sectors > clone.sectors)
    throw new Error(`acceptPartialBio: ${sectors} not in 1..${clone.sectors}`);
  clone.sectors = sectors;
  clone.data = clone.data.subarray(0, sectors << SECTOR_SHIFT);
}
