/**
 * udmsetup's `-S/--select` and option checks against the real dmsetup (lvm2's, from Debian's
 * dmsetup package), where dmsetup runs without the kernel driver: `splitname` is a report, so
 * its selections are parsed and evaluated in full; `info -c -S` parses the selection before it
 * reaches the driver, so every syntax error prints the same; bad option values are refused while
 * reading the command line. udmsetup must print the same, byte for byte, less what udm does not
 * have (the statistics fields in the field list) and the driver errors, and must not start a
 * daemon for any of these failures.
 */
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { tempDir, UDMSETUP } from "../support/daemon.js";
import { missingTools } from "../support/requirements.js";

const missing = missingTools("dmsetup comparison", ["dmsetup"]);

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile(cmd, args, { env: { ...process.env, LANG: "C" }, cwd: "/" }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

/**
 * dmsetup's output less what udm does not have: its two dm-stats field sections, and everything
 * from the first complaint about the missing kernel driver on.
 */
function withoutStatsAndDriver(text: string): string {
  const cut = text.indexOf("/dev/mapper/control: open failed");
  return (cut < 0 ? text : text.slice(0, cut)).replace(
    /Mapped Device Statistics (Region Information )?Fields\n-+\n( {2}.*\n)* \n/g,
    "",
  );
}

let runDir: string;
beforeEach(() => {
  runDir = tempDir("udm-select-compat-");
});
afterEach(() => {
  // Nothing may have been started or even created there: every case fails before udmd is reached.
  const left = fs.readdirSync(runDir);
  const pidFile = path.join(runDir, "udmd.pid");
  if (fs.existsSync(pidFile)) process.kill(Number(fs.readFileSync(pidFile, "utf8")), "SIGTERM");
  fs.rmSync(runDir, { recursive: true, force: true });
  expect(left).toEqual([]);
});

/** udmsetup with autostart on, in an empty run directory: any daemon it started would show there. */
const udmsetup = (args: string[]) => run(process.execPath, [UDMSETUP, "--run-dir", runDir, ...args]);

/** Selections over the splitname report's fields (vg_name, lv_name, lv_layer, subsystem, selected). */
const SPLITNAME_SELECTIONS = [
  "vg_name=vg",
  "vg_name=x",
  "lv_name=~^l",
  'lv_name=~"v$"',
  "lv_name=~(v|x)",
  "lv_name=~{l.}",
  "lv_name=~[lx]",
  "lv_name!~^l",
  "!(vg_name=vg)",
  "!(!(vg_name=vg))",
  "vg_name=x || lv_name=lv",
  "vg_name=x,lv_name=lv",
  "vg_name=vg,lv_name=lv",
  "(vg_name=vg && lv_name!=lv) # subsystem=LVM",
  "vg_name=vg,(lv_name=x#lv_name=lv)",
  "vg_name=a||lv_name=lv",
  "vg_name=a&&lv_name=lv",
  "selected=1",
  "selected=0",
  "selected>0",
  "selected>=1",
  "selected<1",
  "selected<=0",
  "selected!=1",
  "selected=1.5",
  "selected=.5",
  "selected=18446744073709551615",
  'vg_name="vg"',
  "vg_name='vg'",
  "vg_name=",
  "lv_layer=",
  'lv_layer=""',
  "  vg_name  =  vg  ",
  "((vg_name=vg))",
  "vg_name==vg",
  "VG_NAME=vg",
  "vgname=vg",
  "VgName=vg",
  "all",
  "ALL",
  "",
];

/** Selections that are refused: the messages, in order, and exit status 1. */
const BAD_SELECTIONS = [
  'vg_name="vg',
  "vg_name=vg)",
  "(vg_name=vg",
  "!vg_name=vg",
  "!(vg_name=vg",
  "vg_name=vg &&",
  "vg_name=vg ||",
  "&& vg_name=vg",
  "vg_name",
  "vg_name vg",
  "vg_name=vg lv_name=lv",
  "foo=1",
  "help=1",
  "HELP=1",
  "vg_name>1",
  "vg_name<x",
  "vg_name since 1",
  "selected since 1",
  "selected=~1",
  "selected=x",
  'selected="1"',
  "selected=1%",
  "selected=1k",
  "selected=1h",
  "selected=1x",
  "selected=99999999999999999999",
  "selected=18446744073709551616",
  "name=~",
  'name=~"',
  "vg_name=[vg,x]",
  "(",
  ")",
  "!",
  ",",
  "=",
];

describe.skipIf(missing.length > 0)("-S as dmsetup parses and evaluates it", () => {
  it.each(SPLITNAME_SELECTIONS.map((s) => [s]))("splitname -S %j", async (selection) => {
    const args = ["splitname", "vg-lv-x", "-o", "vg_name,lv_name,selected", "-S", selection];
    const [ours, theirs] = await Promise.all([udmsetup(args), run("dmsetup", args)]);
    expect(ours).toEqual(theirs);
  });

  it.each(BAD_SELECTIONS.map((s) => [s]))("a bad selection: info -c -S %j", async (selection) => {
    const args = ["info", "-c", "-S", selection];
    const [ours, theirs] = await Promise.all([udmsetup(args), run("dmsetup", args)]);
    expect(theirs.code).toBe(1);
    expect({ code: ours.code, stdout: ours.stdout, stderr: ours.stderr }).toEqual({
      code: 1,
      stdout: "",
      stderr: withoutStatsAndDriver(theirs.stderr),
    });
  });

  it("the same messages for the commands that run per selected device (remove, table, ...) and for splitname", async () => {
    for (const command of [["remove"], ["suspend"], ["table"], ["status"], ["deps"], ["splitname", "vg-lv"]]) {
      const args = [...command, "-S", "lv_name>1"];
      const [ours, theirs] = await Promise.all([udmsetup(args), run("dmsetup", args)]);
      expect(ours, args.join(" ")).toEqual({ code: 1, stdout: "", stderr: withoutStatsAndDriver(theirs.stderr) });
    }
  });

  it("-S help prints the fields and the selection syntax on stderr and does nothing else", async () => {
    const [ours, theirs] = await Promise.all([
      udmsetup(["info", "-c", "-S", "help"]),
      run("dmsetup", ["info", "-c", "-S", "help"]),
    ]);
    expect(ours).toEqual({ code: 0, stdout: "", stderr: withoutStatsAndDriver(theirs.stderr) });
    expect(ours.stderr).toContain("Selection operators\n");
    expect((await udmsetup(["remove", "-S", "?"])).stderr).toBe(ours.stderr);
  });

  it("a regular expression that does not parse ends with libdm's lines (the reason is JavaScript's)", async () => {
    const args = ["info", "-c", "-S", 'name=~"a(b"'];
    const [ours, theirs] = await Promise.all([udmsetup(args), run("dmsetup", args)]);
    const tail = (s: string) => s.split("\n").slice(-3).join("\n");
    expect(ours.code).toBe(1);
    expect(tail(ours.stderr)).toBe(tail(withoutStatsAndDriver(theirs.stderr)));
  });
});

describe.skipIf(missing.length > 0)("option values and commands refused before a daemon is reached", () => {
  it.each([
    [["--manglename", "foo", "ls"]],
    [["--manglename", "", "info"]],
    [["-M", "0", "create", "x"]],
    [["-M", "8", "create", "x"]],
    [["-M", "0644x", "ls"]],
    [["--mode", "", "ls"]],
  ])("%j: dmsetup's lines, exit 1", async (args) => {
    const [ours, theirs] = await Promise.all([udmsetup(args), run("dmsetup", args)]);
    expect(ours).toEqual(theirs);
    expect(ours.code).toBe(1);
  });

  it.each([
    [["nosuchcommand"]],
    [["target-version"]],
    [["setgeometry", "a", "1", "2", "3"]],
    [["setgeometry", "a", "1", "2", "3", "4", "5"]],
  ])("%j: dmsetup's first line (then the usage), exit 1", async (args) => {
    const [ours, theirs] = await Promise.all([udmsetup(args), run("dmsetup", args)]);
    const first = (r: Run) => ({ code: r.code, stdout: r.stdout, line: r.stderr.split("\n")[0] });
    expect(first(ours)).toEqual(first(theirs));
    expect(ours.stderr).toContain("Usage: udmsetup");
  });
});
