/**
 * Byte-exact dmsetup output formats (lvm2's dmsetup.c; docs/cli.md). Expected strings are written
 * out in full, trailing spaces included: aligned report columns are padded to their width, the last
 * one too.
 */
import { describe, expect, it } from "vitest";
import type { DeviceInfo } from "../../core/device-mapper.js";
import type { GraphDevice } from "../../dmsetup/cli/format/dep-tree.js";
import { formatDeps } from "../../dmsetup/cli/format/deps.js";
import { formatInfoLong } from "../../dmsetup/cli/format/info.js";
import { formatLs } from "../../dmsetup/cli/format/ls.js";
import { formatInfoColumns } from "../../dmsetup/cli/format/report.js";
import { formatTableLines, formatTargets, formatVersion } from "../../dmsetup/cli/format/table.js";
import { toJson } from "../../dmsetup/cli/format/text.js";
import { formatTree, parseTreeOptions } from "../../dmsetup/cli/format/tree.js";

const info = (over: Partial<DeviceInfo> = {}): DeviceInfo => ({
  name: "vg-lv",
  uuid: "LVM-abc",
  major: 253,
  minor: 0,
  suspended: false,
  readOnly: false,
  livePresent: true,
  inactivePresent: false,
  openCount: 0,
  eventNr: 0,
  targetCount: 1,
  sizeSectors: 2048,
  ...over,
});

const snap = info({
  name: "snap",
  uuid: "",
  minor: 12,
  suspended: true,
  readOnly: true,
  inactivePresent: true,
  openCount: 2,
  eventNr: 7,
  targetCount: 3,
});

/** A snapshot of vg-base as LVM stacks it, both over (8:16). */
const example: GraphDevice[] = [
  {
    name: "vg-snap",
    major: 253,
    minor: 3,
    deps: [
      { major: 253, minor: 2 },
      { major: 253, minor: 1 },
    ],
  },
  { name: "vg-snap-cow", major: 253, minor: 2, deps: [{ major: 8, minor: 16 }] },
  { name: "vg-base-real", major: 253, minor: 1, deps: [{ major: 8, minor: 16 }] },
  { name: "vg-base", major: 253, minor: 0, deps: [{ major: 253, minor: 1 }] },
];
/** The same devices in LIST_DEVICES (name) order. */
const byName = [example[3]!, example[2]!, example[0]!, example[1]!];

describe("info (long form)", () => {
  it("prints the block with labels padded to column 19 and a blank line after", () => {
    const text = formatInfoLong(info());
    expect(text).toBe(
      "Name:              vg-lv\n" +
        "State:             ACTIVE\n" +
        "Read Ahead:        256\n" +
        "Tables present:    LIVE\n" +
        "Open count:        0\n" +
        "Event number:      0\n" +
        "Major, minor:      253, 0\n" +
        "Number of targets: 1\n" +
        "UUID: LVM-abc\n" +
        "\n",
    );
    for (const line of text.split("\n").filter((l) => l.includes(":") && !l.startsWith("UUID"))) {
      expect(line.indexOf(":") < 18 && line[19] !== " " && line[18] === " ").toBe(true);
    }
  });

  it("shows SUSPENDED (READ-ONLY), both tables, no UUID line and no open count with --noopencount", () => {
    expect(formatInfoLong(snap, { noOpenCount: true })).toBe(
      "Name:              snap\n" +
        "State:             SUSPENDED (READ-ONLY)\n" +
        "Read Ahead:        256\n" +
        "Tables present:    LIVE & INACTIVE\n" +
        "Event number:      7\n" +
        "Major, minor:      253, 12\n" +
        "Number of targets: 3\n" +
        "\n",
    );
  });

  it("says None / INACTIVE for the table slots and takes the read-ahead it is given", () => {
    expect(formatInfoLong(info({ livePresent: false, targetCount: 0, uuid: "" }), { readAhead: 1024 })).toBe(
      "Name:              vg-lv\n" +
        "State:             ACTIVE\n" +
        "Read Ahead:        1024\n" +
        "Tables present:    None\n" +
        "Open count:        0\n" +
        "Event number:      0\n" +
        "Major, minor:      253, 0\n" +
        "Number of targets: 0\n" +
        "\n",
    );
    expect(formatInfoLong(info({ livePresent: false, inactivePresent: true }), { readAhead: null })).toContain(
      "State:             ACTIVE\nTables present:    INACTIVE\n",
    );
    expect(formatInfoLong({ ...info(), deferredRemove: true })).toContain(
      "State:             ACTIVE (DEFERRED REMOVE)\n",
    );
  });
});

