/**
 * The pure parts behind `--manglename`/`mangle` and `setgeometry`, at the edges the CLI tests do
 * not reach: libdm's mangle_string/unmangle_string corner cases and the kernel's geometry parse.
 */
import { describe, expect, it } from "vitest";
import { parseGeometry } from "../../dmsetup/control/geometry.js";
import { mangleString, unmangleString } from "../../dmsetup/cli/name-mangling.js";

describe("name mangling as libdm's", () => {
  it("mangles bytes outside udev's whitelist, UTF-8 byte by byte, and keeps a name that needs none", () => {
    expect(mangleString("a b", "name", "auto")).toBe("a\\x20b");
    expect(mangleString("ü", "name", "auto")).toBe("\\xc3\\xbc");
    expect(mangleString("a-b.c:d=e@f_g#h+i", "name", "auto")).toBe("a-b.c:d=e@f_g#h+i");
    expect(mangleString("a\\x20b", "name", "auto")).toBe("a\\x20b"); // already mangled: kept
    expect(mangleString("a\\x20b", "name", "hex")).toBe("a\\x5cx20b"); // hex mangles the backslash
  });

  it("refuses mixed forms, a truncated escape, and a mangled form longer than the buffer", () => {
    const mixed = /contains mixed mangled and unmangled characters/;
    expect(() => mangleString("a\\x20b c", "name", "auto")).toThrow(mixed);
    expect(() => mangleString("a b\\x20c", "name", "auto")).toThrow(mixed);
    expect(() => mangleString("ab\\x2", "name", "auto")).toThrow(mixed);
    expect(() => mangleString(" ".repeat(32), "name", "auto")).toThrow(/^Mangled form of the name too long for/);
    expect(mangleString(" ".repeat(31), "name", "auto")).toHaveLength(124);
  });

  it("unmangles strictly unless the mode is none; a bad escape ends the result there", () => {
    expect(unmangleString("a\\x20b", "name", "auto")).toBe("a b");
    expect(unmangleString("\\xc3\\xbc", "name", "auto")).toBe("ü");
    expect(() => unmangleString("a b", "name", "auto")).toThrow(/should be mangled but it contains blacklisted/);
    expect(unmangleString("a b", "name", "none")).toBe("a b");
    expect(unmangleString("a\\x4gz", "name", "none")).toBe("a\x04z"); // one hex digit read, four bytes skipped
    expect(unmangleString("a\\x20b\\xzz", "name", "none")).toBe("a b");
    expect(unmangleString("ab\\xzz", "name", "none")).toBe("ab\\xzz"); // nothing decoded: as it was
  });
});

describe("setgeometry's values as dev_set_geometry reads them", () => {
  it("takes four unsigned numbers separated by blanks, nothing after them", () => {
    expect(parseGeometry("1023 255 63 0")).toEqual({ cylinders: 1023, heads: 255, sectors: 63, start: "0" });
    expect(parseGeometry(" 1\t2  3 6")).toEqual({ cylinders: 1, heads: 2, sectors: 3, start: "6" });
    for (const bad of ["1 2 3", "1 2 3 4 ", "1 2 3 4 5", "1 2 3 x", "+1 2 3 4", "-1 2 3 4", "1,2 3 4 5", ""])
      expect(() => parseGeometry(bad), bad).toThrow("Unable to interpret geometry settings.");
  });

  it("checks the ranges, then the start against cylinders × heads × sectors; values wrap at 2^64", () => {
    expect(() => parseGeometry("65536 1 1 0")).toThrow("Geometry exceeds range limits.");
    expect(() => parseGeometry("1 1 256 0")).toThrow("Geometry exceeds range limits.");
    expect(() => parseGeometry("2 3 4 25")).toThrow("Start sector is beyond the geometry limits.");
    expect(parseGeometry("2 3 4 24").start).toBe("24");
    expect(parseGeometry("18446744073709551617 1 1 1").cylinders).toBe(1);
  });
});
