/** Option values of the crash runners' command lines (test/crash/cli.ts, testing/thin-crash/cli.ts). */

/** A bad command line: the runner prints the message and its usage, and exits 2. */
export class UsageError extends Error {}

/** `--NAME TEXT` as a non-negative integer (undefined when the option is absent). */
export function integer(name: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (text === "" || !Number.isSafeInteger(value) || value < 0) {
    throw new UsageError(`--${name}: expected a non-negative integer, got ${text === "" ? "nothing" : text}`);
  }
  return value;
}

/** `--NAME TEXT` as a probability from 0 to 1 (undefined when the option is absent). */
export function probability(name: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (!(value >= 0 && value <= 1)) throw new UsageError(`--${name}: expected a probability from 0 to 1`);
  return value;
}