describe("info -c (columns)", () => {
  it("prints the default fields with dmsetup's headings, widths and alignment", () => {
    expect(formatInfoColumns([info(), snap])).toBe(
      "Name             Maj Min Stat Open Targ Event  UUID                            \n" +
        "vg-lv            253   0 L--w    0    1      0 LVM-abc                         \n" +
        "snap             253  12 LIsr    2    3      7                                 \n",
    );
  });

  it("grows columns to the longest value, numbers still right-aligned", () => {
    const long = info({
      name: "a-very-long-device-name",
      uuid: "LVM-0123456789abcdef0123456789abcdef-0123456",
      minor: 1,
      eventNr: 1234567,
    });
    const other = info({ name: "x", uuid: "", minor: 2, livePresent: false, targetCount: 0 });
    expect(formatInfoColumns([long, other])).toBe(
      "Name                    Maj Min Stat Open Targ Event   UUID                                        \n" +
        "a-very-long-device-name 253   1 L--w    0    1 1234567 LVM-0123456789abcdef0123456789abcdef-0123456\n" +
        "x                       253   2 ---w    0    0       0                                             \n",
    );
  });

  it("--noheadings is the legacy colon format: no headings, no padding", () => {
    expect(formatInfoColumns([info(), info({ uuid: "" })], { noHeadings: true })).toBe(
      "vg-lv:253:0:L--w:0:1:0:LVM-abc\n" + "vg-lv:253:0:L--w:0:1:0:\n",
    );
  });

  it("--separator turns alignment off but keeps the headings", () => {
    expect(formatInfoColumns([info()], { separator: "," })).toBe(
      "Name,Maj,Min,Stat,Open,Targ,Event,UUID\nvg-lv,253,0,L--w,0,1,0,LVM-abc\n",
    );
  });

  it("--nameprefixes prints DM_FIELD='value' (unquoted with --unquoted)", () => {
    expect(formatInfoColumns([info()], { nameprefixes: true, noHeadings: true, fields: ["name", "uuid"] })).toBe(
      "DM_NAME='vg-lv':DM_UUID='LVM-abc'\n",
    );
    expect(formatInfoColumns([info()], { nameprefixes: true, fields: "name,open" })).toBe(
      "Name Open\nDM_NAME='vg-lv' DM_OPEN='0'\n",
    );
    expect(formatInfoColumns([info()], { nameprefixes: true, unquoted: true, noHeadings: true, fields: "name" })).toBe(
      "DM_NAME=vg-lv\n",
    );
  });

  it("--rows prints one line per field", () => {
    const b = info({ name: "b", minor: 1 });
    expect(formatInfoColumns([info(), b], { rows: true, fields: ["name", "major", "minor"] })).toBe(
      "Name vg-lv b\nMaj 253 253\nMin 0 1\n",
    );
    expect(formatInfoColumns([info(), b], { rows: true, noHeadings: true, fields: ["name"] })).toBe("vg-lv:b\n");
  });

  it("supports the other info fields, -o +FIELD and --noopencount", () => {
    expect(
      formatInfoColumns([info(), snap], {
        fields: ["name", "tables_loaded", "suspended", "readonly", "devno", "blkdevname", "read_ahead"],
      }),
    ).toBe(
      "Name             Tables Suspended Read-only DevNo  BlkDevName       RAhead\n" +
        "vg-lv            Live   Active    Writeable 253:0  dm-0                256\n" +
        "snap             Both   Suspended Read-only 253:12 dm-12               256\n",
    );
    expect(
      formatInfoColumns([info({ livePresent: false, inactivePresent: true })], {
        fields: "name,tables_loaded",
        noHeadings: true,
      }),
    ).toBe("vg-lv:Inactive\n");
    expect(formatInfoColumns([info()], { fields: ["+devno"], noHeadings: true })).toBe(
      "vg-lv:253:0:L--w:0:1:0:LVM-abc:253:0\n",
    );
    expect(formatInfoColumns([info()], { fields: "NAME,Open", noHeadings: true, noOpenCount: true })).toBe(
      "vg-lv:-1\n",
    );
  });

  it("sorts with -O, ascending by default, - for descending, on hidden fields too", () => {
    const devs = [info({ name: "b", minor: 1 }), info({ name: "c", minor: 0 }), info({ name: "a", minor: 2 })];
    expect(formatInfoColumns(devs, { fields: "name", sort: "name", noHeadings: true })).toBe("a\nb\nc\n");
    expect(formatInfoColumns(devs, { fields: "name", sort: ["-minor"], noHeadings: true })).toBe("a\nb\nc\n");
    expect(formatInfoColumns(devs, { fields: "name,minor", sort: "+minor", noHeadings: true })).toBe("c:0\nb:1\na:2\n");
    // Without keys the input (name) order stays.
    expect(formatInfoColumns(devs, { fields: "name", noHeadings: true })).toBe("b\nc\na\n");
  });

  it("computes the relationship fields from the dependency graph", () => {
    const infos = byName.map((d) => info({ name: d.name, minor: d.minor, uuid: "" }));
    const graph = byName;
    expect(
      formatInfoColumns(infos, {
        graph,
        noHeadings: true,
        fields:
          "name,device_count,devnos_used,devs_used,blkdevs_used,device_ref_count,names_using_dev,devnos_using_dev",
        blkdevName: (major, minor) => (major === 8 && minor === 16 ? "sdb" : undefined),
      }),
    ).toBe(
      "vg-base:1:253:1:vg-base-real:dm-1:0::\n" +
        "vg-base-real:1:8:16::sdb:2:vg-base,vg-snap:253:0,253:3\n" +
        "vg-snap:2:253:2,253:1:vg-snap-cow,vg-base-real:dm-2,dm-1:0::\n" +
        "vg-snap-cow:1:8:16::sdb:1:vg-snap:253:3\n",
    );
    expect(formatInfoColumns(infos, { graph, fields: "name,devs_used,device_ref_count,names_using_dev" })).toBe(
      "Name             DevNamesUsed             #Refs RefNames       \n" +
        "vg-base          vg-base-real                 0                \n" +
        "vg-base-real                                  2 vg-base,vg-snap\n" +
        "vg-snap          vg-snap-cow,vg-base-real     0                \n" +
        "vg-snap-cow                                   1 vg-snap        \n",
    );
    expect(() => formatInfoColumns(infos, { graph, fields: "blkdevs_used" })).toThrow(
      "Could not resolve block device name for 8:16.",
    );
  });

  it("splits LVM names and uuid prefixes like splitname", () => {
    const rows = [
      info({ name: "vg-lv-real", uuid: "LVM-xyz" }),
      info({ name: "my--vg-lv--1", uuid: "LVM-xyz" }),
      info({ name: "crypt", uuid: "CRYPT-LUKS2-1234" }),
      info({ name: "plain", uuid: "" }),
    ];
    expect(formatInfoColumns(rows, { fields: "subsystem,vg_name,lv_name,lv_layer", noHeadings: true })).toBe(
      "LVM:vg:lv:real\nLVM:my-vg:lv-1:\nCRYPT:::\n:::\n",
    );
  });

  it("mangles names outside udev's whitelist", () => {
    expect(
      formatInfoColumns([info({ name: "a b\\x20c" })], { fields: "mangled_name,unmangled_name", noHeadings: true }),
    ).toBe("a\\x20b\\x20c:a b c\n");
  });

  it("rejects unknown fields and sort keys with dmsetup's messages", () => {
    expect(() => formatInfoColumns([info()], { fields: "name,bogus" })).toThrow(/^Unrecognised field: bogus$/);
    expect(() => formatInfoColumns([info()], { sort: "-bogus" })).toThrow(/^dm_report: Unrecognised field: -bogus$/);
    expect(() => formatInfoColumns([info()], { sort: "-" })).toThrow("dm_report: Missing sort field name");
  });

  it("prints nothing at all (not even headings) without devices", () => {
    expect(formatInfoColumns([])).toBe("");
  });
});

