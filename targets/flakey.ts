/**
 * flakey: a linear mapping that is periodically unreliable (dm-flakey.c; docs/targets.md).
 *
 * `<dev> <offset> <up interval> <down interval> [<#feature args> [<arg>]*]`, intervals in seconds
 * of the injected Clock, counted from construction. During an up interval the target is linear.
 * During a down interval the features decide: `error_reads` fails reads, `drop_writes` completes
 * writes without writing them, `error_writes` fails them, `corrupt_bio_byte <N> <r|w> <value>
 * <flags>` overwrites the Nth byte (1-based) of matching reads (after they complete) or writes (a
 * corrupted copy is written; the caller's buffer is untouched), and `random_read_corrupt` /
 * `random_write_corrupt <probability>` overwrite one random byte with a random value with
 * probability `p / 1,000,000,000`. No features at all means `error_reads error_writes`.
 *
 * Randomness comes from a seedable PRNG (splitmix64) seeded from the Clock at construction, so a
 * test that controls the clock gets the same corruptions every run; `seedRandom` reseeds it.
 */
import { ArgReader, deviceLookupError, parseSector, UINT_MAX } from "../core/args.js";
import { Bio, type BioEndIo } from "../core/bio.js";
import type { BlockDevice } from "../core/devices/block-device.js";
import { target } from "../core/registry.js";
import { type Clock, type DeviceLookup, Services } from "../core/services.js";
import {
  type DeviceAreaCallback,
  EndIoResult,
  MapResult,
  type StatusType,
  Target,
  TargetError,
} from "../core/target.js";

/** Probabilities are given out of this (100 %). */
export const PROBABILITY_BASE = 1_000_000_000;

const MASK64 = (1n << 64n) - 1n;

/** splitmix64: small, fast to seed, good enough to pick bytes; 64-bit outputs like get_random_u64. */
export class SplitMix64 {
  private state: bigint;
  constructor(seed: number | bigint) {
    this.state = BigInt.asUintN(64, BigInt(seed));
  }
  nextU64(): bigint {
    this.state = (this.state + 0x9e3779b97f4a7c15n) & MASK64;
    let z = this.state;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
    return z ^ (z >> 31n);
  }
  nextU32(): number {
    return Number(this.nextU64() & 0xffff_ffffn);
  }
  nextU8(): number {
    return Number(this.nextU64() & 0xffn);
  }
  /** `get_random_u64() % PROBABILITY_BASE < p`, as the kernel draws a corruption. */
  chance(p: number): boolean {
    return Number(this.nextU64() % BigInt(PROBABILITY_BASE)) < p;
  }
}

interface FlakeyContext {
  /** The bio has data and was mapped during a down interval (pb->bio_can_corrupt). */
  canCorrupt: boolean;
}

/** Completes the original write when the corrupted copy written in its place completes. */
class CopyDone implements BioEndIo {
  constructor(private readonly original: Bio) {}
  bioDone(copy: Bio): void {
    this.original.complete(copy.status);
  }
}

@target({ name: "flakey", version: [1, 5, 0], inject: [Services.DeviceLookup, Services.Clock] })
export class FlakeyTarget extends Target<FlakeyContext> {
  private device!: BlockDevice;
  private start = 0;
  private startTime = 0;
  private upInterval = 0;
  private downInterval = 0;
  /** (up + down) as the kernel's unsigned int sum: non-zero once ctr has succeeded. */
  private period = 1;
  private errorReads = false;
  private dropWrites = false;
  private errorWrites = false;
  /** 0: feature off; else the 1-based byte to overwrite. */
  private corruptBioByte = 0;
  private corruptBioRw: "r" | "w" = "r";
  private corruptBioValue = 0;
  private corruptBioFlags = 0;
  private randomReadCorrupt = 0;
  private randomWriteCorrupt = 0;
  private rng: SplitMix64;

  constructor(
    private readonly devices: DeviceLookup,
    private readonly clock: Clock,
  ) {
    super();
    this.rng = new SplitMix64(0);
  }

  async ctr(args: string[]): Promise<void> {
    if (args.length < 4) throw new TargetError("Invalid argument count");
    this.startTime = this.clock.now();
    this.rng = new SplitMix64(this.startTime);
    const as = new ArgReader(args);
    const devname = as.shift()!;
    const start = parseSector(as.shift()!);
    if (start === null) throw new TargetError("Invalid device sector");
    this.start = start;
    this.upInterval = as.readArg({ min: 0, max: UINT_MAX, error: "Invalid up interval" });
    this.downInterval = as.readArg({ min: 0, max: UINT_MAX, error: "Invalid down interval" });
    // Both checks on the unsigned int sum, as the kernel makes them (a sum of exactly 2^32 wraps to 0).
    const sum = (this.upInterval + this.downInterval) >>> 0;
    if (sum === 0) throw new TargetError("Total (up + down) interval is zero");
    if (sum < this.upInterval) throw new TargetError("Interval overflow");
    this.period = sum;
    this.parseFeatures(as);
    try {
      this.device = await this.devices.get(devname, this.table.readOnly ? "r" : "rw");
    } catch (err) {
      throw deviceLookupError("Device lookup failed", err);
    }
    this.numFlushBios = 1;
    this.numDiscardBios = 1;
  }

