/**
 * `dmsetup info -c` / `--columns`: a libdm report (libdm-report.c) over dmsetup's fields
 * (dmsetup.c: FIELD_F/FIELD_O).
 */
import type { DeviceInfo } from "../../../core/device-mapper.js";
import { DmError } from "../../../core/errors.js";
import { type BlkdevNameResolver, blkdevOf, DepTree, type GraphDevice, type GraphNode } from "./dep-tree.js";
import { DEFAULT_READ_AHEAD } from "./info.js";
import { mangle, unmangle, unquoteLvm } from "./names.js";
import { byteLength, padEnd, padStart } from "./text.js";

interface FieldContext {
  info: DeviceInfo;
  noOpenCount: boolean;
  readAhead: number;
  tree: () => DepTree;
  node: () => GraphNode;
  blkdevName?: BlkdevNameResolver;
}

interface Field {
  id: string;
  heading: string;
  /** Minimum width; columns grow to their longest value. */
  width: number;
  /** Numbers are right-aligned and sort numerically. */
  num?: true;
  get(c: FieldContext): string | number;
}

const DEFAULT_FIELDS = "name,major,minor,attr,open,segments,events,uuid";

function splitName(c: FieldContext): { subsystem: string; vg: string; lv: string; layer: string } {
  const dash = c.info.uuid.indexOf("-");
  const subsystem = dash < 0 ? "" : c.info.uuid.slice(0, dash);
  if (subsystem !== "LVM") return { subsystem, vg: "", lv: "", layer: "" };
  const [vg, rest] = unquoteLvm(c.info.name);
  const [lv, rest2] = unquoteLvm(rest);
  return { subsystem, vg, lv, layer: unquoteLvm(rest2)[0] };
}

/** Mapped devices a node uses, or that use it (the root and non-dm nodes have no name). */
const dmNames = (nodes: GraphNode[]) =>
  nodes
    .filter((n) => n.device)
    .map((n) => n.name)
    .join(",");
const devnos = (nodes: GraphNode[]) =>
  nodes
    .filter((n) => n.path !== undefined || n.major || n.minor)
    .map((n) => n.path ?? `${n.major}:${n.minor}`)
    .join(",");

/** dmsetup's report fields (FIELD_F/FIELD_O in dmsetup.c) that udm can compute. */
const FIELDS: Field[] = [
  { id: "name", heading: "Name", width: 16, get: (c) => c.info.name },
  { id: "mangled_name", heading: "MangledName", width: 16, get: (c) => mangle(c.info.name) },
  { id: "unmangled_name", heading: "UnmangledName", width: 16, get: (c) => unmangle(c.info.name) },
  { id: "uuid", heading: "UUID", width: 32, get: (c) => c.info.uuid },
  { id: "mangled_uuid", heading: "MangledUUID", width: 32, get: (c) => mangle(c.info.uuid) },
  { id: "unmangled_uuid", heading: "UnmangledUUID", width: 32, get: (c) => unmangle(c.info.uuid) },
  { id: "read_ahead", heading: "RAhead", width: 6, num: true, get: (c) => c.readAhead },
  { id: "blkdevname", heading: "BlkDevName", width: 16, get: (c) => `dm-${c.info.minor}` },
  {
    id: "attr",
    heading: "Stat",
    width: 4,
    get: ({ info: i }) =>
      (i.livePresent ? "L" : "-") +
      (i.inactivePresent ? "I" : "-") +
      (i.suspended ? "s" : "-") +
      (i.readOnly ? "r" : "w"),
  },
  {
    id: "tables_loaded",
    heading: "Tables",
    width: 6,
    get: ({ info: i }) =>
      i.livePresent ? (i.inactivePresent ? "Both" : "Live") : i.inactivePresent ? "Inactive" : "None",
  },
  { id: "suspended", heading: "Suspended", width: 9, get: (c) => (c.info.suspended ? "Suspended" : "Active") },
  { id: "readonly", heading: "Read-only", width: 9, get: (c) => (c.info.readOnly ? "Read-only" : "Writeable") },
  { id: "devno", heading: "DevNo", width: 5, get: (c) => `${c.info.major}:${c.info.minor}` },
  { id: "major", heading: "Maj", width: 3, num: true, get: (c) => c.info.major },
  { id: "minor", heading: "Min", width: 3, num: true, get: (c) => c.info.minor },
  // --noopencount: the kernel is not asked, libdm reports -1.
  { id: "open", heading: "Open", width: 4, num: true, get: (c) => (c.noOpenCount ? -1 : c.info.openCount) },
  { id: "segments", heading: "Targ", width: 4, num: true, get: (c) => c.info.targetCount },
  { id: "events", heading: "Event", width: 6, num: true, get: (c) => c.info.eventNr },
  {
    id: "device_count",
    heading: "#Devs",
    width: 5,
    num: true,
    get: (c) => c.node().uses.filter((n) => n !== c.tree().root).length,
  },
  { id: "devs_used", heading: "DevNamesUsed", width: 16, get: (c) => dmNames(c.node().uses) },
  { id: "devnos_used", heading: "DevNosUsed", width: 16, get: (c) => devnos(c.node().uses) },
  {
    id: "blkdevs_used",
    heading: "BlkDevNamesUsed",
    width: 16,
    get: (c) =>
      c
        .node()
        .uses.filter((n) => n !== c.tree().root)
        .map((n) => {
          const name = blkdevOf(n, c.blkdevName);
          if (name === undefined)
            throw new DmError("ENODEV", `Could not resolve block device name for ${n.major}:${n.minor}.`);
          return name;
        })
        .join(","),
  },
  { id: "device_ref_count", heading: "#Refs", width: 5, num: true, get: (c) => c.tree().numChildren(c.node(), true) },
  { id: "names_using_dev", heading: "RefNames", width: 8, get: (c) => dmNames(c.node().usedBy) },
  { id: "devnos_using_dev", heading: "RefDevNos", width: 9, get: (c) => devnos(c.node().usedBy) },
  { id: "subsystem", heading: "Subsys", width: 6, get: (c) => splitName(c).subsystem },
  { id: "vg_name", heading: "VG", width: 4, get: (c) => splitName(c).vg },
  { id: "lv_name", heading: "LV", width: 4, get: (c) => splitName(c).lv },
  { id: "lv_layer", heading: "LVLayer", width: 7, get: (c) => splitName(c).layer },
];

/** Field ids are matched case-insensitively, as libdm does. */
const findField = (id: string) => FIELDS.find((f) => f.id === id.toLowerCase());

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
  const columns: Column[] = words(spec).map((w) => {
    const field = findField(w);
    if (!field) throw new DmError("EINVAL", `Unrecognised field: ${w}`);
    return { field, hidden: false, width: field.width };
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

  let tree: DepTree | undefined;
  const getTree = () => {
    if (!opts.graph) throw new Error("formatInfoColumns: dependency fields need opts.graph");
    return (tree ??= new DepTree(opts.graph));
  };
  const rows = infos.map((info) => {
    const c: FieldContext = {
      info,
      noOpenCount: opts.noOpenCount ?? false,
      readAhead: opts.readAhead ?? DEFAULT_READ_AHEAD,
      tree: getTree,
      // A device missing from the graph uses nothing and is used by nothing.
      node: () => getTree().find(info.major, info.minor) ?? { ...info, uses: [], usedBy: [] },
      blkdevName: opts.blkdevName,
    };
    return new Map(columns.map((col) => [col, col.field.get(c)]));
  });
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
