/**
 * snapshot-origin: `snapshot-origin <origin_dev>` (dm-snap.c: origin_ctr, origin_map).
 * Reads and flushes go straight to the origin; a write first makes every snapshot of the origin
 * preserve the chunk it overwrites, and waits until they have.
 */
import type { Bio } from "../../core/bio.js";
import { acceptPartialBio } from "../../core/dm-io.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { target } from "../../core/registry.js";
import { type DeviceLookup, Services } from "../../core/services.js";
import { type DeviceAreaCallback, MapResult, type StatusType, Target, TargetError } from "../../core/target.js";
import { type Origin, originOf } from "./origin-registry.js";
import { originMapWrite, originSettledSectors } from "./origin-write.js";
import type { SnapshotTarget } from "./snapshot.js";

/** Split boundary with no snapshots: effectively none, but still a power of two (R21). */
const NO_SPLIT = 2 ** 40;

@target({ name: "snapshot-origin", version: [1, 9, 0], inject: [Services.DeviceLookup] })
export class SnapshotOriginTarget extends Target {
  private device!: BlockDevice;
  private origin!: Origin<SnapshotTarget>;
  /** Smallest snapshot chunk size, computed at resume: no write may span two chunks of any snapshot. */
  private splitBoundary = NO_SPLIT;

  constructor(private readonly devices: DeviceLookup) {
    super();
    this.zeroCopyReads = true; // origin reads are only remapped: a snapshot reading the origin goes through the snapshot target, which copies
  }

  async ctr(args: string[]): Promise<void> {
    if (args.length !== 1) throw new TargetError("origin: incorrect number of arguments");
    try {
      this.device = await this.devices.get(args[0]!, this.table.readOnly ? "r" : "rw");
    } catch (err) {
      throw new TargetError("Cannot get target device", (err as { code?: string }).code ?? "EINVAL");
    }
    this.origin = originOf<SnapshotTarget>(this.device, true)!;
    this.numFlushBios = 1;
  }

  override resume(): void {
    this.splitBoundary = this.origin.minChunkSize() || NO_SPLIT;
    this.origin.originTable = this.table;
  }

  override postsuspend(): void {
    if (this.origin.originTable === this.table) this.origin.originTable = null;
  }

  override dtr(): void {
    if (this.origin.originTable === this.table) this.origin.originTable = null;
  }

  map(bio: Bio): MapResult {
    bio.device = this.device;
    if (bio.sectors > 0) bio.sector -= this.begin;
    if (bio.op !== "write") return MapResult.REMAPPED;
    const within = bio.sector % this.splitBoundary;
    if (within + bio.sectors > this.splitBoundary) {
      // Spanning chunks: the part no snapshot needs a copy in goes as one piece (the core maps
      // the rest again); a chunk that needs its copy goes alone, through originWrite.
      const settled = originSettledSectors(this.origin, bio.sector, bio.sectors);
      if (settled === bio.sectors) return MapResult.REMAPPED;
      // Chunk sizes are power-of-two multiples of splitBoundary, so a settled prefix ends on
      // a split boundary past this one: it is never shorter than the first piece.
      if (settled > 0) {
        acceptPartialBio(bio, settled);
        return MapResult.REMAPPED;
      }
      acceptPartialBio(bio, this.splitBoundary - within);
    }
    return originMapWrite(this.origin, bio, true);
  }

  override status(type: StatusType): string {
    return type === "table" ? this.device.tableName : "";
  }

  override iterateDevices(fn: DeviceAreaCallback): boolean {
    return fn(this.device, 0, this.len) === true;
  }
}
