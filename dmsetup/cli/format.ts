/**
 * dmsetup's output formats (dm-reference §6.2) as pure functions: device data in, the exact text
 * dmsetup prints out, trailing newline(s) included. Widths, alignment and quirks follow lvm2's
 * dmsetup.c and libdm-report.c; the comments name the dmsetup behaviour each rule reproduces.
 */
import type { DeviceInfo, TableLine } from "../../core/device-mapper.js";
import { DmError } from "../../core/errors.js";

/**
 * A device another one uses: a block device number (with its dm name when it is a mapped device,
 * and its kernel name when known), or — udm extension — a backing file, which has no number.
 */
export type DepRef = { major: number; minor: number; name?: string; blkdevname?: string } | { path: string };

/** How `-o devno|blkdevname|devname` names a device. */
export type DevNameFormat = "devno" | "blkdevname" | "devname";

/** Resolves a non-dm device number to its kernel name (`sdb`), as libdm does through sysfs. */
export type BlkdevNameResolver = (major: number, minor: number) => string | undefined;

/** The kernel's default read-ahead for a new block device, in sectors. */
export const DEFAULT_READ_AHEAD = 256;

/** printf pads and measures in bytes, not characters. */
const byteLength = (s: string) => Buffer.byteLength(s);
const padEnd = (s: string, width: number) => s + " ".repeat(Math.max(0, width - byteLength(s)));
const padStart = (s: string, width: number) => " ".repeat(Math.max(0, width - byteLength(s))) + s;

// ---- info (long form) ----

export interface InfoLongOptions {
  noOpenCount?: boolean;
  /** Sectors; null omits the line (libdm could not read it). Default 256. */
  readAhead?: number | null;
}

/** `dmsetup info`: one block per device, labels padded to column 19, always a blank line after. */
export function formatInfoLong(info: DeviceInfo & { deferredRemove?: boolean }, opts: InfoLongOptions = {}): string {
  const readAhead = opts.readAhead === undefined ? DEFAULT_READ_AHEAD : opts.readAhead;
  const tables = [info.livePresent && "LIVE", info.inactivePresent && "INACTIVE"].filter(Boolean).join(" & ");
  let s = `Name:              ${info.name}\n`;
  s += `State:             ${info.suspended ? "SUSPENDED" : "ACTIVE"}`;
  s += `${info.readOnly ? " (READ-ONLY)" : ""}${info.deferredRemove ? " (DEFERRED REMOVE)" : ""}\n`;
  if (readAhead !== null) s += `Read Ahead:        ${readAhead}\n`;
  s += `Tables present:    ${tables || "None"}\n`;
  if (!opts.noOpenCount) s += `Open count:        ${info.openCount}\n`;
  s += `Event number:      ${info.eventNr}\n`;
  s += `Major, minor:      ${info.major}, ${info.minor}\n`;
  // The kernel's target_count: the live table's (0 without one), or the inactive one's with
  // --inactive; DeviceInfo.targetCount already is that. libdm reports -1 for "unknown".
  if (info.targetCount >= 0) s += `Number of targets: ${info.targetCount}\n`;
  // Not aligned with the other labels: dmsetup prints "UUID: %s".
  if (info.uuid) s += `UUID: ${info.uuid}\n`;
  return `${s}\n`;
}

// ---- the dependency tree (ls --tree and the report's relationship fields) ----

/** One mapped device and what it uses, in the order DM_TABLE_DEPS reports them. */
export interface GraphDevice {
  name: string;
  major: number;
  minor: number;
  deps: readonly DepRef[];
  uuid?: string;
  suspended?: boolean;
  readOnly?: boolean;
  openCount?: number;
}

interface GraphNode {
  name: string;
  major: number;
  minor: number;
  path?: string;
  device?: GraphDevice;
  uses: GraphNode[];
  usedBy: GraphNode[];
}

/**
 * libdm's dm_tree as dmsetup builds it: every device is added under a root in list order, its
 * dependencies recursively under it. A node used by another leaves the top level (the root's
 * `uses`); a node using nothing sits on the bottom level (it `uses` the root). Children keep
 * insertion order, which is where dmsetup's output order comes from.
 */
class DepTree {
  readonly root: GraphNode = { name: "", major: 0, minor: 0, uses: [], usedBy: [] };
  private readonly nodes = new Map<string, GraphNode>();
  private readonly devices = new Map<string, GraphDevice>();

  constructor(devices: readonly GraphDevice[]) {
    for (const d of devices) this.devices.set(`${d.major}:${d.minor}`, d);
    for (const d of devices) this.add(this.root, d);
  }