  private parseFeatures(as: ArgReader): void {
    let argc = 0;
    if (as.remaining > 0) argc = as.readArgGroup({ min: 0, max: 11, error: "Invalid number of feature args" });
    if (argc === 0) {
      this.errorReads = this.errorWrites = true;
      return;
    }
    while (argc > 0) {
      const name = as.shift();
      argc--;
      if (name === undefined) throw new TargetError("Insufficient feature arguments");
      switch (name.toLowerCase()) {
        case "error_reads":
          if (this.errorReads) throw new TargetError("Feature error_reads duplicated");
          this.errorReads = true;
          continue;
        case "drop_writes":
          if (this.dropWrites) throw new TargetError("Feature drop_writes duplicated");
          this.dropWrites = true;
          if (this.errorWrites) throw new TargetError("Feature drop_writes conflicts with feature error_writes");
          continue;
        case "error_writes":
          if (this.errorWrites) throw new TargetError("Feature error_writes duplicated");
          this.errorWrites = true;
          if (this.dropWrites) throw new TargetError("Feature error_writes conflicts with feature drop_writes");
          continue;
        case "corrupt_bio_byte": {
          if (this.corruptBioByte) throw new TargetError("Feature corrupt_bio_byte duplicated");
          if (argc < 4) throw new TargetError("Feature corrupt_bio_byte requires 4 parameters");
          this.corruptBioByte = as.readArg({ min: 1, max: UINT_MAX, error: "Invalid corrupt bio byte" });
          argc--;
          const dir = as.shift()?.toLowerCase();
          if (dir !== "r" && dir !== "w") throw new TargetError("Invalid corrupt bio direction (r or w)");
          this.corruptBioRw = dir;
          argc--;
          this.corruptBioValue = as.readArg({
            min: 0,
            max: 255,
            error: "Invalid corrupt value to write into bio byte (0-255)",
          });
          argc--;
          this.corruptBioFlags = as.readArg({ min: 0, max: UINT_MAX, error: "Invalid corrupt bio flags mask" });
          argc--;
          continue;
        }
        case "random_read_corrupt":
          if (this.randomReadCorrupt) throw new TargetError("Feature random_read_corrupt duplicated");
          if (argc === 0) throw new TargetError("Feature random_read_corrupt requires a parameter");
          this.randomReadCorrupt = as.readArg({
            min: 0,
            max: PROBABILITY_BASE,
            error: "Invalid random corrupt argument",
          });
          argc--;
          continue;
        case "random_write_corrupt":
          if (this.randomWriteCorrupt) throw new TargetError("Feature random_write_corrupt duplicated");
          if (argc === 0) throw new TargetError("Feature random_write_corrupt requires a parameter");
          this.randomWriteCorrupt = as.readArg({
            min: 0,
            max: PROBABILITY_BASE,
            error: "Invalid random corrupt argument",
          });
          argc--;
          continue;
        default:
          throw new TargetError("Unrecognised flakey feature requested");
      }
    }
    const fixedWrite = this.corruptBioByte > 0 && this.corruptBioRw === "w";
    const fixedRead = this.corruptBioByte > 0 && this.corruptBioRw === "r";
    if (this.dropWrites && (fixedWrite || this.randomWriteCorrupt)) {
      throw new TargetError(
        "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
      );
    }
    if (this.errorWrites && (fixedWrite || this.randomWriteCorrupt)) {
      throw new TargetError(
        "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
      );
    }
    if (this.errorReads && (fixedRead || this.randomReadCorrupt)) {
      throw new TargetError(
        "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the READ flag set",
      );
    }
    if (
      !this.corruptBioByte &&
      !this.errorReads &&
      !this.dropWrites &&
      !this.errorWrites &&
      !this.randomReadCorrupt &&
      !this.randomWriteCorrupt
    ) {
      this.errorReads = this.errorWrites = true;
    }
  }

  /** Replace the random number generator's state (tests, reproducible fault campaigns). */
  seedRandom(seed: number | bigint): void {
    this.rng = new SplitMix64(seed);
  }

