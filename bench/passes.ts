/** Seeded orders and write passes for the in-process benchmarks (bench/snapshot.ts, bench/thin.ts). */
import { randomFillSync } from "node:crypto";
import type { DeviceHandle } from "../core/device-mapper.js";

/** A seeded permutation of 0..n-1 (xorshift + Fisher–Yates). */
export function permutation(n: number, seed: number): Uint32Array {
  const p = new Uint32Array(n);
  for (let i = 0; i < n; i++) p[i] = i;
  let x = seed >>> 0 || 1;
  for (let i = n - 1; i > 0; i--) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    const j = x % (i + 1);
    const t = p[i]!;
    p[i] = p[j]!;
    p[j] = t;
  }
  return p;
}

/**
 * Write `blockBytes` at every block index of `order` with `writers` requests in flight (FUA
 * writes with `fua`); the seconds it took.
 */
export async function writePass(
  handle: DeviceHandle,
  order: Uint32Array,
  blockBytes: number,
  writers: number,
  fua = false,
): Promise<number> {
  let next = 0;
  const sectors = blockBytes / 512;
  const worker = async () => {
    const buf = randomFillSync(Buffer.allocUnsafe(blockBytes));
    while (next < order.length) {
      const block = order[next++]!;
      await handle.write(block * sectors, buf, { fua });
    }
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: writers }, worker));
  return (performance.now() - t0) / 1000;
}
