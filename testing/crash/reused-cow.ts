/**
 * What a reused COW volume holds when a new snapshot is created on it: garbage everywhere, an
 * older persistent store's metadata areas and records (from a snapshot that used the volume
 * before, possibly with another chunk size), and a zeroed start, so the header's magic reads 0
 * and the new store takes the device for a fresh one (dm-snap-persistent.c: read_header). A store
 * that ever lets its loader walk into an area it has not written itself loads the older store's
 * records as its own.
 */
import { SECTOR_SIZE } from "../../core/bio.js";
import { cowImageChunks } from "../../targets/snapshot/cow-image.js";
import { exceptionsPerArea, skipMetadata } from "../../targets/snapshot/cow-format.js";
import { Rng } from "../rng.js";

/** Bytes zeroed at the start of the volume before the new snapshot is created. */
export const WIPED_BYTES = 4096;

export interface ReusedCowSpec {
  /** Size of the COW device in sectors. */
  sectors: number;
  /** Chunk size (sectors) of the older store. */
  staleChunkSize: number;
  /**
   * Origin size in sectors: the older store's records name origin chunks inside it (and beyond
   * it when it has more records than the origin has chunks: its origin was bigger).
   */
  originSectors: number;
  /** Seed of the garbage and of the older store's origin chunks. */
  seed: number;
}

/** The device's content: garbage, the older store (as many records as fit), the start zeroed. */
export function reusedCowImage(spec: ReusedCowSpec): Buffer {
  const rng = new Rng(spec.seed);
  const image = Buffer.alloc(spec.sectors * SECTOR_SIZE); // not pooled: word-aligned
  // Garbage from a xorshift of the seed (cheap: a COW device is megabytes).
  const words = new Uint32Array(image.buffer, image.byteOffset, image.length / 4);
  let x = rng.u32() | 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x;
  }
  const cs = spec.staleChunkSize;
  const chunks = Math.floor(spec.sectors / cs);
  const originChunks = Math.ceil(spec.originSectors / cs);
  // As many records as have their data chunk on the device, each naming a distinct origin chunk.
  let records = 0;
  for (let next = 2; ; records++) {
    next = skipMetadata(exceptionsPerArea(cs), next + 1);
    if (next > chunks) break;
  }
  const span = Math.max(originChunks, records);
  const step = coprimeStep(span, rng.range(3, 97));
  const offset = rng.int(span);
  const layout = cowImageChunks({ chunkSize: cs, exceptions: records, oldChunk: (i) => (offset + i * step) % span });
  for (let item = layout.next(); !item.done; item = layout.next()) {
    const { chunk, data } = item.value;
    if ((chunk + 1) * cs <= spec.sectors) data.copy(image, chunk * cs * SECTOR_SIZE);
  }
  image.fill(0, 0, Math.min(WIPED_BYTES, image.length));
  return image;
}

/** The first number from `from` on that shares no factor with `n`: i → i·step mod n is then a permutation. */
function coprimeStep(n: number, from: number): number {
  const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));
  let step = from;
  while (gcd(step, n) !== 1) step++;
  return step;
}
