/**
 * The pool metadata's root_lock (an rw_semaphore in the kernel): lookups share it, changes take it
 * alone, in arrival order (a waiting writer holds back later readers, so lookups cannot starve a
 * commit). Modified blocks are changed in place within a transaction, so a lookup must never walk
 * a tree while a change to it is half done.
 */
interface Waiter {
  write: boolean;
  resolve: () => void;
}

export class MetadataLock {
  private readers = 0;
  private writer = false;
  private readonly queue: Waiter[] = [];

  /** A change is running: a lookup without the lock would see it half done. */
  get writing(): boolean {
    return this.writer;
  }

  async read<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(false);
    try {
      return await fn();
    } finally {
      this.release(false);
    }
  }

  async write<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(true);
    try {
      return await fn();
    } finally {
      this.release(true);
    }
  }

  private canGrant(write: boolean): boolean {
    return write ? !this.writer && this.readers === 0 : !this.writer;
  }

  private grant(write: boolean): void {
    if (write) this.writer = true;
    else this.readers++;
  }

  private acquire(write: boolean): Promise<void> {
    if (this.queue.length === 0 && this.canGrant(write)) {
      this.grant(write);
      return Promise.resolve();
    }
    return new Promise((resolve) => this.queue.push({ write, resolve }));
  }

  private release(write: boolean): void {
    if (write) this.writer = false;
    else this.readers--;
    while (this.queue.length > 0 && this.canGrant(this.queue[0]!.write)) {
      const w = this.queue.shift()!;
      this.grant(w.write);
      w.resolve();
    }
  }
}
