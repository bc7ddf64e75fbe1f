/**
 * A small seeded PRNG (sfc32) for fuzzing and soak tests: the same seed gives the same sequence,
 * so a failure can be replayed by setting the seed variable the test prints.
 */
import crypto from "node:crypto";

// One generator for the package (the crash runner) and the tests.
export { Rng } from "../crash/rng.js";

/**
 * The seed for a test: `$<envName>` when set (decimal or 0x hex), else a fresh random one. The
 * caller prints it so that a failing run can be repeated.
 */
export function seedFrom(envName: string): number {
  const text = process.env[envName];
  if (text !== undefined && text !== "") {
    const n = Number(text);
    if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${envName}=${text}: expected a non-negative integer`);
    return n >>> 0;
  }
  return crypto.randomBytes(4).readUInt32LE(0);
}
