/**
 * delay: hold bios for a fixed time before passing them on, optionally to different devices per
 * direction (dm-delay.c; docs/targets.md).
 *
 * `<dev> <offset> <delay> [<write_dev> <write_offset> <write_delay> [<flush_dev> <flush_offset>
 * <flush_delay>]]`, offsets in sectors, delays in milliseconds of the injected Clock. With 3
 * arguments reads, writes and flushes share the triple; with 6 reads use the first and writes and
 * flushes the second; with 9 each class has its own. A write carrying PREFLUSH (the core's empty
 * flush clones) is in the flush class; discards are writes.
 *
 * A delayed bio is remapped, queued with its deadline and owned by the target (SUBMITTED). One
 * Clock timer is armed for the earliest deadline; when it fires every expired bio is submitted, in
 * the order the bios arrived, and the timer is re-armed for the earliest remaining deadline. A
 * delay of 0 passes the bio straight through. presuspend stops delaying and submits everything
 * queued at once; resume starts delaying again.
 */
import { deviceLookupError, parseSector, parseUnsigned, UINT_MAX } from "../core/args.js";
import type { Bio } from "../core/bio.js";
import type { BlockDevice } from "../core/devices/block-device.js";
import { target } from "../core/registry.js";
import { type Clock, type DeviceLookup, Services } from "../core/services.js";
import { type DeviceAreaCallback, MapResult, type StatusType, Target, TargetError } from "../core/target.js";

interface DelayClass {
  device: BlockDevice;
  start: number;
  /** Milliseconds. */
  delay: number;
  /** Bios of this class held right now (the INFO counters). */
  ops: number;
}

interface Delayed {
  bio: Bio;
  expires: number;
  cls: DelayClass;
}

@target({ name: "delay", version: [1, 5, 0], inject: [Services.DeviceLookup, Services.Clock] })
export class DelayTarget extends Target {
  private read!: DelayClass;
  private write!: DelayClass;
  private flush!: DelayClass;
  private argc = 0;
  private mayDelay = true;
  /** Held bios in arrival order. */
  private delayed: Delayed[] = [];
  private timer: { cancel(): void } | null = null;
  private timerDue = Infinity;

  constructor(
    private readonly devices: DeviceLookup,
    private readonly clock: Clock,
  ) {
    super();
  }

  async ctr(args: string[]): Promise<void> {
    const argc = args.length;
    if (argc !== 3 && argc !== 6 && argc !== 9) throw new TargetError("Requires exactly 3, 6 or 9 arguments");
    this.argc = argc;
    this.read = await this.classCtr(args, 0);
    if (argc === 3) {
      this.write = await this.classCtr(args, 0);
      this.flush = await this.classCtr(args, 0);
    } else {
      this.write = await this.classCtr(args, 3);
      this.flush = await this.classCtr(args, argc === 6 ? 3 : 6);
    }
    this.numFlushBios = 1;
    this.numDiscardBios = 1;
  }

  /** delay_class_ctr: offset, then delay, then the device. */
  private async classCtr(args: string[], at: number): Promise<DelayClass> {
    const start = parseSector(args[at + 1]!);
    if (start === null) throw new TargetError("Invalid device sector");
    const delay = parseUnsigned(args[at + 2]!, UINT_MAX);
    if (delay === null) throw new TargetError("Invalid delay");
    let device: BlockDevice;
    try {
      device = await this.devices.get(args[at]!, this.table.readOnly ? "r" : "rw");
    } catch (err) {
      throw deviceLookupError("Device lookup failed", err);
    }
    return { device, start, delay, ops: 0 };
  }

  override dtr(): void {
    this.cancelTimer();
  }

  map(bio: Bio): MapResult {
    const cls = bio.op === "read" ? this.read : bio.op === "flush" || bio.isPreflush ? this.flush : this.write;
    bio.device = cls.device;
    if (bio.sectors > 0) bio.sector = cls.start + (bio.sector - this.begin);
    if (cls.delay === 0 || !this.mayDelay) return MapResult.REMAPPED;
    const expires = this.clock.now() + cls.delay;
    cls.ops++;
    this.delayed.push({ bio, expires, cls });
    this.armTimer(expires);
    return MapResult.SUBMITTED;
  }

  /** timer_reduce: (re)arm the one timer unless it already fires no later than `expires`. */
  private armTimer(expires: number): void {
    if (this.timer && this.timerDue <= expires) return;
    this.timer?.cancel();
    this.timerDue = expires;
    this.timer = this.clock.setTimeout(
      () => {
        this.timer = null;
        this.timerDue = Infinity;
        this.flushDelayed(false);
      },
      Math.max(0, expires - this.clock.now()),
    );
  }

  private cancelTimer(): void {
    this.timer?.cancel();
    this.timer = null;
    this.timerDue = Infinity;
  }

  /** flush_delayed_bios: submit the expired (or all) held bios in arrival order; re-arm for the rest. */
  private flushDelayed(all: boolean): void {
    const now = this.clock.now();
    const due: Delayed[] = [];
    const keep: Delayed[] = [];
    let next = Infinity;
    for (const d of this.delayed) {
      if (all || now >= d.expires) {
        d.cls.ops--;
        due.push(d);
      } else {
        keep.push(d);
        next = Math.min(next, d.expires);
      }
    }
    this.delayed = keep;
    if (next !== Infinity) this.armTimer(next);
    // Already in flight since map (SUBMITTED): hand them to the device they were remapped to.
    for (const d of due) d.bio.device!.submit(d.bio);
  }

  override presuspend(): void {
    this.mayDelay = false;
    this.cancelTimer();
    this.flushDelayed(true);
  }

  override resume(): void {
    this.mayDelay = true;
  }

  override status(type: StatusType): string {
    if (type === "info") return `${this.read.ops} ${this.write.ops} ${this.flush.ops}`;
    const triple = (c: DelayClass) => `${c.device.tableName} ${c.start} ${c.delay}`;
    let s = triple(this.read);
    if (this.argc >= 6) s += " " + triple(this.write);
    if (this.argc >= 9) s += " " + triple(this.flush);
    return s;
  }

  override iterateDevices(fn: DeviceAreaCallback): boolean {
    return [this.read, this.write, this.flush].some((c) => fn(c.device, c.start, this.len) === true);
  }
}
