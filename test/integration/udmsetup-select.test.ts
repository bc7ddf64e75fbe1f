/**
 * `-S/--select` through the real udmsetup against a real udmd (dmsetup-select-compat.test.ts
 * compares the parser and its messages with the real dmsetup): `info -c` shows only the rows that
 * pass (all of them with the `selected` field), the per-device commands run on each selected
 * device as dmsetup runs them (names prefixed, in name order, each device judged when its turn
 * comes), and udm filters `ls` and the long `info` too.
 */
import { describe, expect, it } from "vitest";
import { udmsetup, useDaemon } from "../support/daemon.js";

const env = useDaemon("udm-select-");
const run = (...args: string[]) => udmsetup(env.dir, args);

/** lo <- mid <- top (each stacked on the one before), and solo with a uuid. */
async function makeStack(): Promise<void> {
  for (const [name, table, ...more] of [
    ["lo", "0 8 zero"],
    ["mid", "0 8 linear /dev/mapper/lo 0"],
    ["top", "0 8 linear /dev/mapper/mid 0"],
    ["solo", "0 16 zero", "-u", "UUID-S"],
  ] as const) {
    expect(await run("create", name, "--table", table, ...more)).toEqual({ code: 0, stdout: "", stderr: "" });
  }
}

describe("-S on the listing commands", () => {
  it("ls and info show what passes, over any field, the relationship fields included", async () => {
    await makeStack();
    expect((await run("ls", "-S", 'name=~"^(mid|top)$"')).stdout).toBe("mid\t(253:1)\ntop\t(253:2)\n");
    expect((await run("ls", "-S", "device_ref_count=0 && device_count>0")).stdout).toBe("top\t(253:2)\n");
    expect((await run("ls", "-S", '!(names_using_dev="") || uuid=UUID-S')).stdout).toBe(
      "lo\t(253:0)\nmid\t(253:1)\nsolo\t(253:3)\n",
    );
    expect(await run("ls", "-S", "name=nosuch")).toEqual({ code: 0, stdout: "", stderr: "" });
    expect((await run("ls", "--target", "zero", "-S", "minor>0")).stdout).toBe("solo\t(253, 3)\n");
    expect((await run("info", "-S", "uuid=UUID-S")).stdout).toMatch(/^Name: {14}solo\n(.*\n)*UUID: UUID-S\n\n$/);

    const columns = await run("info", "-c", "-o", "name,devs_used,names_using_dev", "-S", "devs_used!=''");
    expect(columns.stdout).toBe(
      "Name             DevNamesUsed     RefNames\n" +
        "mid              lo               top     \n" +
        "top              mid                      \n",
    );
    expect((await run("info", "-c", "--noheadings", "-o", "name,selected", "-S", "open>=1")).stdout).toBe(
      "lo:1\nmid:1\nsolo:0\ntop:0\n",
    );
    expect((await run("info", "-c", "--noheadings", "-o", "name", "-O-minor", "-S", "segments=1")).stdout).toBe(
      "solo\ntop\nmid\nlo\n",
    );
  });

  it("an unknown field is named, with the fields there are, before any device is looked at", async () => {
    const r = await run("info", "-c", "-S", "nosuchfield=1");
    expect(r.code).toBe(1);
    expect(r.stdout).toBe("");
    expect(r.stderr).toMatch(/^Mapped Device Name Fields\n/);
    expect(r.stderr).toContain(
      "  devs_used             - List of names of mapped devices used by this one. [string]\n",
    );
    expect(r.stderr).toMatch(
      / \nUnrecognised selection field: nosuchfield\nSelection syntax error at 'nosuchfield=1'\.\nUse 'help' for selection to get more help\.\n$/,
    );
  });
});

describe("-S on the commands dmsetup runs per device", () => {
  it("table, status and deps print each selected device under its name", async () => {
    await makeStack();
    expect(await run("table", "-S", "name=mid")).toEqual({ code: 0, stdout: "mid: 0 8 linear 253:0 0\n", stderr: "" });
    expect((await run("status", "-S", "minor<2")).stdout).toBe("lo: 0 8 zero \nmid: 0 8 linear \n");
    expect((await run("deps", "-S", "name=top")).stdout).toBe("top: 1 dependencies\t: (253, 1)\n");
    expect((await run("table", "-S", "name=top", "top", "solo")).stdout).toBe("top: 0 8 linear 253:1 0\n");
  });

  it("suspend, resume, clear and wipe_table act on the selected devices only", async () => {
    await makeStack();
    expect(await run("suspend", "-S", "name=lo || name=solo")).toEqual({ code: 0, stdout: "", stderr: "" });
    const suspended = () => run("info", "-c", "--noheadings", "-o", "name", "-S", "suspended=Suspended");
    expect((await suspended()).stdout).toBe("lo\nsolo\n");
    expect((await run("resume", "-S", "attr=~s")).code).toBe(0);
    expect((await suspended()).stdout).toBe("");

    expect((await run("reload", "solo", "--table", "0 16 error")).code).toBe(0);
    expect((await run("reload", "lo", "--table", "0 8 error")).code).toBe(0);
    expect((await run("clear", "-S", "uuid=UUID-S")).code).toBe(0);
    expect(
      (await run("info", "-c", "--noheadings", "-o", "name,tables_loaded", "-S", "tables_loaded=Both")).stdout,
    ).toBe("lo:Both\n");
    expect((await run("wipe_table", "-S", "uuid=~^UUID")).code).toBe(0);
    expect((await run("table", "solo")).stdout).toBe("0 16 error \n");
    expect((await run("table", "lo")).stdout).toBe("0 8 zero \n");
  });

  it("remove judges each device when its turn comes, in name order; missing arguments fail", async () => {
    await makeStack();
    expect(await run("remove", "-S", "name=top", "top", "mid")).toEqual({ code: 0, stdout: "", stderr: "" });
    // lo is open (mid uses it) when it is judged; mid and solo are not, and go.
    expect(await run("remove", "-S", "open=0")).toEqual({ code: 0, stdout: "", stderr: "" });
    expect((await run("ls")).stdout).toBe("lo\t(253:0)\n");
    expect(await run("remove", "-S", "name=x", "nosuch")).toEqual({
      code: 1,
      stdout: "",
      stderr: "Device does not exist.\nCommand failed.\n",
    });
    expect(await run("remove", "-S", "")).toEqual({ code: 0, stdout: "", stderr: "" }); // "" selects everything
    expect(await run("remove", "-S", "name=x")).toEqual({ code: 0, stdout: "No devices found\n", stderr: "" });
  });
});
