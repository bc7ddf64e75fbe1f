/**
 * dmsetup's report fields (dmsetup.c: FIELD_F/FIELD_O) that udm can compute, in dmsetup's order,
 * with their headings, widths, types and help texts: what `info -c -o` shows and `-S` compares.
 */
import type { DeviceInfo } from "../../../core/device-mapper.js";
import { DmError } from "../../../core/errors.js";
import { type BlkdevNameResolver, blkdevOf, type DepTree, type GraphNode } from "./dep-tree.js";
import { mangle, unmangle, unquoteLvm } from "./names.js";

export interface FieldContext {
  info: DeviceInfo;
  noOpenCount: boolean;
  readAhead: number;
  tree: () => DepTree;
  node: () => GraphNode;
  blkdevName?: BlkdevNameResolver;
  /** The row passes the selection (-S): the implicit `selected` field. */
  selected: () => boolean;
  setSelected(value: boolean): void;
}

/** The report types of dmsetup's _report_types whose fields udm has, plus libdm's implicit ones. */
export type FieldSection = "name" | "info" | "deps" | "splitname" | "special";

export interface Field {
  id: string;
  heading: string;
  /** Minimum width; columns grow to their longest value. */
  width: number;
  /** Numbers are right-aligned, sort numerically and compare as numbers in a selection. */
  num?: true;
  section: FieldSection;
  desc: string;
  get(c: FieldContext): string | number;
}

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
const used = (c: FieldContext) => c.node().uses.filter((n) => n !== c.tree().root);