describe("ls", () => {
  const list = [
    { name: "vg-base", major: 253, minor: 0, targetTypes: ["snapshot-origin"] },
    { name: "vg-snap", major: 253, minor: 3, targetTypes: ["snapshot"] },
  ];

  it("prints name<TAB>(major:minor), or the block device name", () => {
    expect(formatLs(list)).toBe("vg-base\t(253:0)\nvg-snap\t(253:3)\n");
    expect(formatLs(list, { blkdevname: true })).toBe("vg-base\t(dm-0)\nvg-snap\t(dm-3)\n");
    expect(formatLs(list, { format: "devname" })).toBe("vg-base\t(vg-base)\nvg-snap\t(vg-snap)\n");
  });

  it("--target uses the (major, minor) format", () => {
    expect(formatLs(list, { target: "snapshot" })).toBe("vg-snap\t(253, 3)\n");
    expect(formatLs(list, { target: "linear" })).toBe("");
    expect(formatLs([list[1]!], { target: true })).toBe("vg-snap\t(253, 3)\n");
  });

  it("says No devices found", () => {
    expect(formatLs([])).toBe("No devices found\n");
    expect(formatLs([], { target: "linear" })).toBe("No devices found\n");
  });
});

describe("ls --tree", () => {
  it("draws the LVM snapshot example with UTF-8 glyphs", () => {
    expect(formatTree(example)).toBe(
      "vg-snap (253:3)\n" +
        " ├─vg-snap-cow (253:2)\n" +
        " │  └─ (8:16)\n" +
        " └─vg-base-real (253:1)\n" +
        "    └─ (8:16)\n" +
        "vg-base (253:0)\n" +
        " └─vg-base-real (253:1)\n" +
        "    └─ (8:16)\n",
    );
  });

  it("draws it in ASCII", () => {
    expect(formatTree(example, { options: "ascii" })).toBe(
      "vg-snap (253:3)\n" +
        " |-vg-snap-cow (253:2)\n" +
        " |  `- (8:16)\n" +
        " `-vg-base-real (253:1)\n" +
        "    `- (8:16)\n" +
        "vg-base (253:0)\n" +
        " `-vg-base-real (253:1)\n" +
        "    `- (8:16)\n",
    );
  });

  it("keeps the device list order for roots and the deps order for children", () => {
    expect(formatTree(byName, { charset: "ascii" })).toBe(
      "vg-base (253:0)\n" +
        " `-vg-base-real (253:1)\n" +
        "    `- (8:16)\n" +
        "vg-snap (253:3)\n" +
        " |-vg-snap-cow (253:2)\n" +
        " |  `- (8:16)\n" +
        " `-vg-base-real (253:1)\n" +
        "    `- (8:16)\n",
    );
  });

  it("inverted: leaves on top, their users below", () => {
    expect(formatTree(byName, { options: ["inverted"] })).toBe(
      " (8:16)\n" +
        " ├─vg-base-real (253:1)\n" +
        " │  ├─vg-base (253:0)\n" +
        " │  └─vg-snap (253:3)\n" +
        " └─vg-snap-cow (253:2)\n" +
        "    └─vg-snap (253:3)\n",
    );
  });

  it("compact: a first child continues its parent's line", () => {
    expect(formatTree(byName, { options: "compact,ascii" })).toBe(
      "vg-base (253:0)---vg-base-real (253:1)--- (8:16)\n" +
        "vg-snap (253:3)-+-vg-snap-cow (253:2)--- (8:16)\n" +
        "                `-vg-base-real (253:1)--- (8:16)\n",
    );
  });

  it("adds <blkdevname> and the [active, rw, open, uuid] attributes of mapped devices", () => {
    const lv: GraphDevice[] = [
      { name: "lv", major: 253, minor: 0, uuid: "LVM-1", openCount: 1, deps: [{ major: 8, minor: 16 }] },
    ];
    expect(formatTree(lv, { options: "blkdevname,active,rw,open,uuid,notrunc", blkdevName: () => "sdb" })).toBe(
      "lv <dm-0> (253:0) [ACTIVE, RW, 1, LVM-1]\n └─ <sdb> (8:16)\n",
    );
    expect(formatTree([{ ...lv[0]!, suspended: true, readOnly: true }], { options: "nodevice,active,rw" })).toBe(
      "lv [SUSPENDED, RO]\n",
    );
  });

  it("prints a backing file's path in place of a name, without numbers (udm extension)", () => {
    const disk: GraphDevice[] = [
      { name: "disk", major: 253, minor: 0, deps: [{ path: "/srv/disk.img" }] },
      { name: "top", major: 253, minor: 1, deps: [{ major: 253, minor: 0 }, { path: "/srv/cow.img" }] },
    ];
    expect(formatTree(disk)).toBe(
      "top (253:1)\n" + " ├─disk (253:0)\n" + " │  └─/srv/disk.img\n" + " └─/srv/cow.img\n",
    );
  });

  it("says No devices found, and lists a lone device without children", () => {
    expect(formatTree([])).toBe("No devices found\n");
    expect(formatTree([{ name: "z", major: 253, minor: 5, deps: [] }])).toBe("z (253:5)\n");
  });

  it("parses tree options as dmsetup does: prefixes, and the rest of the string in errors", () => {
    expect(parseTreeOptions("asc,nodev,u")).toEqual({ charset: "ascii", device: false, uuid: true });
    expect(parseTreeOptions(",vt")).toEqual({ device: true, charset: "vt100" });
    expect(() => parseTreeOptions("ascii,foo,utf")).toThrow(/^Tree options not recognised: foo,utf\.$/);
  });
});

