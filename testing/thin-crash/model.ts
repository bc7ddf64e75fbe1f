/**
 * The thin workload's model: every thin volume's writes, discards and flushes (the crash runner's
 * DeviceHistory, testing/crash/model.ts), what it held when it was created, and when it existed.
 *
 * - A volume made by `create_thin` starts as zeros; one made by `create_snap` starts as its
 *   origin's content at that moment (the origin is suspended around the message, so nothing is in
 *   flight and the content is the origin's acknowledged writes).
 * - A discard of whole blocks is a "write" of zeros with an id of its own; only the whole blocks a
 *   discard covers change (dm-thin.c: process_discard_bio ignores the partial blocks at its ends).
 * - Every pool message commits, and a commit flushes the data device first
 *   (metadata_pre_commit_callback): for the model a message is a flush of every volume that
 *   exists, submitted when the message is sent and acknowledged when it returns.
 * - A volume exists after a crash at t when its creating message had returned by t and its
 *   `delete` had not been sent; while either message runs it may or may not.
 */
import { DeviceHistory, GARBAGE, MISPLACED, ZEROS, describeValue } from "../crash/model.js";

/** The stamp id the data device is filled with before the pool uses it: a block never written or zeroed shows it. */
export const STALE_ID = 0x3fff_fff0;

export interface ThinVolume {
  /** The thin device id in the pool. */
  id: number;
  /** Its mapped device in the workload: thin<id>. */
  name: string;
  history: DeviceHistory;
  /** Its content when created, per sector (write ids, ZEROS): null for create_thin (all zeros). */
  base: Int32Array | null;
  /** The volume it is a snapshot of, or null. */
  origin: number | null;
  /** Clock stamps of the creating message (sent, returned) and of `delete` (Infinity: never). */
  createSent: number;
  createDone: number;
  deleteSent: number;
  deleteDone: number;
}

export type Existence = "exists" | "absent" | "either";

export class ThinPoolModel {
  /** Every volume made, deleted ones too, in order of creation. */
  readonly volumes: ThinVolume[] = [];
  /** Ids of the model's discards: such a sector reads as zeros. */
  readonly discardIds = new Set<number>();
  /** Ids of unzeroed fills (skip_block_zeroing): such a sector may hold anything. */
  readonly unzeroedIds = new Set<number>();
  /** Ids of writes submitted to a block that may have had no data block then (they may provision one). */
  readonly mayProvisionIds = new Set<number>();

  constructor(
    readonly volumeSectors: number,
    readonly blockSize: number,
    /** The pool runs with skip_block_zeroing: a block a partial write provisions is not zeroed first. */
    readonly skipZeroing = false,
  ) {}

  newVolume(id: number, base: Int32Array | null, origin: number | null): ThinVolume {
    const name = `thin${id}`;
    const volume: ThinVolume = {
      id,
      name,
      history: new DeviceHistory(name, this.volumeSectors),
      base,
      origin,
      createSent: Infinity,
      createDone: Infinity,
      deleteSent: Infinity,
      deleteDone: Infinity,
    };
    this.volumes.push(volume);
    return volume;
  }

  /** Volumes created and not being deleted: the workload's mapped devices. */
  live(): ThinVolume[] {
    return this.volumes.filter((v) => Number.isFinite(v.createDone) && v.deleteSent === Infinity);
  }

  byName(name: string): ThinVolume {
    const volume = this.volumes.find((v) => v.name === name);
    if (!volume) throw new Error(`no thin volume ${name}`);
    return volume;
  }

  byId(id: number): ThinVolume | undefined {
    return this.volumes.find((v) => v.id === id);
  }

  /** What `volume` held at `sector` before any write of its own: a write id or ZEROS. */
  baseAt(volume: ThinVolume, sector: number): number {
    return volume.base ? volume.base[sector]! : ZEROS;
  }

  /** What a live read of `volume` must return at `sector` now: a write or discard id, or ZEROS. */
  expectedNow(volume: ThinVolume, sector: number): number {
    const id = volume.history.current[sector]!;
    return id >= 0 ? id : this.baseAt(volume, sector);
  }

  /**
   * Whether block `block` of `volume` may have no data block now (so a partial write provisions
   * one): nothing but zeros and discards is acknowledged in it, or in flight in it is a discard
   * or a write that may itself be provisioning it.
   */
  mayBeUnprovisioned(volume: ThinVolume, block: number): boolean {
    const from = block * this.blockSize;
    const unsettling = (w: { id: number; ack: number }) =>
      !Number.isFinite(w.ack) && (this.discardIds.has(w.id) || this.mayProvisionIds.has(w.id));
    for (let sector = from; sector < from + this.blockSize; sector++) {
      if (volume.history.writesAt(sector).some(unsettling)) return true;
    }
    for (let sector = from; sector < from + this.blockSize; sector++) {
      const id = this.expectedNow(volume, sector);
      if (id !== ZEROS && !this.discardIds.has(id)) return false;
    }
    return true;
  }

  /** Whether an unzeroed fill is in flight over `sector` of `volume` (a read there may see anything). */
  unzeroedInFlight(volume: ThinVolume, sector: number): boolean {
    return volume.history.writesAt(sector).some((w) => w.unzeroedFill && !Number.isFinite(w.ack));
  }

  /** Whether a sector decoded as `found` holds what `id` (a write, a discard, or ZEROS) put there. */
  matches(found: number, id: number): boolean {
    if (this.unzeroedIds.has(id)) return true;
    return id === ZEROS || this.discardIds.has(id) ? found === ZEROS : found === id;
  }

  /** A pool message ran from `sent` to `done`: its commit is a flush of every volume that existed then. */
  poolFlush(sent: number, done: number, failed: boolean): void {
    for (const volume of this.volumes) {
      if (volume.createDone <= sent && volume.deleteSent > sent) {
        volume.history.flushes.push({ device: volume.name, submit: sent, ack: done, failed });
      }
    }
  }

  /** Whether `volume` must, may or must not be in the pool after a crash at `t`. */
  existence(volume: ThinVolume, t: number): Existence {
    if (t < volume.createSent) return "absent";
    if (t < volume.createDone) return "either";
    if (t < volume.deleteSent) return "exists";
    return t < volume.deleteDone ? "either" : "absent";
  }

  describe(value: number): string {
    if (value === STALE_ID) return "stale data (the data device's content before the pool used the block)";
    if (this.discardIds.has(value)) return `zeros (discard #${value})`;
    if (this.unzeroedIds.has(value)) return `anything (a block provisioned unzeroed, #${value})`;
    if (value === MISPLACED) return "another sector's data (a block of another place, or stale data)";
    if (value === GARBAGE) return "garbage";
    return value === ZEROS ? "zeros" : describeValue(value);
  }
}
