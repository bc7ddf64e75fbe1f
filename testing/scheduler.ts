/**
 * SeededScheduler: one seeded interleaving of the I/O a target sends to ControlledDevices. Every
 * bio the devices receive is held; whenever the code under test has nothing left to do but wait
 * for I/O, the scheduler completes one held bio (or fails it), picked by the seed. The same seed
 * gives the same order, so a seed that breaks a target is a counterexample that replays exactly;
 * a loop over seeds explores many interleavings with no sleeps and no timers.
 */
import type { BioStatus } from "../core/bio.js";
import type { ControlledDevice, HeldIo, HoldHandle } from "./controlled-device.js";
import { Rng } from "./rng.js";

export interface SeededSchedulerOptions {
  /** Probability that a picked bio fails instead of completing (default 0: none fail). */
  failProbability?: number;
  /** The status failed bios complete with (default EIO). */
  failStatus?: BioStatus;
  /**
   * Event-loop turns to let the code under test run before each pick (default 4): enough for
   * promise chains and work queues to submit what they will, so the pick sees every bio the
   * previous completion led to, whatever the machine's speed.
   */
  settleTurns?: number;
}

/** One decision, in order: what was completed or failed. */
export interface ScheduleStep {
  action: "release" | "fail";
  device: string;
  bio: string;
}

export class SeededScheduler {
  /** The decisions of the last `run`, for a failure message. */
  readonly steps: ScheduleStep[] = [];
  private readonly rng: Rng;

  constructor(
    private readonly devices: ControlledDevice[],
    readonly seed: number,
    private readonly options: SeededSchedulerOptions = {},
  ) {
    this.rng = new Rng(seed);
  }

  /**
   * Run `work` (which submits I/O to a device mapped over the devices) under this schedule:
   * resolves with its result once it has finished and nothing is held, or rejects with its error.
   * Bios held before `run` are scheduled too.
   */
  async run<T>(work: () => Promise<T>): Promise<T> {
    const holds: [ControlledDevice, HoldHandle][] = this.devices.map((d) => [d, d.hold()]);
    let finished = false;
    const outcome = work().finally(() => (finished = true));
    // Keep an early rejection from counting as unhandled while the schedule still runs.
    outcome.catch(() => {});
    try {
      for (;;) {
        await this.settle();
        const held = this.held();
        if (held.length === 0) {
          if (finished) break;
          // Waiting on something other than I/O (a timer, a queue): until a bio arrives or it ends.
          await Promise.race([
            outcome.then(
              () => {},
              () => {},
            ),
            ...this.devices.map((d) => d.waitForHeld(1)),
          ]);
          continue;
        }
        this.pick(held);
      }
    } finally {
      for (const [device, handle] of holds) device.stopHolding(handle);
    }
    return outcome;
  }

  /** Held bios of every device, in a fixed order (device order, then submission order). */
  private held(): { device: ControlledDevice; io: HeldIo }[] {
    return this.devices.flatMap((device) => device.held().map((io) => ({ device, io })));
  }

  private pick(held: { device: ControlledDevice; io: HeldIo }[]): void {
    const { device, io } = this.rng.pick(held);
    const fail = this.rng.chance(this.options.failProbability ?? 0);
    this.steps.push({ action: fail ? "fail" : "release", device: device.tableName, bio: io.toString() });
    if (fail) io.fail(this.options.failStatus ?? "EIO");
    else io.release();
  }

  private async settle(): Promise<void> {
    for (let i = 0; i < (this.options.settleTurns ?? 4); i++) await new Promise((r) => setImmediate(r));
  }
}