  find(major: number, minor: number): GraphNode | undefined {
    return this.nodes.get(`${major}:${minor}`);
  }

  /** dm_tree_node_num_children: 0 for a node on the top (inverted) or bottom level. */
  numChildren(node: GraphNode, inverted: boolean): number {
    if (inverted) return this.root.uses.includes(node) ? 0 : node.usedBy.length;
    return node.uses.includes(this.root) ? 0 : node.uses.length;
  }

  private add(parent: GraphNode, ref: DepRef | GraphDevice): void {
    const key = "path" in ref ? `path:${ref.path}` : `${ref.major}:${ref.minor}`;
    let node = this.nodes.get(key);
    const fresh = !node;
    if (!node) {
      const device = this.devices.get(key);
      node = "path" in ref
        ? { name: ref.path, major: 0, minor: 0, path: ref.path, uses: [], usedBy: [] }
        : { name: device?.name ?? "", major: ref.major, minor: ref.minor, device, uses: [], usedBy: [] };
      this.nodes.set(key, node);
    }
    this.linkTree(parent, node);
    if (!fresh) return;
    const deps = node.device?.deps ?? [];
    if (deps.length === 0) return this.link(node, this.root);
    for (const dep of deps) this.add(node, dep);
  }

  private linkTree(parent: GraphNode, child: GraphNode): void {
    if (parent === this.root) {
      if (this.numChildren(child, true) > 0) return; // already used by a device: not a root
    } else {
      this.unlink(this.root, child);
    }
    this.unlink(parent, this.root);
    this.link(parent, child);
  }

  private link(parent: GraphNode, child: GraphNode): void {
    if (parent.uses.includes(child)) return;
    parent.uses.push(child);
    child.usedBy.push(parent);
  }

  private unlink(parent: GraphNode, child: GraphNode): void {
    const i = parent.uses.indexOf(child);
    if (i < 0) return;
    parent.uses.splice(i, 1);
    child.usedBy.splice(child.usedBy.indexOf(parent), 1);
  }
}

// ---- info -c / --columns (libdm-report) ----

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

/** Mapped devices a node uses, or that use it (the root and non-dm nodes have no name). */
const dmNames = (nodes: GraphNode[]) => nodes.filter((n) => n.device).map((n) => n.name).join(",");
const devnos = (nodes: GraphNode[]) =>
  nodes.filter((n) => n.path !== undefined || n.major || n.minor).map((n) => n.path ?? `${n.major}:${n.minor}`).join(",");

function blkdevOf(n: GraphNode, resolve: BlkdevNameResolver | undefined): string | undefined {
  if (n.path !== undefined) return n.path;
  return n.device ? `dm-${n.minor}` : resolve?.(n.major, n.minor);
}

/**
 * libdm's name mangling ("auto" mode): bytes outside udev's whitelist become `\xNN`; a `\x..`
 * sequence is taken as already mangled and kept.
 */
