/**
 * dmsetup's concise format (docs/cli.md): parsing as lvm2's _create_concise does, messages
 * included, and `table --concise` output.
 */
import { describe, expect, it } from "vitest";
import { formatConcise, iterateConcise, parseConcise, quoteConcise } from "../../dmsetup/cli/concise.js";

describe("parseConcise", () => {
  it("parses dmsetup's usage example: two devices, extra table lines after commas", () => {
    expect(parseConcise("dev1,,,,0 100 linear 253:1 0,100 100 error;dev2,,,ro,0 1 error")).toEqual([
      {
        name: "dev1",
        uuid: "",
        readOnly: false,
        table: [
          { start: 0, length: 100, type: "linear", params: "253:1 0" },
          { start: 100, length: 100, type: "error", params: "" },
        ],
      },
      { name: "dev2", uuid: "", readOnly: true, table: [{ start: 0, length: 1, type: "error", params: "" }] },
    ]);
  });

  it("reads uuid, minor (as atoi does) and rw, skipping blanks after field commas and semicolons", () => {
    expect(parseConcise("vg-lv,LVM-abc,5,rw,0 2048 zero;\n  b, u, 12abc, ro, 0 8 zero\n")).toEqual([
      {
        name: "vg-lv",
        uuid: "LVM-abc",
        minor: 5,
        readOnly: false,
        table: [{ start: 0, length: 2048, type: "zero", params: "" }],
      },
      { name: "b", uuid: "u", minor: 12, readOnly: true, table: [{ start: 0, length: 8, type: "zero", params: "" }] },
    ]);
    expect(parseConcise("x,,junk,,0 8 zero")[0]!.minor).toBe(0);
  });

  it("takes backslash-quoted , ; and \\ literally", () => {
    const [dev] = parseConcise("we\\,ird\\;name\\\\x,,,,0 8 linear /dev/a\\,b 0");
    expect(dev!.name).toBe("we,ird;name\\x");
    expect(dev!.table).toEqual([{ start: 0, length: 8, type: "linear", params: "/dev/a,b 0" }]);
  });

  it("accepts an empty table (a device without one) and empty input", () => {
    expect(parseConcise("a,,,,;")).toEqual([{ name: "a", uuid: "", readOnly: false, table: [] }]);
    expect(parseConcise("")).toEqual([]);
  });

  it("needs five fields per device", () => {
    expect(() => parseConcise("a,b,c")).toThrow(
      /^Five comma-separated fields are required for each device\nParsed 3 fields: name: a uuid: b minor: c flags: \(null\) table: \(null\)$/,
    );
    expect(() => parseConcise(";")).toThrow(
      "Five comma-separated fields are required for each device\nParsed 1 fields: name:  uuid: (null) minor: (null) flags: (null) table: (null)",
    );
  });

  it("rejects a trailing lone backslash", () => {
    expect(() => parseConcise("a,,,,0 8 zero\\")).toThrow(
      "Backslash must be followed by another character at end of string.\nParsed 5 fields: name: a uuid:  minor:  flags:  table: 0 8 zero",
    );
  });

  it("reports an incomplete entry, including dmsetup's trailing-comma and escaped-last-character quirks", () => {
    const incomplete = "Incomplete entry: five comma-separated fields are required for each device\n";
    expect(() => parseConcise("a,,,,")).toThrow(`${incomplete}Parsed 5 fields: name: a uuid:  minor:  flags:  table: `);
    expect(() => parseConcise("a,,,,0 8 zero,")).toThrow(
      `${incomplete}Parsed 5 fields: name: a uuid:  minor:  flags:  table: 0 8 zero\n`,
    );
    expect(() => parseConcise("a,,,,0 8 zero\\;")).toThrow(
      `${incomplete}Parsed 5 fields: name: a uuid:  minor:  flags:  table: 0 8 zero;`,
    );
  });

  it("rejects bad flags and bad table lines with dmsetup's messages", () => {
    expect(() => parseConcise("a,,,xx,0 8 zero")).toThrow(
      /^Invalid flags parameter 'xx' must be 'ro' or 'rw' or empty\.$/,
    );
    expect(() => parseConcise("a,,,,0 8 zero,junk")).toThrow(/^Invalid format on line 2 of table \.$/);
  });

  it("yields earlier devices before a later one fails, as dmsetup creates them one by one", () => {
    const it = iterateConcise("a,,,,0 8 zero;b");
    expect(it.next().value).toMatchObject({ name: "a" });
    expect(() => it.next()).toThrow(/^Five comma-separated fields/);
  });
});

describe("formatConcise", () => {
  const devices = [
    {
      name: "vg-lv",
      uuid: "LVM-abc",
      minor: 0,
      readOnly: false,
      table: [{ start: 0, length: 2048, type: "linear", params: "8:16 0" }],
    },
    {
      name: "we,ird",
      uuid: "",
      minor: 1,
      readOnly: true,
      table: [
        { start: 0, length: 8, type: "error", params: "" },
        { start: 8, length: 8, type: "zero", params: "" },
      ],
    },
    { name: "empty", uuid: "", minor: 2, readOnly: false, table: [] },
  ];

  it("prints every device on one line, quoted, with the space after each type", () => {
    expect(formatConcise(devices)).toBe(
      "vg-lv,LVM-abc,0,rw,0 2048 linear 8:16 0;we\\,ird,,1,ro,0 8 error ,8 8 zero ;empty,,2,rw\n",
    );
    expect(formatConcise([])).toBe("");
    expect(quoteConcise("a,b;c\\d")).toBe("a\\,b\\;c\\\\d");
  });

  it("round-trips through parseConcise, except a device without a table (as with dmsetup)", () => {
    expect(parseConcise(formatConcise(devices.slice(0, 2)))).toEqual(devices.slice(0, 2));
    // dmsetup prints no fifth field for it, and create --concise wants five.
    expect(() => parseConcise(formatConcise(devices.slice(2)))).toThrow(/^Five comma-separated fields/);
  });
});
