/**
 * `dmsetup info -c` / `--columns`: a libdm report (libdm-report.c) over dmsetup's fields
 * (dmsetup.c: FIELD_F/FIELD_O).
 */
import type { DeviceInfo } from "../../../core/device-mapper.js";
import { DmError } from "../../../core/errors.js";
import type { Selection } from "../select.js";
import { type BlkdevNameResolver, DepTree, type GraphDevice } from "./dep-tree.js";
import { DEFAULT_READ_AHEAD } from "./info.js";
import { FIELDS, type Field, type FieldContext, findField } from "./report-fields.js";
import { fieldListHelp, SECTION_PREFIXES } from "./report-help.js";
import { byteLength, padEnd, padStart } from "./text.js";

const DEFAULT_FIELDS = "name,major,minor,attr,open,segments,events,uuid";

export interface InfoColumnsOptions {
  /** `-o` words; a leading `+` (on the first) appends to the default fields. */
  fields?: string | readonly string[];
  /** `-O` keys, each optionally prefixed `+` (ascending, the default) or `-`. */
  sort?: string | readonly string[];
  /** --noheadings: dmsetup's legacy format — no headings, no alignment, `:` separator. */
  noHeadings?: boolean;
  /** --headings none|abbrev (false|true); default: headings unless --noheadings. */
  headings?: boolean;
  /** --separator: also turns alignment off. */
  separator?: string;
  /** --nameprefixes: `DM_FIELD='value'`, unaligned. */
  nameprefixes?: boolean;
  /** --unquoted: no quotes around --nameprefixes values. */
  unquoted?: boolean;
  /** --rows: one line per field. */
  rows?: boolean;
  noOpenCount?: boolean;
  /** Sectors, for the read_ahead field. Default 256. */
  readAhead?: number;
  /** Every mapped device with its dependencies: needed by the deps and tree fields. */
  graph?: readonly GraphDevice[];
  blkdevName?: BlkdevNameResolver;
  /**
   * -S: rows that do not pass it are left out, unless the `selected` field is displayed (it then
   * says 0 for them).
   */
  selection?: Selection;
}

/** The values every field is computed from, one context per device. */
export function fieldContexts(
  infos: readonly DeviceInfo[],
  opts: Pick<InfoColumnsOptions, "graph" | "noOpenCount" | "readAhead" | "blkdevName"> = {},
): FieldContext[] {
  let tree: DepTree | undefined;
  const getTree = () => {
    if (!opts.graph) throw new Error("formatInfoColumns: dependency fields need opts.graph");
    return (tree ??= new DepTree(opts.graph));
  };
  return infos.map((info) => {
    let selected = true; // libdm's row->selected while the selection is checked
    return {
      info,
      noOpenCount: opts.noOpenCount ?? false,
      readAhead: opts.readAhead ?? DEFAULT_READ_AHEAD,
      tree: getTree,
      // A device missing from the graph uses nothing and is used by nothing.
      node: () => getTree().find(info.major, info.minor) ?? { ...info, uses: [], usedBy: [] },
      blkdevName: opts.blkdevName,
      selected: () => selected,
      setSelected: (value: boolean) => (selected = value),
    };
  });
}

const canonical = (id: string) => id.replace(/_/g, "").toLowerCase();

/** `PREFIX_all` (libdm's _all_match): every field of that section, in order; else undefined. */
function sectionFields(word: string): Field[] | undefined {
  const section = Object.entries(SECTION_PREFIXES).find(([, prefix]) => canonical(`${prefix}all`) === canonical(word));
  return section && FIELDS.filter((f) => f.section === section[0]);
}

const isHelp = (word: string) => canonical(word) === "help" || word === "?";

/**
 * What libdm's report setup says about `-o` and `-O` before any device is looked at (dmsetup does
 * it before it opens the driver), null when the report can go ahead: `help` or `?` among them
 * lists the fields (once; the report then shows nothing, status 0); an unknown field lists them
 * too and is named in `error` (status 1). Both go to stderr.
 */
export function checkReportFields(opts: Pick<InfoColumnsOptions, "fields" | "sort">): {
  help: string;
  error?: string;
} | null {
  const help = fieldListHelp({ types: false, all: true });
  let asked = false;
  const fields = words(opts.fields);
  if (fields[0]?.startsWith("+")) fields[0] = fields[0].slice(1);
  for (const w of fields) {
    if (isHelp(w)) asked = true;
    else if (!sectionFields(w) && !findField(w)) return { help, error: `Unrecognised field: ${w}` };
  }
  for (const key of words(opts.sort)) {
    const id = /^[+-]/.test(key) ? key.slice(1) : key;
    if (isHelp(id)) asked = true;
    else if (id !== "" && !findField(id)) return { help, error: `dm_report: Unrecognised field: ${key}` };
  }
  return asked ? { help } : null;
}

