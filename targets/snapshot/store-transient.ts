/**
 * The transient exception store ("N", dm-snap-transient.c): no metadata at
 * all. Data chunks are handed out from chunk 0 of the COW device; everything is forgotten when
 * the table goes. A chunk size of 0 stays 0, and the snapshot ctr then fails "Chunk size not set"
 * (bug B5).
 */
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { ExceptionStore, StoreParams } from "./store.js";

export class TransientStore implements ExceptionStore {
  readonly kind = "transient";
  readonly userspaceSupportsOverflow = false;
  chunkSize: number;
  private readonly cow: BlockDevice;
  /** In sectors, as the kernel keeps it. */
  private nextFree = 0;

  constructor(params: StoreParams) {
    this.cow = params.cow;
    this.chunkSize = params.chunkSize;
  }

  async readMetadata(): Promise<"valid"> {
    return "valid";
  }

  consecutiveFree(max: number): number {
    const cs = this.chunkSize;
    if (cs === 0) return 0;
    return Math.max(0, Math.min(max, Math.floor((this.cow.sizeSectors - this.nextFree) / cs)));
  }

  prepareException(): number | null {
    const cs = this.chunkSize;
    if (cs === 0 || this.cow.sizeSectors < this.nextFree + cs) return null;
    const chunk = this.nextFree / cs;
    this.nextFree += cs;
    return chunk;
  }

  /** Nothing to record: report `valid` at once. */
  commitException(_oldChunk: number, _newChunk: number, valid: boolean, done: (success: boolean) => void): void {
    done(valid);
  }

  /** The kernel's transient store has no drop_snapshot: invalidation lives in memory only. */
  async dropSnapshot(): Promise<void> {}

  usage(): { total: number; allocated: number; metadata: number } {
    return { total: this.cow.sizeSectors, allocated: this.nextFree, metadata: 0 };
  }

  statusTable(): string {
    return ` N ${this.chunkSize}`;
  }

  async drain(): Promise<void> {}
}