export const FIELDS: readonly Field[] = [
  { id: "name", heading: "Name", width: 16, section: "name", desc: "Name of mapped device.", get: (c) => c.info.name },
  {
    id: "mangled_name",
    heading: "MangledName",
    width: 16,
    section: "name",
    desc: "Mangled name of mapped device.",
    get: (c) => mangle(c.info.name),
  },
  {
    id: "unmangled_name",
    heading: "UnmangledName",
    width: 16,
    section: "name",
    desc: "Unmangled name of mapped device.",
    get: (c) => unmangle(c.info.name),
  },
  {
    id: "uuid",
    heading: "UUID",
    width: 32,
    section: "name",
    desc: "Unique (optional) identifier for mapped device.",
    get: (c) => c.info.uuid,
  },
  {
    id: "mangled_uuid",
    heading: "MangledUUID",
    width: 32,
    section: "name",
    desc: "Mangled unique (optional) identifier for mapped device.",
    get: (c) => mangle(c.info.uuid),
  },
  {
    id: "unmangled_uuid",
    heading: "UnmangledUUID",
    width: 32,
    section: "name",
    desc: "Unmangled unique (optional) identifier for mapped device.",
    get: (c) => unmangle(c.info.uuid),
  },
  {
    id: "read_ahead",
    heading: "RAhead",
    width: 6,
    num: true,
    section: "name",
    desc: "Read ahead value.",
    get: (c) => c.readAhead,
  },
  {
    id: "blkdevname",
    heading: "BlkDevName",
    width: 16,
    section: "info",
    desc: "Name of block device.",
    get: (c) => `dm-${c.info.minor}`,
  },
  {
    id: "attr",
    heading: "Stat",
    width: 4,
    section: "info",
    desc: "(L)ive, (I)nactive, (s)uspended, (r)ead-only, read-(w)rite.",
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
    section: "info",
    desc: "Which of the live and inactive table slots are filled.",
    get: ({ info: i }) =>
      i.livePresent ? (i.inactivePresent ? "Both" : "Live") : i.inactivePresent ? "Inactive" : "None",
  },
  {
    id: "suspended",
    heading: "Suspended",
    width: 9,
    section: "info",
    desc: "Whether the device is suspended.",
    get: (c) => (c.info.suspended ? "Suspended" : "Active"),
  },
  {
    id: "readonly",
    heading: "Read-only",
    width: 9,
    section: "info",
    desc: "Whether the device is read-only or writeable.",
    get: (c) => (c.info.readOnly ? "Read-only" : "Writeable"),
  },
  {
    id: "devno",
    heading: "DevNo",
    width: 5,
    section: "info",
    desc: "Device major and minor numbers",
    get: (c) => `${c.info.major}:${c.info.minor}`,
  },
  {
    id: "major",
    heading: "Maj",
    width: 3,
    num: true,
    section: "info",
    desc: "Block device major number.",
    get: (c) => c.info.major,
  },
  {
    id: "minor",
    heading: "Min",
    width: 3,
    num: true,
    section: "info",
    desc: "Block device minor number.",
    get: (c) => c.info.minor,
  },
  {
    id: "open",
    heading: "Open",
    width: 4,
    num: true,
    section: "info",
    desc: "Number of references to open device, if requested.",
    // --noopencount: the kernel is not asked, libdm reports -1.
    get: (c) => (c.noOpenCount ? -1 : c.info.openCount),
  },
  {
    id: "segments",
    heading: "Targ",
    width: 4,
    num: true,
    section: "info",
    desc: "Number of segments in live table, if present.",
    get: (c) => c.info.targetCount,
  },
  {
    id: "events",
    heading: "Event",
    width: 6,
    num: true,
    section: "info",
    desc: "Number of most recent event.",
    get: (c) => c.info.eventNr,
  },
  {
    id: "device_count",
    heading: "#Devs",
    width: 5,
    num: true,
    section: "deps",
    desc: "Number of devices used by this one.",
    get: (c) => used(c).length,
  },
  {
    id: "devs_used",
    heading: "DevNamesUsed",
    width: 16,
    section: "deps",
    desc: "List of names of mapped devices used by this one.",
    get: (c) => dmNames(c.node().uses),
  },
  {
    id: "devnos_used",
    heading: "DevNosUsed",
    width: 16,
    section: "deps",
    desc: "List of device numbers of devices used by this one.",
    get: (c) => devnos(c.node().uses),
  },
  {
    id: "blkdevs_used",
    heading: "BlkDevNamesUsed",
    width: 16,
    section: "deps",
    desc: "List of names of block devices used by this one.",
    get: (c) =>
      used(c)
        .map((n) => {
          const name = blkdevOf(n, c.blkdevName);
          if (name === undefined)
            throw new DmError("ENODEV", `Could not resolve block device name for ${n.major}:${n.minor}.`);
          return name;
        })
        .join(","),
  },
  {
    id: "device_ref_count",
    heading: "#Refs",
    width: 5,
    num: true,
    section: "deps",
    desc: "Number of mapped devices referencing this one.",
    get: (c) => c.tree().numChildren(c.node(), true),
  },
  {
    id: "names_using_dev",
    heading: "RefNames",
    width: 8,
    section: "deps",
    desc: "List of names of mapped devices using this one.",
    get: (c) => dmNames(c.node().usedBy),
  },
  {
    id: "devnos_using_dev",
    heading: "RefDevNos",
    width: 9,
    section: "deps",
    desc: "List of device numbers of mapped devices using this one.",
    get: (c) => devnos(c.node().usedBy),
  },
  {
    id: "subsystem",
    heading: "Subsys",
    width: 6,
    section: "splitname",
    desc: "Userspace subsystem responsible for this device.",
    get: (c) => splitName(c).subsystem,
  },
  {
    id: "vg_name",
    heading: "VG",
    width: 4,
    section: "splitname",
    desc: "LVM Volume Group name.",
    get: (c) => splitName(c).vg,
  },
  {
    id: "lv_name",
    heading: "LV",
    width: 4,
    section: "splitname",
    desc: "LVM Logical Volume name.",
    get: (c) => splitName(c).lv,
  },
  {
    id: "lv_layer",
    heading: "LVLayer",
    width: 7,
    section: "splitname",
    desc: "LVM device layer.",
    get: (c) => splitName(c).layer,
  },
  // libdm's implicit field when a selection is possible: 1 for rows that pass it.
  {
    id: "selected",
    heading: "Selected",
    width: 8,
    num: true,
    section: "special",
    desc: "Set if item passes selection criteria.",
    get: (c) => (c.selected() ? 1 : 0),
  },
];

/**
 * libdm's field lookup (_get_field): underscores do not count and case does not matter, so
 * `DevsUsed` is `devs_used`.
 */
export function findField(id: string): Field | undefined {
  const canonical = (s: string) => s.replace(/_/g, "").toLowerCase();
  const want = canonical(id);
  return want === "" ? undefined : FIELDS.find((f) => canonical(f.id) === want);
}