/** Whether the device passes the selection (always, without one); the `selected` field follows. */
export function selects(selection: Selection | undefined, c: FieldContext): boolean {
  const passes = selection?.matches((field) => field.get(c)) ?? true;
  c.setSelected(passes);
  return passes;
}

const words = (list: string | readonly string[] | undefined) =>
  (typeof list === "string" ? list : (list ?? []).join(",")).split(",").filter((w) => w !== "");

interface Column {
  field: Field;
  /** Sort keys that are not displayed are hidden columns, as in libdm. */
  hidden: boolean;
  width: number;
}

/**
 * `dmsetup info -c`: a libdm report. Every row is measured before printing (dmsetup buffers), so
 * columns grow to their longest value; aligned output pads every column, the last one included.
 * No rows print nothing, not even headings (dm_report_output returns early).
 */
export function formatInfoColumns(infos: readonly DeviceInfo[], opts: InfoColumnsOptions = {}): string {
  let spec = words(opts.fields).join(",");
  if (opts.fields === undefined) spec = DEFAULT_FIELDS;
  else if (spec.startsWith("+")) spec = `${DEFAULT_FIELDS},${spec.slice(1)}`;
  const columns: Column[] = words(spec).flatMap((w) => {
    const fields = sectionFields(w) ?? [findField(w)];
    return fields.map((field) => {
      if (!field) throw new DmError("EINVAL", `Unrecognised field: ${w}`);
      return { field, hidden: false, width: field.width };
    });
  });

  const keys: { column: Column; descending: boolean }[] = [];
  for (const key of words(opts.sort)) {
    const descending = key.startsWith("-");
    const id = /^[+-]/.test(key) ? key.slice(1) : key;
    if (id === "")
      throw new DmError("EINVAL", `dm_report: Missing sort field name\ndm_report: Unrecognised field: ${key}`);
    const field = findField(id);
    if (!field) throw new DmError("EINVAL", `dm_report: Unrecognised field: ${key}`);
    let column = columns.find((c) => c.field === field);
    if (!column) columns.unshift((column = { field, hidden: true, width: field.width }));
    if (!keys.some((k) => k.column === column)) keys.push({ column, descending }); // libdm ignores repeats
  }

  const showSelected = columns.some((c) => !c.hidden && c.field.id === "selected");
  const rows: Map<Column, string | number>[] = [];
  for (const c of fieldContexts(infos, opts)) {
    if (!selects(opts.selection, c) && !showSelected) continue;
    rows.push(new Map(columns.map((col) => [col, col.field.get(c)])));
  }
  if (rows.length === 0) return "";
  for (const row of rows) {
    for (const [col, v] of row) col.width = Math.max(col.width, byteLength(String(v)));
  }

  // Stable, like the glibc merge sort libdm's qsort gets; numbers compare as uint64 (-1 is huge).
  const sortValue = (v: string | number) => (typeof v === "number" && v < 0 ? 2 ** 64 + v : v);
  rows.sort((a, b) => {
    for (const { column, descending } of keys) {
      const x = sortValue(a.get(column)!);
      const y = sortValue(b.get(column)!);
      const cmp =
        typeof x === "number" && typeof y === "number"
          ? x - y
          : Buffer.compare(Buffer.from(String(x)), Buffer.from(String(y)));
      if (cmp !== 0) return (cmp > 0 ? 1 : -1) * (descending ? -1 : 1);
    }
    return 0;
  });

  // _report_init: --noheadings emulates the old format; --separator, --nameprefixes and --rows
  // all switch alignment off.
  const separator = opts.separator ?? (opts.noHeadings ? ":" : " ");
  const aligned = !opts.noHeadings && opts.separator === undefined && !opts.nameprefixes && !opts.rows;
  const headings = opts.headings ?? !opts.noHeadings;
  const quote = opts.unquoted ? "" : "'";
  const cell = (col: Column, value: string | number) => {
    const s = String(value);
    const text = !aligned ? s : col.field.num ? padStart(s, col.width) : padEnd(s, col.width);
    return opts.nameprefixes ? `DM_${col.field.id.toUpperCase()}=${quote}${text}${quote}` : text;
  };
  // Aligned headings are left-aligned and cut to the column width ("%-*.*s").
  const heading = (col: Column) =>
    aligned ? padEnd(col.field.heading.slice(0, col.width), col.width) : col.field.heading;
  const visible = columns.filter((c) => !c.hidden);

  if (opts.rows) {
    return visible
      .map(
        (col) =>
          `${headings ? col.field.heading + separator : ""}${rows.map((r) => cell(col, r.get(col)!)).join(separator)}\n`,
      )
      .join("");
  }
  let out = headings ? `${visible.map(heading).join(separator)}\n` : "";
  for (const row of rows) out += `${visible.map((col) => cell(col, row.get(col)!)).join(separator)}\n`;
  return out;
}
