/**
 * Pending exceptions (dm-snap.c: `struct dm_snap_pending_exception`, pending_complete): an origin chunk whose COW slot is allocated but
 * whose copy and metadata commit have not finished. Writers that need the chunk preserved queue on
 * it: snapshot writes (`snapshotBios`, sent to the COW device once the copy is complete) and
 * origin writes (`originBios`, retried through the origin path once the exception is complete).
 */
import type { Bio } from "../../core/bio.js";

export class PendingException {
  /** Copy (or full-chunk write) started: nobody else may start it. */
  started = false;
  copyError = false;
  readonly snapshotBios: Bio[] = [];
  readonly originBios: Bio[] = [];
  /** A whole-chunk snapshot write that replaces the copy (start_full_bio). */
  fullBio: Bio | null = null;
  /** A snapshot write over this and the next chunks that replaces their copies (one COW write). */
  run: RunWrite | null = null;

  constructor(
    readonly oldChunk: number,
    readonly newChunk: number,
    /** Allocation order: exceptions are committed in this order (R11). */
    readonly sequence: number,
  ) {}
}

/**
 * One snapshot write covering several whole chunks, each with its own pending exception: it
 * completes once every one of them is complete (or failed, then with EIO).
 */
export class RunWrite {
  private failed = false;

  constructor(
    readonly bio: Bio,
    private remaining: number,
  ) {}

  /** One of the run's exceptions is done. */
  exceptionDone(error: boolean): void {
    if (error) this.failed = true;
    if (--this.remaining === 0) this.bio.complete(this.failed ? "EIO" : "ok");
  }
}

/**
 * The in-order completion gate: copies finish in any order, but exceptions reach the store in
 * allocation order, so a crash never leaves an unrecorded chunk below the last recorded one.
 */
export class InOrderGate {
  private next = 0;
  private readonly waiting = new Map<number, PendingException>();

  /** Feed a finished copy; `complete` runs for every exception that is now next in order. */
  copied(pe: PendingException, complete: (pe: PendingException) => void): void {
    if (pe.sequence !== this.next) {
      if (this.waiting.has(pe.sequence)) throw new Error(`two pending exceptions with sequence ${pe.sequence}`);
      this.waiting.set(pe.sequence, pe);
      return;
    }
    this.next++;
    complete(pe);
    for (let w = this.waiting.get(this.next); w; w = this.waiting.get(this.next)) {
      this.waiting.delete(this.next);
      this.next++;
      complete(w);
    }
  }

  /** Exceptions whose copy finished but that wait for an earlier one. */
  get held(): number {
    return this.waiting.size;
  }
}
