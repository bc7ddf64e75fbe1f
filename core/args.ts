/**
 * Argument parsing with the kernel's exact semantics (dm-table.c: dm_split_args, dm_read_arg): how a table line's
 * parameter string is split, and how targets read numbers from it.
 */
import { TargetError } from "./target.js";

export const UINT_MAX = 0xffff_ffff;

/** `isspace` as the kernel's dm_split_args sees it, for the ASCII range (space, \t \n \v \f \r). */
function isSpace(c: string): boolean {
  return c === " " || (c >= "\t" && c <= "\r");
}

/**
 * dm_split_args: split on whitespace; a backslash quotes the next character (and is removed);
 * runs of whitespace collapse. A backslash with nothing after it quotes nothing and stays as a
 * literal character (the kernel only fails to split when it cannot allocate the argv array, so
 * this never fails).
 */
export function splitArgs(params: string): string[] {
  const args: string[] = [];
  let i = 0;
  const n = params.length;
  for (;;) {
    while (i < n && isSpace(params[i]!)) i++;
    if (i >= n) break;
    let cur = "";
    while (i < n) {
      const c = params[i]!;
      if (c === "\\" && i + 1 < n) {
        cur += params[i + 1];
        i += 2;
        continue;
      }
      if (isSpace(c)) break;
      cur += c;
      i++;
    }
    args.push(cur);
  }
  return args;
}

/**
 * A failed dm_get_device, as a target's ctr reports it: the target's own message (`ti->error`,
 * e.g. "Device lookup failed"), then what the lookup said (which path, and why: "Device lookup
 * failed: /var/tmp/disk.img: no such file or block device", where the kernel's log line has only
 * the errno), with the lookup's errno (ENOENT for a missing path, EINVAL for the device itself,
 * ...), which is what the ctr returns and the load ioctl fails with.
 */
export function deviceLookupError(message: string, err: unknown): TargetError {
  const code = (err as { code?: unknown } | null)?.code;
  const why = err instanceof Error && err.message ? `: ${err.message}` : "";
  return new TargetError(`${message}${why}`, typeof code === "string" && /^E[A-Z0-9]+$/.test(code) ? code : "ENODEV");
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
