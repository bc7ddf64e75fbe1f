/**
 * Tracked chunks (dm-snap.c: track_chunk, __check_for_conflicting_io): snapshot reads of un-copied chunks go to the origin, and
 * an origin write to that chunk must not overwrite it until those reads have completed. Each such
 * read is counted per chunk from `map` to `endIo` (its per-bio map context remembers the chunk);
 * `whenUntracked` lets the exception-completion path wait for the count to drop to zero. The
 * kernel polls every millisecond; here the last read out wakes the waiters.
 */
export class TrackedChunks {
  private readonly counts = new Map<number, number>();
  private readonly waiters = new Map<number, (() => void)[]>();

  track(chunk: number): void {
    this.counts.set(chunk, (this.counts.get(chunk) ?? 0) + 1);
  }

  untrack(chunk: number): void {
    const n = (this.counts.get(chunk) ?? 0) - 1;
    if (n < 0) throw new Error(`untrack of chunk ${chunk} that is not tracked`);
    if (n > 0) {
      this.counts.set(chunk, n);
      return;
    }
    this.counts.delete(chunk);
    const wake = this.waiters.get(chunk);
    if (wake) {
      this.waiters.delete(chunk);
      for (const w of wake) w();
    }
  }

  isTracked(chunk: number): boolean {
    return this.counts.has(chunk);
  }

  /** Resolves once no tracked bio remains on `chunk` (at once if none). */
  whenUntracked(chunk: number): Promise<void> {
    if (!this.counts.has(chunk)) return Promise.resolve();
    return new Promise((resolve) => {
      const list = this.waiters.get(chunk);
      if (list) list.push(resolve);
      else this.waiters.set(chunk, [resolve]);
    });
  }

  get size(): number {
    return this.counts.size;
  }

  /** Chunks someone waits on (for leak checks: 0 when idle). */
  get waiting(): number {
    return this.waiters.size;
  }
}

/** Per-bio map context of the snapshot target: the first chunk this bio tracks (or -1), and how many. */
export interface TrackContext {
  chunk: number;
  chunks: number;
}
