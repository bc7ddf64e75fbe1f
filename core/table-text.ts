/**
 * dmsetup's side of tables: turning table text (from --table, a file, or stdin) into target specs
 * and back, as lvm2's tools/dmsetup.c reads and prints them. The kernel side (validation, constructors) is in table.ts.
 */
import { parseUnsigned } from "./args.js";
import { DmError } from "./errors.js";

/** One table line as the kernel receives it (struct dm_target_spec). */
export interface TargetSpec {
  start: number;
  length: number;
  type: string;
  params: string;
}

/**
 * Parse table text. Blank lines and `#` comment lines are skipped; anything from a `#` on is cut
 * off; the first three fields must be `<start> <length> <type>`. `source` names the table in
 * errors exactly as dmsetup does: a file path, or "on stdin"... callers pass what dmsetup prints.
 */
export function parseTableText(text: string, source = "on stdin"): TargetSpec[] {
  const specs: TargetSpec[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === "" || line.startsWith("#")) continue;
    const m = /^(\S+)\s+(\S+)\s+(\S+)(?:\s+(.*))?$/s.exec(line);
    const start = m ? parseUnsigned(m[1]!) : null;
    const length = m ? parseUnsigned(m[2]!) : null;
    if (!m || start === null || length === null || m[3]!.startsWith("#")) {
      throw new DmError("EINVAL", `Invalid format on line ${i + 1} of table ${source}.`);
    }
    const type = m[3]!;
    if (type.length > 15) {
      // libdevmapper refuses before the kernel sees it (DM_MAX_TYPE_NAME is 16 with the NUL).
      throw new DmError("EINVAL", `Target type name ${type} is too long.`);
    }
    let params = m[4] ?? "";
    const hash = params.indexOf("#");
    if (hash >= 0) params = params.slice(0, hash);
    specs.push({ start, length, type, params: params.trimEnd() });
  }
  return specs;
}

/** `<start> <length> <type> <params>`, with the space after the type even when params are empty. */
export function formatTableLine(start: number, length: number, type: string, params: string): string {
  return `${start} ${length} ${type} ${params}`;
}
