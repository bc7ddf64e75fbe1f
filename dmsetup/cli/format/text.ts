/** Text helpers shared by the dmsetup output formats. */
/** printf pads and measures in bytes, not characters. */
export const byteLength = (s: string) => Buffer.byteLength(s);
export const padEnd = (s: string, width: number) => s + " ".repeat(Math.max(0, width - byteLength(s)));
export const padStart = (s: string, width: number) => " ".repeat(Math.max(0, width - byteLength(s))) + s;

/** Pretty JSON (two-space indent, keys in the objects' own order) and a newline. */
export function toJson(value: unknown): string {
  return `${JSON.stringify(value, (_k, v: unknown) => (typeof v === "bigint" ? v.toString() : v), 2)}\n`;
}