function mangle(s: string): string {
  const b = Buffer.from(s);
  let out = "";
  for (let i = 0; i < b.length; i++) {
    const c = String.fromCharCode(b[i]!);
    if (c === "\\" && b[i + 1] === 0x78 && i + 3 < b.length) {
      out += b.subarray(i, i + 4).toString("latin1");
      i += 3;
    } else {
      out += /[0-9A-Za-z#+\-.:=@_]/.test(c) ? c : `\\x${b[i]!.toString(16).padStart(2, "0")}`;
    }
  }
  return out;
}
const unmangle = (s: string) =>
  Buffer.from(s.replace(/\\x([0-9a-fA-F]{2})/g, (_m, h: string) => String.fromCharCode(parseInt(h, 16))), "latin1").toString();

/** One step of dm_split_lvm_name: up to the first lone `-` (`--` is a literal `-`), and the rest. */
function unquoteLvm(s: string): [string, string] {
  let out = "";
  let i = 0;
  for (; i < s.length; i++) {
    // A `-` is only a separator when something follows it: a trailing `-` is kept.
    if (s[i] === "-" && i + 1 < s.length) {
      if (s[i + 1] !== "-") return [out, s.slice(i + 1)];
      i++;
    }
    out += s[i];
  }
  return [out, ""];
}

function splitName(c: FieldContext): { subsystem: string; vg: string; lv: string; layer: string } {
  const dash = c.info.uuid.indexOf("-");
  const subsystem = dash < 0 ? "" : c.info.uuid.slice(0, dash);
  if (subsystem !== "LVM") return { subsystem, vg: "", lv: "", layer: "" };
  const [vg, rest] = unquoteLvm(c.info.name);
  const [lv, rest2] = unquoteLvm(rest);
  return { subsystem, vg, lv, layer: unquoteLvm(rest2)[0] };
}

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
      (i.livePresent ? "L" : "-") + (i.inactivePresent ? "I" : "-") + (i.suspended ? "s" : "-") + (i.readOnly ? "r" : "w"),
  },
  {
    id: "tables_loaded",
    heading: "Tables",
    width: 6,
    get: ({ info: i }) => (i.livePresent ? (i.inactivePresent ? "Both" : "Live") : i.inactivePresent ? "Inactive" : "None"),
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
  { id: "device_count", heading: "#Devs", width: 5, num: true, get: (c) => c.node().uses.filter((n) => n !== c.tree().root).length },
  { id: "devs_used", heading: "DevNamesUsed", width: 16, get: (c) => dmNames(c.node().uses) },
  { id: "devnos_used", heading: "DevNosUsed", width: 16, get: (c) => devnos(c.node().uses) },
  {
    id: "blkdevs_used",
    heading: "BlkDevNamesUsed",
    width: 16,
    get: (c) =>
      c.node().uses.filter((n) => n !== c.tree().root).map((n) => {
        const name = blkdevOf(n, c.blkdevName);
        if (name === undefined) throw new DmError("ENODEV", `Could not resolve block device name for ${n.major}:${n.minor}.`);
        return name;
      }).join(","),
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
    if (id === "") throw new DmError("EINVAL", `dm_report: Missing sort field name\ndm_report: Unrecognised field: ${key}`);
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
      const cmp = typeof x === "number" && typeof y === "number" ? x - y : Buffer.compare(Buffer.from(String(x)), Buffer.from(String(y)));
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
  const heading = (col: Column) => (aligned ? padEnd(col.field.heading.slice(0, col.width), col.width) : col.field.heading);
  const visible = columns.filter((c) => !c.hidden);

  if (opts.rows) {
    return visible
      .map((col) => `${headings ? col.field.heading + separator : ""}${rows.map((r) => cell(col, r.get(col)!)).join(separator)}\n`)
      .join("");
  }
  let out = headings ? `${visible.map(heading).join(separator)}\n` : "";
  for (const row of rows) out += `${visible.map((col) => cell(col, row.get(col)!)).join(separator)}\n`;
  return out;
}

// ---- ls ----

export interface LsEntry {
  name: string;
  major: number;
  minor: number;
  /** Target types in the live table, for `--target TYPE` filtering. */
  targetTypes?: readonly string[];
}

export interface LsOptions {
  /**
   * --target TYPE: the type to filter on (needs `targetTypes`), or `true` when `devices` is already
   * filtered. An already-filtered empty list prints nothing: dmsetup prints `No devices found`
   * only when there are no devices at all, which only the string form can tell.
   */
  target?: string | boolean;
  /** -o devno|blkdevname|devname (ignored with --target, as by dmsetup). */
  format?: DevNameFormat;
  /** Shorthand for format "blkdevname". */
  blkdevname?: boolean;
}

/** `dmsetup ls`: `name\t(253:0)`; with --target, `name\t(253, 0)` (it goes through `status`). */
export function formatLs(devices: readonly LsEntry[], opts: LsOptions = {}): string {
  const { target } = opts;
  if (target === true) return devices.map((d) => `${d.name}\t(${d.major}, ${d.minor})\n`).join("");
  if (devices.length === 0) return "No devices found\n";
  if (typeof target === "string") {
    return devices.filter((d) => d.targetTypes?.includes(target)).map((d) => `${d.name}\t(${d.major}, ${d.minor})\n`).join("");
  }
  const format = opts.format ?? (opts.blkdevname ? "blkdevname" : "devno");
  // -o devname asks libdm for the mapped name of a mapped device: the name again.
  const dev = (d: LsEntry) => (format === "devno" ? `${d.major}:${d.minor}` : format === "blkdevname" ? `dm-${d.minor}` : d.name);
  return devices.map((d) => `${d.name}\t(${dev(d)})\n`).join("");
}

// ---- ls --tree ----

type Charset = "utf" | "ascii" | "vt100";

export interface TreeOptions {
  /** dmsetup's `-o` tree words (comma-separated or split), parsed as dmsetup does. */
  options?: string | readonly string[];
  /** Glyphs; dmsetup picks utf when the locale's codeset is UTF-8, else ascii. Default utf. */
  charset?: Charset;
  /** ` (maj:min)` after each name (default on; `nodevice` turns it off). */
  device?: boolean;
  /** ` <dm-0>` after each name. */
  blkdevname?: boolean;
  active?: boolean;
  open?: boolean;
  rw?: boolean;
  uuid?: boolean;
  compact?: boolean;
  /** Leaves at the top, users below. */
  inverted?: boolean;
  /** Accepted; udm never truncates (dmsetup cuts lines at the terminal width, else 80 columns). */
  notrunc?: boolean;
  /** Accepted; dmsetup draws nothing for them but they disable `compact`. */
  table?: boolean;
  status?: boolean;
  /** Kernel names of non-dm leaves, for `blkdevname`. */
  blkdevName?: BlkdevNameResolver;
}

const TREE_WORDS = [
  "device", "blkdevname", "nodevice", "status", "table", "active", "open", "uuid", "rw",
  "utf", "vt100", "ascii", "inverted", "compact", "notrunc",
] as const;

/**
 * _process_tree_options: each word may be abbreviated to any prefix (the first match in dmsetup's
 * order wins, so an empty word means `device`); the error quotes the rest of the string.
 */
export function parseTreeOptions(options: string, base: TreeOptions = {}): TreeOptions {
  const opts: TreeOptions = { ...base };
  let rest = options;
  while (rest !== "") {
    const comma = rest.indexOf(",");
    const word = comma < 0 ? rest : rest.slice(0, comma);
    const match = TREE_WORDS.find((w) => w.startsWith(word));
    if (!match) throw new DmError("EINVAL", `Tree options not recognised: ${rest}.`);
    if (match === "nodevice") opts.device = false;
    else if (match === "utf" || match === "vt100" || match === "ascii") opts.charset = match;
    else opts[match] = true;
    if (comma < 0) break;
    rest = rest.slice(comma + 1);
  }
  return opts;
}

const VT = (s: string) => `\x1b(0\x0f${s}\x1b(B`;
const GLYPHS: Record<Charset, { empty: string; branch: string; vert: string; last: string; single: string; first: string }> = {
  ascii: { empty: "  ", branch: "|-", vert: "| ", last: "`-", single: "---", first: "-+-" },
  utf: { empty: "  ", branch: "├─", vert: "│ ", last: "└─", single: "───", first: "─┬─" },
  vt100: { empty: "  ", branch: VT("tq"), vert: `${VT("x")} `, last: VT("mq"), single: VT("qqq"), first: VT("qwq") },
};

/**
 * `dmsetup ls --tree`. `devices` come in LIST_DEVICES order (name order) and each one's deps in
 * DM_TABLE_DEPS order; roots are devices no other device uses, and every level keeps that order,
 * as dmsetup's tree does. A device used by several others is drawn under each of them.
 *
 * Each level is indented by one space and a two-column glyph; `├─`/`└─` for a node with/without
 * later siblings, `│ `/`  ` in the columns of ancestors with/without later siblings. Non-dm
 * leaves have no name and print as ` (8:16)`. udm extension: a backing file is a leaf that
 * prints its path in place of the name, without device numbers, e.g. `└─/srv/disk.img`.
 */
export function formatTree(devices: readonly GraphDevice[], treeOpts: TreeOptions = {}): string {
  if (devices.length === 0) return "No devices found\n";
  const base: TreeOptions = { charset: "utf", device: true, ...treeOpts };
  const raw = treeOpts.options;
  const o = raw === undefined ? base : parseTreeOptions(typeof raw === "string" ? raw : raw.join(","), base);
  const glyph = GLYPHS[o.charset ?? "utf"];
  const attributes = o.active || o.rw || o.open || o.uuid;
  const compact = o.compact && !attributes && !o.table && !o.status;
  const inverted = o.inverted ?? false;
  const tree = new DepTree(devices);

  let out = "";
  let x = 1; // dmsetup's cursor column: the first line of a compact subtree continues the parent's
  const put = (s: string) => {
    out += s;
    x += [...s].length;
  };
  const width: number[] = []; // per depth: the width of the text before a compact subtree
  const more: boolean[] = []; // per depth: whether the node drawn there has later siblings

  const prefix = (depth: number) => {
    for (let d = 0; d < depth; d++) {
      put(" ".repeat((width[d] ?? 0) + 1));
      if (d === depth - 1) put(more[depth] ? glyph.branch : glyph.last);
      else put(more[d + 1] ? glyph.vert : glyph.empty);
    }
  };

  const drawNode = (node: GraphNode, depth: number, last: boolean, hasChildren: boolean) => {
    if (node.name === "" && !o.device && !o.blkdevname) return;
    more[depth] = !last;
    width[depth] = 0;
    const firstOnLine = x === 1;
    if (!compact || firstOnLine) prefix(depth);
    const offset = x;
    if (compact && !firstOnLine) put(more[depth] ? glyph.first : glyph.single);
    put(node.name);
    if (node.path === undefined) {
      const blk = o.blkdevname ? blkdevOf(node, o.blkdevName) : undefined;
      if (blk !== undefined) put(` <${blk}>`);
      if (o.device) put(` (${node.major}:${node.minor})`);
    }
    const d = node.device;
    if (attributes && d) {
      const attrs: string[] = [];
      if (o.active) attrs.push(d.suspended ? "SUSPENDED" : "ACTIVE");
      if (o.rw) attrs.push(d.readOnly ? "RO" : "RW");
      if (o.open) attrs.push(String((d.openCount ?? 0) >>> 0)); // printed unsigned
      if (o.uuid) attrs.push(d.uuid ?? "");
      put(` [${attrs.join(", ")}]`);
    }
    if (compact) width[depth] = x - offset;
    if (!compact || !hasChildren) {
      out += "\n";
      x = 1;
    }
  };

  const walk = (node: GraphNode, depth: number) => {
    const children = inverted ? node.usedBy : node.uses;
    children.forEach((child, i) => {
      const hasChildren = tree.numChildren(child, inverted) > 0;
      drawNode(child, depth, i === children.length - 1, hasChildren);
      if (hasChildren) walk(child, depth + 1);
    });
  };
  walk(tree.root, 0);
  return out;
}

// ---- table / status ----

/**
 * `dmsetup table|status`: `"%llu %llu %s " + params` per target — one space after the type even
 * when params are empty. `prefix` is the device name when the command runs on several devices.
 * A device with no table still gets its line: just the prefix and the newline, as dmsetup prints
 * it; with --target (pass it here rather than filtering) such a device and other types print
 * nothing.
 */
export function formatTableLines(lines: readonly TableLine[], prefix?: string, opts: { target?: string } = {}): string {
  const head = prefix === undefined ? "" : `${prefix}: `;
  if (lines.length === 0) return opts.target === undefined ? `${head}\n` : "";
  return lines
    .filter((l) => opts.target === undefined || l.type === opts.target)
    .map((l) => `${head}${l.start} ${l.length} ${l.type} ${l.params}\n`)
    .join("");
}

// ---- deps ----

export interface DepsOptions {
  /** The device name when the command runs on several devices. */
  prefix?: string;
  format?: DevNameFormat;
  /** Names for devices whose DepRef carries none (non-dm devices' kernel names). */
  names?: (major: number, minor: number, kind: "blkdevname" | "devname") => string | undefined;
}

/**
 * `dmsetup deps`: `N dependencies\t: (maj, min) ...` — literally `1 dependencies`. With -o
 * blkdevname/devname an unresolvable device falls back to `(maj, min)`, as in dmsetup. udm
 * extension: a backing file prints as `(PATH)`.
 */
export function formatDeps(deps: readonly DepRef[], opts: DepsOptions = {}): string {
  const format = opts.format ?? "devno";
  const item = (d: DepRef) => {
    if ("path" in d) return ` (${d.path})`;
    const blk = () => d.blkdevname ?? (d.name !== undefined ? `dm-${d.minor}` : opts.names?.(d.major, d.minor, "blkdevname"));
    // devname: the mapped name of a mapped device, else the kernel name.
    const name = format === "blkdevname" ? blk() : format === "devname" ? d.name ?? opts.names?.(d.major, d.minor, "devname") ?? blk() : undefined;
    return name !== undefined ? ` (${name})` : ` (${d.major}, ${d.minor})`;
  };
  const head = opts.prefix === undefined ? "" : `${opts.prefix}: `;
  return `${head}${deps.length} dependencies\t:${deps.map(item).join("")}\n`;
}

// ---- targets / version ----

/** `dmsetup targets` and `target-version`: `%-16s v%d.%d.%d`. */
export function formatTargets(list: readonly { name: string; version: readonly number[] }[]): string {
  return list.map((t) => `${padEnd(t.name, 16)} v${t.version[0] ?? 0}.${t.version[1] ?? 0}.${t.version[2] ?? 0}\n`).join("");
}

/** `dmsetup version`. */
export function formatVersion(libraryVersion: string, driverVersion: string): string {
  return `Library version:   ${libraryVersion}\nDriver version:    ${driverVersion}\n`;
}

// ---- --json (udm extension) ----

/** Pretty JSON (two-space indent, keys in the objects' own order) and a newline. */
export function toJson(value: unknown): string {
  return `${JSON.stringify(value, (_k, v: unknown) => (typeof v === "bigint" ? v.toString() : v), 2)}\n`;
}
