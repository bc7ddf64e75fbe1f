/**
 * Work queues: the kernel's workqueues (ksnapd, kcopyd's worker) for a single-threaded engine.
 *
 * A work item is a function, optionally async. An ordered queue runs one item at a time in FIFO
 * order, and the next item starts only after the previous one's promise settled; a concurrent
 * queue runs up to `concurrency` items at once, started in FIFO order.
 *
 * Items never start inside `queue()`: they start from a microtask, so a caller that queues work in
 * the middle of updating its own state is never re-entered (the kernel equivalent: queue_work only
 * wakes the worker). Errors from an item go to `onError` (or the logger) and the queue keeps going:
 * one failed item must not wedge every later one.
 */
import { JsonLineLogger, type Logger } from "./logger.js";

export type Work = () => void | Promise<void>;

export type WorkQueueMode = { ordered: true; concurrency?: never } | { concurrency: number; ordered?: never };

export interface WorkQueueHooks {
  /** Where a failed work item is reported. Defaults to `logger.error`. */
  onError?: (err: unknown, queue: WorkQueue) => void;
  /** Used when there is no `onError`, and when `onError` itself throws. Defaults to JSON lines on stderr. */
  logger?: Logger;
}

export type WorkQueueOptions = WorkQueueMode & WorkQueueHooks;

export class WorkQueueDestroyedError extends Error {
  constructor(name: string) {
    super(`work queue '${name}' is destroyed: cannot queue work`);
    this.name = "WorkQueueDestroyedError";
  }
}

interface Item {
  seq: number;
  work: Work;
}

interface FlushWaiter {
  /** Resolves once every item with seq <= barrier has finished. */
  barrier: number;
  resolve: () => void;
}

export class WorkQueue {
  readonly concurrency: number;
  private readonly pending: Item[] = [];
  private pendingHead = 0;
  /** Sequence numbers of the items now running (at most `concurrency`). */
  private readonly running = new Set<number>();
  private nextSeq = 1;
  private scheduled = false;
  private flushWaiters: FlushWaiter[] = [];
  private destroying: Promise<void> | null = null;
  private destroyed = false;
  private readonly logger: Logger;
  private readonly onError: (err: unknown, queue: WorkQueue) => void;

  constructor(
    readonly name: string,
    options: WorkQueueOptions,
  ) {
    const concurrency = options.ordered ? 1 : options.concurrency;
    if (!Number.isInteger(concurrency) || concurrency < 1) {
      throw new RangeError(`work queue '${name}': concurrency must be a positive integer, got ${concurrency}`);
    }
    this.concurrency = concurrency;
    this.logger = options.logger ?? new JsonLineLogger();
    this.onError =
      options.onError ?? ((err) => this.logger.error("work item failed", { queue: name, error: describe(err) }));
  }

  /** Items queued and not yet finished (waiting or running). */
  get size(): number {
    return this.pending.length - this.pendingHead + this.running.size;
  }

  get isDestroyed(): boolean {
    return this.destroyed;
  }

  /**
   * Queue an item; it starts asynchronously. While `destroy()` is draining, items are still
   * accepted (running work may chain follow-up work, as drain_workqueue allows); once destroyed,
   * queueing throws WorkQueueDestroyedError.
   */
  queue(work: Work): void {
    if (this.destroyed) throw new WorkQueueDestroyedError(this.name);
    this.pending.push({ seq: this.nextSeq++, work });
    this.schedule();
  }

  /** Resolves when every item queued before this call has finished (later items are not waited for). */
  flush(): Promise<void> {
    const barrier = this.nextSeq - 1;
    if (this.lowestUnfinished() > barrier) return Promise.resolve();
    return new Promise((resolve) => this.flushWaiters.push({ barrier, resolve }));
  }

  /** Drain everything (including work queued by running work), then refuse new work. Idempotent. */
  destroy(): Promise<void> {
    this.destroying ??= (async () => {
      while (this.size > 0) await this.flush();
      this.destroyed = true;
    })();
    return this.destroying;
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    queueMicrotask(() => {
      this.scheduled = false;
      this.startReady();
    });
  }

  private startReady(): void {
    while (this.running.size < this.concurrency && this.pendingHead < this.pending.length) {
      const item = this.pending[this.pendingHead]!;
      this.pending[this.pendingHead++] = undefined as never; // drop the reference for GC
      if (this.pendingHead > 1024 && this.pendingHead * 2 > this.pending.length) {
        this.pending.splice(0, this.pendingHead);
        this.pendingHead = 0;
      }
      this.running.add(item.seq);
      void this.run(item);
    }
  }

  private async run(item: Item): Promise<void> {
    try {
      await item.work();
    } catch (err) {
      this.report(err);
    }
    this.running.delete(item.seq);
    this.wakeFlushers();
    // Start the next item from a fresh microtask, never from inside the finished item's stack.
    if (this.pendingHead < this.pending.length) this.schedule();
  }

  private report(err: unknown): void {
    try {
      this.onError(err, this);
    } catch (hookErr) {
      this.logger.error("work queue onError hook threw", {
        queue: this.name,
        error: describe(hookErr),
        original: describe(err),
      });
    }
  }

  private lowestUnfinished(): number {
    let low = this.pendingHead < this.pending.length ? this.pending[this.pendingHead]!.seq : this.nextSeq;
    for (const seq of this.running) if (seq < low) low = seq;
    return low;
  }

  private wakeFlushers(): void {
    if (this.flushWaiters.length === 0) return;
    const low = this.lowestUnfinished();
    const still: FlushWaiter[] = [];
    for (const w of this.flushWaiters) {
      if (w.barrier < low) w.resolve();
      else still.push(w);
    }
    this.flushWaiters = still;
  }
}

/**
 * The WorkQueues service (injected as `Services.WorkQueues`): creates named queues that share one
 * logger and error hook, and can flush or destroy all of them (used when tearing a table down).
 */
export class WorkQueues {
  private readonly queues = new Set<WorkQueue>();

  constructor(private readonly hooks: WorkQueueHooks = {}) {}

  /** Create a queue. Names are for messages only and need not be unique (one per target instance). */
  create(name: string, mode: WorkQueueMode, hooks: WorkQueueHooks = {}): WorkQueue {
    const q = new WorkQueue(name, { ...this.hooks, ...hooks, ...mode } as WorkQueueOptions);
    this.queues.add(q);
    return q;
  }

  /** Live (not destroyed) queues. */
  list(): WorkQueue[] {
    for (const q of this.queues) if (q.isDestroyed) this.queues.delete(q);
    return [...this.queues];
  }

  /** Flush every live queue: resolves when all work queued anywhere before the call has finished. */
  async flushAll(): Promise<void> {
    await Promise.all(this.list().map((q) => q.flush()));
  }

  async destroyAll(): Promise<void> {
    await Promise.all(this.list().map((q) => q.destroy()));
    this.queues.clear();
  }
}

function describe(err: unknown): string {
  return err instanceof Error ? (err.stack ?? `${err.name}: ${err.message}`) : String(err);
}
