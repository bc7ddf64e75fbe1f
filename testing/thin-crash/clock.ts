/**
 * The thin workload's Clock: time moves only when the workload says so. The pool's waker (a
 * commit every second while changes are pending, dm-thin.c: do_waker) then fires at a moment the
 * seed picks, with I/O in flight, and a run repeats exactly; the replay mapper's pools never see
 * their timers fire at all.
 */
import type { Clock } from "../../core/services.js";

interface Timer {
  due: number;
  seq: number;
  fn: () => void;
}

export class ManualClock implements Clock {
  private time = 0;
  private seq = 0;
  private timers: Timer[] = [];

  now(): number {
    return this.time;
  }

  setTimeout(fn: () => void, ms: number): { cancel(): void } {
    const timer: Timer = { due: this.time + Math.max(0, ms), seq: this.seq++, fn };
    this.timers.push(timer);
    return { cancel: () => (this.timers = this.timers.filter((t) => t !== timer)) };
  }

  /** Move time forward by `ms`, firing the timers that fall due, in deadline order. */
  advance(ms: number): void {
    const target = this.time + ms;
    for (;;) {
      const due = this.timers.filter((t) => t.due <= target).sort((a, b) => a.due - b.due || a.seq - b.seq)[0];
      if (!due) break;
      this.timers = this.timers.filter((t) => t !== due);
      this.time = due.due;
      due.fn();
    }
    this.time = target;
  }
}