  /** Whether the device is in a down interval now: whole seconds since ctr, modulo (up + down). */
  isDown(): boolean {
    const elapsed = Math.floor(Math.max(0, this.clock.now() - this.startTime) / 1000);
    return elapsed % this.period >= this.upInterval;
  }

  override newMapContext(): FlakeyContext {
    return { canCorrupt: false };
  }

  private remap(bio: Bio): MapResult {
    bio.device = this.device;
    if (bio.sectors > 0) bio.sector = this.start + (bio.sector - this.begin);
    return MapResult.REMAPPED;
  }

  /** all_corrupt_bio_flags_match: every bit of the mask is set on the bio (a mask of 0 matches all). */
  private flagsMatch(bio: Bio): boolean {
    return (bio.flags & this.corruptBioFlags) >>> 0 === this.corruptBioFlags;
  }

  map(bio: Bio, ctx: FlakeyContext): MapResult {
    ctx.canCorrupt = false;
    if (!this.isDown()) return this.remap(bio);

    const hasData = (bio.op === "read" || bio.op === "write") && bio.sectors > 0;
    if (hasData) ctx.canCorrupt = true;
    if (bio.op === "read") return this.errorReads ? MapResult.KILL : this.remap(bio);

    // Everything else is a write: data, empty flushes, discards.
    if (this.dropWrites) {
      bio.complete("ok");
      return MapResult.SUBMITTED;
    }
    if (this.errorWrites) {
      bio.complete("EIO");
      return MapResult.SUBMITTED;
    }
    if (!ctx.canCorrupt) return this.remap(bio);
    const fixed = this.corruptBioByte > 0 && this.corruptBioRw === "w" && this.flagsMatch(bio);
    const random = this.randomWriteCorrupt > 0 && this.rng.chance(this.randomWriteCorrupt);
    if (!fixed && !random) return this.remap(bio);

    // Write a corrupted copy; the caller's buffer keeps its data. The original completes with the copy.
    const data = Buffer.from(bio.data);
    if (fixed) this.corruptFixed(data);
    if (random) this.corruptRandom(data);
    const copy = new Bio(
      "write",
      this.start + (bio.sector - this.begin),
      bio.sectors,
      data,
      bio.flags,
      new CopyDone(bio),
    );
    copy.submitTo(this.device);
    return MapResult.SUBMITTED;
  }

  override endIo(bio: Bio, ctx: FlakeyContext): EndIoResult {
    if (bio.status !== "ok" || !ctx.canCorrupt || bio.op !== "read") return EndIoResult.DONE;
    if (this.corruptBioByte > 0 && this.corruptBioRw === "r" && this.flagsMatch(bio)) this.corruptFixed(bio.data);
    if (this.randomReadCorrupt > 0 && this.rng.chance(this.randomReadCorrupt)) this.corruptRandom(bio.data);
    return EndIoResult.DONE;
  }

  /** Overwrite the Nth byte (1-based); a bio shorter than that is left alone. */
  private corruptFixed(data: Buffer): void {
    const i = this.corruptBioByte - 1;
    if (i < data.length) data[i] = this.corruptBioValue;
  }

  /** One uniformly chosen byte gets a random value (which may equal the old one). */
  private corruptRandom(data: Buffer): void {
    if (data.length === 0) return;
    const i = this.rng.nextU32() % data.length;
    data[i] = this.rng.nextU8();
  }

  override status(type: StatusType): string {
    if (type === "info") return "";
    const n =
      Number(this.errorReads) +
      Number(this.dropWrites) +
      Number(this.errorWrites) +
      (this.corruptBioByte > 0 ? 5 : 0) +
      (this.randomReadCorrupt > 0 ? 2 : 0) +
      (this.randomWriteCorrupt > 0 ? 2 : 0);
    let s = `${this.device.tableName} ${this.start} ${this.upInterval} ${this.downInterval} ${n}`;
    if (this.errorReads) s += " error_reads";
    if (this.dropWrites) s += " drop_writes";
    else if (this.errorWrites) s += " error_writes";
    if (this.corruptBioByte > 0) {
      s += ` corrupt_bio_byte ${this.corruptBioByte} ${this.corruptBioRw} ${this.corruptBioValue} ${this.corruptBioFlags}`;
    }
    if (this.randomReadCorrupt > 0) s += ` random_read_corrupt ${this.randomReadCorrupt}`;
    if (this.randomWriteCorrupt > 0) s += ` random_write_corrupt ${this.randomWriteCorrupt}`;
    return s;
  }

  override iterateDevices(fn: DeviceAreaCallback): boolean {
    return fn(this.device, this.start, this.len) === true;
  }
}
