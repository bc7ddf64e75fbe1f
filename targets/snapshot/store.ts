/**
 * The snapshot target's exception store interface (dm-exception-store.h: `struct dm_exception_store_type`) and its constructor
 * (`dm_exception_store_create`): `<P|PO|N> <chunk_size>`.
 */
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { Logger } from "../../core/logger.js";
import { chunkSizeError } from "./cow-format.js";
import { PersistentStore } from "./store-persistent.js";
import { StoreError } from "./store-io.js";
import { TransientStore } from "./store-transient.js";

export { StoreError } from "./store-io.js";

export interface ExceptionStore {
  readonly kind: "persistent" | "transient";
  /** Chunk size in sectors; 0 until known (persistent stores read it from the header). */
  chunkSize: number;
  /** true for "PO": overflow instead of invalidation on snapshot-write COW full. */
  readonly userspaceSupportsOverflow: boolean;
  /**
   * Load stored exceptions (reports each via cb); "invalid" when the header says valid=0. Rejects
   * with StoreError for corrupt/unknown-version headers ("Invalid or corrupt snapshot" ENXIO,
   * "unable to handle snapshot disk version N" EINVAL, "invalid on-disk chunk size N: why." EINVAL)
   * and read errors (EIO). For a brand-new store (magic 0) writes the fresh header and zeroed area 0.
   */
  readMetadata(cb: (oldChunk: number, newChunk: number) => void): Promise<"valid" | "invalid">;
  /** Allocate the next COW chunk (strictly increasing, skipping metadata chunks); null when the COW device is full. Synchronous. */
  prepareException(): number | null;
  /**
   * How many of the next prepareException calls (at most `max`) would return consecutive COW
   * chunks: 0 when the COW device is full. Lets a write over several whole chunks go to the COW
   * device as one write. Stores without it get one chunk at a time.
   */
  consecutiveFree?(max: number): number;
  /**
   * Record (if valid) durably and call done(success) — possibly later (group commit). Called in
   * allocation order, one at a time. Persistent: `done` never runs inside this call; transient:
   * it always does (there is nothing to write).
   */
  commitException(oldChunk: number, newChunk: number, valid: boolean, done: (success: boolean) => void): void;
  /** Persistent only (merge): last not-yet-merged exception and how many consecutive ones precede it; 0 when none left. */
  prepareMerge?(): Promise<{ count: number; oldChunk: number; newChunk: number } | 0>;
  commitMerge?(count: number): Promise<void>;
  /** Mark the store invalid on disk (header valid=0, written from a separate header buffer). Never rejects. */
  dropSnapshot(): Promise<void>;
  /** Sectors: total = COW size, allocated = next_free*cs, metadata = (current_area+2)*cs (transient: next_free sectors / 0). */
  usage(): { total: number; allocated: number; metadata: number };
  /** Table form with its leading space: " P 8", " PO 8", " N 8". */
  statusTable(): string;
  /** Wait for in-flight metadata I/O (used by dtr). */
  drain(): Promise<void>;
}

export interface ExceptionStoreOptions {
  logger?: Logger;
  /**
   * The origin's logical block size in bytes: the kernel also requires the chunk size to be a
   * multiple of it. Default: only the COW device is checked.
   */
  originLogicalBlockSize?: number;
}

/** What the store constructor needs, after argument parsing. */
export interface StoreParams {
  cow: BlockDevice;
  /** 0 = unset. */
  chunkSize: number;
  /** Logical block sizes (bytes) the chunk size must be a multiple of. */
  blockSizes: number[];
  logger?: Logger;
}

/**
 * Parse `<P|PO|N> <chunk_size>` from the front of `args` and build the store. The first letter of
 * the type word picks the store (case-insensitive); the rest is the store's options. Throws
 * StoreError with the kernel's detailed message; `argsUsed` is always 2.
 */
export function createExceptionStore(
  args: readonly string[],
  cow: BlockDevice,
  opts: ExceptionStoreOptions = {},
): { store: ExceptionStore; argsUsed: number } {
  if (args.length < 2) throw new StoreError("Insufficient exception store arguments");
  const [type, chunkArg] = args as [string, string];
  const kind = type.charAt(0).toUpperCase();
  if (kind !== "P" && kind !== "N") throw new StoreError("Exception store type is not P or N");

  const chunkSize = parseUint(chunkArg);
  if (chunkSize === null) throw new StoreError("Invalid chunk size");
  const blockSizes = [cow.logicalBlockSize];
  if (opts.originLogicalBlockSize) blockSizes.push(opts.originLogicalBlockSize);
  if (chunkSize !== 0) {
    const err = chunkSizeError(chunkSize, blockSizes);
    if (err) throw new StoreError(err);
  }

  const params: StoreParams = { cow, chunkSize, blockSizes, ...(opts.logger ? { logger: opts.logger } : {}) };
  const options = type.length > 1 ? type.slice(1) : null;
  let store: ExceptionStore;
  if (kind === "P") {
    let overflow = false;
    if (options !== null) {
      if (options.charAt(0).toUpperCase() !== "O")
        throw new StoreError(`Unsupported persistent store option: ${options}`);
      overflow = true;
    }
    store = new PersistentStore(params, overflow);
  } else {
    store = new TransientStore(params); // transient ignores its options
  }
  return { store, argsUsed: 2 };
}

/** kstrtouint(s, 10): optional '+', decimal digits, an optional trailing newline, ≤ UINT_MAX. */
function parseUint(text: string): number | null {
  const m = /^\+?(\d+)\n?$/.exec(text);
  if (!m) return null;
  const n = Number(m[1]);
  return n <= 0xffff_ffff ? n : null;
}
