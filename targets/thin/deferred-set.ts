/**
 * A deferred set (dm-bio-prison-v1.c: struct dm_deferred_set): work that must wait until every
 * I/O already in flight at the moment it was added has finished, but not for I/O that starts
 * later. The pool uses one for reads of shared blocks (a block is not reused while a read of it
 * is in flight) and one for all I/O (a discard's passdown waits for writes to the block).
 *
 * I/O takes a reference on the current entry when it starts and drops it when it ends. Adding
 * work hangs it on the current entry and moves on to the next one, so later I/O counts in a newer
 * entry. Work runs once every entry up to its own has drained.
 */
const DEFERRED_SET_SIZE = 64;

export class DeferredEntry<W> {
  count = 0;
  readonly work: W[] = [];
}

export class DeferredSet<W> {
  private readonly entries = Array.from({ length: DEFERRED_SET_SIZE }, () => new DeferredEntry<W>());
  private current = 0;
  private sweeper = 0;

  /** dm_deferred_entry_inc: an I/O starts; keep the entry to drop it when the I/O ends. */
  inc(): DeferredEntry<W> {
    const entry = this.entries[this.current]!;
    entry.count++;
    return entry;
  }

  /** dm_deferred_entry_dec: an I/O ended; returns the work that may run now. */
  dec(entry: DeferredEntry<W>): W[] {
    if (entry.count === 0) throw new Error("deferred entry released more often than taken");
    entry.count--;
    return this.sweep();
  }

  /**
   * dm_deferred_set_add_work: false when nothing is in flight (run the work now), else true: the
   * work is returned by the `dec` that drains the last I/O started before it.
   */
  addWork(work: W): boolean {
    if (this.sweeper === this.current && this.entries[this.current]!.count === 0) return false;
    this.entries[this.current]!.work.push(work);
    const next = (this.current + 1) % DEFERRED_SET_SIZE;
    if (this.entries[next]!.count === 0) this.current = next;
    return true;
  }

  private sweep(): W[] {
    const ready: W[] = [];
    const take = (e: DeferredEntry<W>) => ready.push(...e.work.splice(0));
    while (this.sweeper !== this.current && this.entries[this.sweeper]!.count === 0) {
      take(this.entries[this.sweeper]!);
      this.sweeper = (this.sweeper + 1) % DEFERRED_SET_SIZE;
    }
    if (this.sweeper === this.current && this.entries[this.sweeper]!.count === 0) take(this.entries[this.sweeper]!);
    return ready;
  }
}
