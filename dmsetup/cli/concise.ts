/**
 * dmsetup's concise device format (lvm2 libdm/libdm-common.c and dmsetup.c: `--concise`), used by `create --concise` and
 * `table --concise`:
 *
 *   <name>,<uuid>,<minor>,<flags>,<table line>[,<table line>...][;<next device>...]
 *
 * A backslash makes the next character literal (how `,`, `;` and `\` are written inside a field).
 * The parser follows lvm2's _create_concise character by character, including its messages and
 * its quirks (noted below), so udmsetup accepts and rejects exactly what dmsetup does.
 */
import type { TableLine } from "../../core/device-mapper.js";
import { DmError } from "../../core/errors.js";
import { parseTableText } from "../../core/table-text.js";

export interface ConciseDevice {
  name: string;
  /** Empty when not given. */
  uuid: string;
  /** The requested minor, when given (dmsetup reads it with atoi). */
  minor?: number;
  readOnly: boolean;
  table: TableLine[];
}

const isSpace = (c: string | undefined) => c !== undefined && " \t\n\v\f\r".includes(c);

/** C's atoi: optional blanks and sign, then digits; anything else ends the number (or gives 0). */
function atoi(s: string): number {
  const m = /^[ \t\n\v\f\r]*([+-]?\d+)/.exec(s);
  return m ? Math.trunc(Number(m[1])) | 0 : 0;
}

/** The second line of every field-count error; fields not reached print as glibc's `(null)`. */
function parsedFields(fields: (string | null)[], f: number): string {
  const [name, uuid, minor, flags, table] = fields.map((x) => x ?? "(null)");
  return `Parsed ${f + 1} fields: name: ${name} uuid: ${uuid} minor: ${minor} flags: ${flags} table: ${table}`;
}

function toDevice(fields: string[]): ConciseDevice {
  const [name, uuid, minor, flags, table] = fields as [string, string, string, string, string];
  if (flags !== "" && flags !== "ro" && flags !== "rw") {
    throw new DmError("EINVAL", `Invalid flags parameter '${flags}' must be 'ro' or 'rw' or empty.`);
  }
  // Table lines are parsed as --table text is; dmsetup names this table "" in its errors
  // ("Invalid format on line 2 of table .").
  const specs = parseTableText(table, "");
  return {
    name,
    uuid,
    ...(minor !== "" ? { minor: atoi(minor) } : {}),
    readOnly: flags === "ro",
    table: specs.map((t) => ({ start: t.start, length: t.length, type: t.type, params: t.params })),
  };
}

/**
 * Parse concise text one device at a time: dmsetup creates each device as soon as it is parsed,
 * so an error in a later device comes after the earlier ones exist. Callers that want that
 * behaviour iterate; `parseConcise` collects everything first.
 */
export function* iterateConcise(input: string): Generator<ConciseDevice> {
  const nul = input.indexOf("\0");
  const text = nul < 0 ? input : input.slice(0, nul); // a C string ends at the first NUL
  let fields: (string | null)[] = ["", null, null, null, null];
  let f = 0;
  const fail = (message: string): never => {
    throw new DmError("EINVAL", `${message}\n${parsedFields(fields, f)}`);
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i]!;
    if (c === "\\") {
      if (i + 1 >= text.length) fail("Backslash must be followed by another character at end of string.");
      fields[f] += text[i + 1]!;
      i += 2;
      continue;
    }
    if (c === ",") {
      i++;
      if (f < 4) {
        fields[++f] = "";
        while (isSpace(text[i])) i++; // blanks after a field-separating comma are skipped
      } else {
        fields[4] += "\n"; // further commas separate table lines
      }
      continue;
    }
    // Quirk: the last character of the input ends the device like `;` does — unless it was
    // escaped or was a comma (handled above), which leaves the entry incomplete.
    if (c === ";" || i + 1 === text.length) {
      if (c !== ";") fields[f] += c;
      i++;
      if (f !== 4) fail("Five comma-separated fields are required for each device");
      yield toDevice(fields as string[]);
      fields = ["", null, null, null, null];
      f = 0;
      while (isSpace(text[i])) i++;
      continue;
    }
    fields[f] += c;
    i++;
  }
  if (f > 0 || fields[0] !== "") fail("Incomplete entry: five comma-separated fields are required for each device");
}

/** Parse a whole concise specification (what `create --concise` reads). */
export function parseConcise(text: string): ConciseDevice[] {
  return [...iterateConcise(text)];
}

/** Backslash-quote the characters that are special in the concise format: `,` `;` `\`. */
export function quoteConcise(s: string): string {
  return s.replace(/[,;\\]/g, "\\$&");
}

/**
 * `dmsetup table --concise`: every device on one line, `;` between devices, then a newline; no
 * devices, no output at all. The minor and `rw`/`ro` are always printed; the uuid may be empty.
 * Start, length and type are printed as they are, name, uuid and params quoted.
 */
export function formatConcise(
  devices: readonly { name: string; uuid: string; minor: number; readOnly: boolean; table: readonly TableLine[] }[],
): string {
  if (devices.length === 0) return "";
  const one = (d: (typeof devices)[number]) =>
    `${quoteConcise(d.name)},${quoteConcise(d.uuid)},${d.minor},${d.readOnly ? "ro" : "rw"}` +
    d.table.map((l) => `,${l.start} ${l.length} ${l.type} ${quoteConcise(l.params)}`).join("");
  return `${devices.map(one).join(";")}\n`;
}