describe("table / status lines", () => {
  it("always prints the space after the type", () => {
    expect(formatTableLines([{ start: 0, length: 2048, type: "zero", params: "" }])).toBe("0 2048 zero \n");
    expect(
      formatTableLines([
        { start: 0, length: 100, type: "linear", params: "8:16 0" },
        { start: 100, length: 100, type: "error", params: "" },
      ]),
    ).toBe("0 100 linear 8:16 0\n100 100 error \n");
  });

  it("prefixes name: for several devices; a device without a table gets an empty line", () => {
    expect(formatTableLines([{ start: 0, length: 8, type: "zero", params: "" }], "a")).toBe("a: 0 8 zero \n");
    expect(formatTableLines([], "a")).toBe("a: \n");
    expect(formatTableLines([])).toBe("\n");
  });

  it("--target keeps only that type and drops table-less devices", () => {
    const lines = [
      { start: 0, length: 8, type: "zero", params: "" },
      { start: 8, length: 8, type: "error", params: "" },
    ];
    expect(formatTableLines(lines, "a", { target: "error" })).toBe("a: 8 8 error \n");
    expect(formatTableLines([], "a", { target: "error" })).toBe("");
  });
});

describe("deps", () => {
  it("says `1 dependencies` and lists (major, minor)", () => {
    expect(formatDeps([{ major: 8, minor: 16 }])).toBe("1 dependencies\t: (8, 16)\n");
    expect(
      formatDeps(
        [
          { major: 253, minor: 2 },
          { major: 253, minor: 1 },
        ],
        { prefix: "vg-snap" },
      ),
    ).toBe("vg-snap: 2 dependencies\t: (253, 2) (253, 1)\n");
    expect(formatDeps([])).toBe("0 dependencies\t:\n");
  });

  it("-o blkdevname / devname, falling back to numbers when a name is unknown", () => {
    const deps = [
      { major: 253, minor: 1, name: "vg-base-real" },
      { major: 8, minor: 16 },
      { major: 8, minor: 32 },
    ];
    const names = (major: number, minor: number) => (major === 8 && minor === 16 ? "sdb" : undefined);
    expect(formatDeps(deps, { format: "blkdevname", names })).toBe("3 dependencies\t: (dm-1) (sdb) (8, 32)\n");
    expect(formatDeps(deps, { format: "devname", names })).toBe("3 dependencies\t: (vg-base-real) (sdb) (8, 32)\n");
  });

  it("prints a backing file as (PATH) (udm extension)", () => {
    expect(formatDeps([{ path: "/srv/disk.img" }])).toBe("1 dependencies\t: (/srv/disk.img)\n");
  });
});

describe("targets / version / json", () => {
  it("targets: %-16s v%d.%d.%d", () => {
    expect(
      formatTargets([
        { name: "snapshot-merge", version: [1, 5, 0] },
        { name: "linear", version: [1, 5, 0] },
        { name: "a-target-name-longer", version: [10, 0, 2] },
      ]),
    ).toBe("snapshot-merge   v1.5.0\nlinear           v1.5.0\na-target-name-longer v10.0.2\n");
  });

  it("version: two lines", () => {
    expect(formatVersion("1.02.214-git (2026-03-13)", "4.48.0")).toBe(
      "Library version:   1.02.214-git (2026-03-13)\nDriver version:    4.48.0\n",
    );
  });

  it("toJson: two-space indent and a newline", () => {
    expect(toJson({ name: "a", deps: [{ major: 8, minor: 16 }] })).toBe(
      '{\n  "name": "a",\n  "deps": [\n    {\n      "major": 8,\n      "minor": 16\n    }\n  ]\n}\n',
    );
  });
});
