import { describe, expect, it } from "vitest";
import { MemoryLogger } from "../../core/logger.js";
import { WorkQueue, WorkQueueDestroyedError, WorkQueues } from "../../core/work-queue.js";

/** A promise with its resolver outside: lets a test decide when a work item finishes. */
function deferred<T = void>() {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/** Let every already-queued microtask run (one event-loop turn; not a timed sleep). */
const turn = () => new Promise<void>((r) => setImmediate(r));

const quiet = () => ({ logger: new MemoryLogger() });

describe("WorkQueue (ordered)", () => {
  it("never starts work inside queue()", async () => {
    const q = new WorkQueue("t", { ordered: true, ...quiet() });
    let ran = false;
    q.queue(() => {
      ran = true;
    });
    expect(ran).toBe(false);
    await q.flush();
    expect(ran).toBe(true);
  });

  it("runs items FIFO, one at a time, waiting for each item's promise", async () => {
    const q = new WorkQueue("t", { ordered: true, ...quiet() });
    const events: string[] = [];
    const gates = [deferred(), deferred(), deferred()];
    const started = [deferred(), deferred(), deferred()];
    gates.forEach((gate, i) =>
      q.queue(async () => {
        events.push(`start ${i}`);
        started[i]!.resolve();
        await gate.promise;
        events.push(`end ${i}`);
      }),
    );
    await started[0]!.promise;
    await turn();
    expect(events).toEqual(["start 0"]);
    gates[1]!.resolve(); // finishing a later gate first changes nothing: 1 has not started
    gates[0]!.resolve();
    await started[1]!.promise;
    await turn();
    // 1 finished at once (its gate was open), so 2 started and now waits on its gate.
    expect(events).toEqual(["start 0", "end 0", "start 1", "end 1", "start 2"]);
    gates[2]!.resolve();
    await q.flush();
    expect(events.slice(5)).toEqual(["end 2"]);
  });
});

describe("WorkQueue (concurrent)", () => {
  it("runs at most `concurrency` items at once, started in FIFO order", async () => {
    const q = new WorkQueue("t", { concurrency: 2, ...quiet() });
    const gates = [0, 1, 2, 3].map(() => deferred());
    const started = [0, 1, 2, 3].map(() => deferred());
    let running = 0;
    let maxRunning = 0;
    const order: number[] = [];
    gates.forEach((gate, i) =>
      q.queue(async () => {
        order.push(i);
        maxRunning = Math.max(maxRunning, ++running);
        started[i]!.resolve();
        await gate.promise;
        running--;
      }),
    );
    await Promise.all([started[0]!.promise, started[1]!.promise]);
    await turn();
    expect(order).toEqual([0, 1]);
    gates[1]!.resolve();
    await started[2]!.promise;
    await turn();
    expect(order).toEqual([0, 1, 2]);
    gates.forEach((g) => g.resolve());
    await q.flush();
    expect(order).toEqual([0, 1, 2, 3]);
    expect(maxRunning).toBe(2);
  });

  it("flush() waits for items queued before it, not after", async () => {
    const q = new WorkQueue("t", { concurrency: 4, ...quiet() });
    const before = deferred();
    const after = deferred();
    let beforeDone = false;
    q.queue(async () => {
      await before.promise;
      beforeDone = true;
    });
    const flushed = q.flush();
    q.queue(() => after.promise); // blocked until the end of the test
    let flushResolved = false;
    void flushed.then(() => (flushResolved = true));
    await turn();
    expect(flushResolved).toBe(false);
    before.resolve();
    await flushed;
    expect(beforeDone).toBe(true);
    expect(q.size).toBe(1);
    after.resolve();
    await q.flush();
    expect(q.size).toBe(0);
  });

  it("flush() on an idle queue resolves", async () => {
    await new WorkQueue("t", { concurrency: 3 }).flush();
  });

  it("rejects a bad concurrency", () => {
    expect(() => new WorkQueue("t", { concurrency: 0 })).toThrow(/positive integer/);
  });
});

describe("WorkQueue errors", () => {
  it("reports thrown and rejected items to onError and keeps running", async () => {
    const errors: unknown[] = [];
    const q = new WorkQueue("t", { ordered: true, onError: (e) => errors.push(e) });
    const ran: number[] = [];
    q.queue(() => {
      throw new Error("sync boom");
    });
    q.queue(async () => {
      throw new Error("async boom");
    });
    q.queue(() => {
      ran.push(3);
    });
    await q.flush();
    expect(errors.map((e) => (e as Error).message)).toEqual(["sync boom", "async boom"]);
    expect(ran).toEqual([3]);
  });

  it("logs through the logger when there is no onError", async () => {
    const logger = new MemoryLogger();
    const q = new WorkQueue("ksnapd", { ordered: true, logger });
    q.queue(() => {
      throw new Error("boom");
    });
    await q.flush();
    expect(logger.records).toHaveLength(1);
    expect(logger.records[0]).toMatchObject({ level: "error", fields: { queue: "ksnapd" } });
  });
});

describe("WorkQueue.destroy", () => {
  it("drains (including chained work), then refuses new work", async () => {
    const q = new WorkQueue("t", { ordered: true, ...quiet() });
    const ran: string[] = [];
    const gate = deferred();
    q.queue(async () => {
      await gate.promise;
      ran.push("first");
      q.queue(() => {
        ran.push("chained");
      });
    });
    const destroyed = q.destroy();
    expect(q.destroy()).toBe(destroyed);
    gate.resolve();
    await destroyed;
    expect(ran).toEqual(["first", "chained"]);
    expect(q.isDestroyed).toBe(true);
    expect(() => q.queue(() => {})).toThrow(WorkQueueDestroyedError);
    expect(() => q.queue(() => {})).toThrow(/work queue 't' is destroyed/);
  });
});

describe("WorkQueues", () => {
  it("creates queues with shared hooks and flushes them all", async () => {
    const errors: string[] = [];
    const wqs = new WorkQueues({ onError: (e, q) => errors.push(`${q.name}: ${(e as Error).message}`) });
    const a = wqs.create("ksnapd", { ordered: true });
    const b = wqs.create("kcopyd", { concurrency: 2 });
    const done: string[] = [];
    a.queue(async () => {
      await Promise.resolve();
      done.push("a");
    });
    b.queue(() => {
      done.push("b");
      throw new Error("bad");
    });
    await wqs.flushAll();
    expect(done.sort()).toEqual(["a", "b"]);
    expect(errors).toEqual(["kcopyd: bad"]);
    expect(wqs.list()).toEqual([a, b]);
    await wqs.destroyAll();
    expect(a.isDestroyed && b.isDestroyed).toBe(true);
    expect(wqs.list()).toEqual([]);
  });
});
