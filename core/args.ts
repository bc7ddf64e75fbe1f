/**
 * Argument parsing with the kernel's exact semantics (dm-reference §2.14): how a table line's
 * parameter string is split, and how targets read numbers from it.
 */
import { TargetError } from "./target.js";

export const UINT_MAX = 0xffff_ffff;

/**
 * dm_split_args: split on whitespace; a backslash quotes the next character (and is removed);
 * runs of whitespace collapse. Returns null where the kernel fails ("couldn't split parameters"):
 * a trailing lone backslash has nothing to quote.
 */
export function splitArgs(params: string): string[] | null {
  const args: string[] = [];
  let cur = "";
  let inArg = false;
  for (let i = 0; i < params.length; i++) {
    const c = params[i]!;
    if (c === "\\") {
      if (i + 1 >= params.length) return null;
      cur += params[++i];
      inArg = true;
    } else if (/\s/.test(c)) {
      if (inArg) args.push(cur);
      cur = "";
      inArg = false;
    } else {
      cur += c;
      inArg = true;
    }
  }
  if (inArg) args.push(cur);
  return args;
}

/** Parse an unsigned decimal (`%llu` with nothing after it, no sign), or null. */
export function parseUnsigned(text: string, max = Number.MAX_SAFE_INTEGER): number | null {
  if (!/^\d+$/.test(text)) return null;
  const n = Number(text);
  return n <= max ? n : null;
}

/** A sector number as linear/striped/snapshot read it; null on garbage or overflow. */
export function parseSector(text: string): number | null {
  return parseUnsigned(text);
}

/** The kernel's `struct dm_arg`: bounds plus the error message used when they are violated. */
export interface ArgSpec {
  min: number;
  max: number;
  error: string;
}

/** The kernel's `struct dm_arg_set`: a cursor over a target's arguments. */
export class ArgReader {
  private pos = 0;
  constructor(private readonly args: readonly string[]) {}

  get remaining(): number {
    return this.args.length - this.pos;
  }

  /** dm_shift_arg: the next argument, or undefined when none is left. */
  shift(): string | undefined {
    return this.pos < this.args.length ? this.args[this.pos++] : undefined;
  }

  /** dm_read_arg: an unsigned number within [min, max], else TargetError(spec.error). */
  readArg(spec: ArgSpec): number {
    const text = this.shift();
    const n = text === undefined ? null : parseUnsigned(text, UINT_MAX);
    if (n === null || n < spec.min || n > spec.max) throw new TargetError(spec.error);
    return n;
  }

  /** dm_read_arg_group: as readArg, and at least that many further arguments must remain. */
  readArgGroup(spec: ArgSpec): number {
    const n = this.readArg(spec);
    if (n > this.remaining) throw new TargetError(spec.error);
    return n;
  }

  /** dm_consume_args. */
  consume(n: number): void {
    this.pos = Math.min(this.args.length, this.pos + n);
  }
}
