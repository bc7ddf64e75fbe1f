/**
 * The parts of `npm run xfstests` that need neither root nor xfstests: reading check's output,
 * choosing the dm tests, the summary table, the checks of PATH_TO_XFSTESTS.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { CheckOutputParser, failureReason } from "./check-output.js";
import { xfstestsProblem } from "./preflight.js";
import { markdownTable, textTable } from "./report.js";
import { findDmTests, requiredTargets, selectDmTests, testDirs } from "./select.js";

/** check's output for a run of six tests, as it prints it (names padded, outcomes after them). */
const RUN = `./check: line 685: echo: write error: Permission denied
FSTYP         -- ext4
PLATFORM      -- Linux/x86_64 vm 6.18.44
MKFS_OPTIONS  -- -F /dev/loop1
MOUNT_OPTIONS -- -o acl,user_xattr /dev/loop1 /tmp/x/scratch

generic/034         11s
generic/073        _check_generic_filesystem: filesystem on /dev/loop1 is inconsistent
(see /r/generic/073.full for details)

generic/101        - output mismatch (see /r/generic/101.out.bad)
    --- tests/generic/101.out	2026-12-07 17:39:55.000000000 +0000
    +++ /r/generic/101.out.bad	2026-12-07 18:01:02.000000000 +0000
    @@ -1,4 +1,4 @@
     QA output created by 101
    -File foo size: 32768
    +File foo size: 0
    ...
    (Run 'diff -u /x/tests/generic/101.out /r/generic/101.out.bad'  to see the entire diff)
generic/311        [failed, exit status 1]- output mismatch (see /r/generic/311.out.bad)
    --- tests/generic/311.out
    +++ /r/generic/311.out.bad
    @@ -1,2 +1,3 @@
     QA output created by 311
    +fsck failed
generic/347        [not run] This test requires dm thin-pool support
generic/359        [expunged]
generic/470        12s ...  [not run] /dev/mapper/logwrites-test ext4 does not support -o dax
generic/482        13s ...  14s
Ran: generic/034 generic/073 generic/101 generic/311 generic/347 generic/470 generic/482
Not run: generic/347 generic/470
Failures: generic/073 generic/101 generic/311
Failed 3 of 7 tests
Xunit report: /r/result.xml
`;

function parse(text: string, chunk = text.length) {
  let t = 0;
  const started: string[] = [];
  const parser = new CheckOutputParser(
    () => (t += 1000),
    (name) => started.push(name),
  );
  for (let i = 0; i < text.length; i += chunk) parser.feed(text.slice(i, i + chunk));
  parser.end();
  return { parser, started };
}

describe("check output", () => {
  it("gives every test its outcome and a one-line reason", () => {
    const results = parse(RUN).parser.results();
    expect(results.map((r) => [r.name, r.status, r.reason])).toEqual([
      ["generic/034", "pass", ""],
      ["generic/073", "fail", "_check_generic_filesystem: filesystem on /dev/loop1 is inconsistent"],
      ["generic/101", "fail", "output mismatch; +File foo size: 0"],
      ["generic/311", "fail", "exit status 1; output mismatch; +fsck failed"],
      ["generic/347", "notrun", "This test requires dm thin-pool support"],
      ["generic/359", "expunged", "expunged"],
      ["generic/470", "notrun", "/dev/mapper/logwrites-test ext4 does not support -o dax"],
      ["generic/482", "pass", ""],
    ]);
    expect(results.find((r) => r.name === "generic/034")!.checkSeconds).toBe(11);
    expect(results.find((r) => r.name === "generic/482")!.checkSeconds).toBe(14);
  });

  it("reads the same when the output comes a byte at a time", () => {
    const whole = parse(RUN).parser.results();
    const { parser, started } = parse(RUN, 1);
    expect(parser.results().map((r) => [r.name, r.status, r.reason])).toEqual(
      whole.map((r) => [r.name, r.status, r.reason]),
    );
    expect(started).toEqual(whole.map((r) => r.name));
  });

  it("knows a test has started as soon as its padded name is printed, before its outcome", () => {
    const parser = new CheckOutputParser();
    parser.feed("FSTYP -- ext4\n\ngeneric/07");
    expect(parser.running).toBeUndefined();
    parser.feed("3        ");
    expect(parser.running).toBe("generic/073");
    parser.feed(" 5s\ngeneric/074 ");
    expect(parser.running).toBe("generic/074");
  });

  it("times each test from its name to the next one", () => {
    let now = 0;
    const parser = new CheckOutputParser(() => now);
    parser.feed("generic/034   ");
    now = 7_400;
    parser.feed("    6s\n");
    now = 9_000;
    parser.feed("generic/039   ");
    now = 30_000;
    parser.feed("  [not run] nope\nRan: generic/034 generic/039\nNot run: generic/039\nPassed all 2 tests\n");
    parser.end();
    expect(parser.results().map((r) => [r.name, r.seconds])).toEqual([
      ["generic/034", 9],
      ["generic/039", 21],
    ]);
  });

  it("a run cut short: the running test is aborted, the rest never started", () => {
    const { parser } = parse("generic/034   6s\ngeneric/039    ");
    expect(parser.results(["generic/034", "generic/039", "generic/040"]).map((r) => [r.name, r.status])).toEqual([
      ["generic/034", "pass"],
      ["generic/039", "aborted"],
      ["generic/040", "not started"],
    ]);
  });

  it("a test killed by the watchdog is a timeout, with what check said after", () => {
    const parser = new CheckOutputParser();
    parser.feed("generic/311    ");
    parser.markTimedOut(900);
    parser.feed("[failed, exit status 143]- output mismatch (see x)\nRan: generic/311\nFailures: generic/311\n");
    parser.end();
    expect(parser.results()[0]).toMatchObject({
      status: "timeout",
      reason: "timed out after 900 s (killed); exit status 143; output mismatch",
    });
  });

  it("check's summary wins over a line that looked like a pass", () => {
    const { parser } = parse(
      "generic/034 6s\n_check_dmesg: something found (see /r/034.dmesg)\nFailures: generic/034\n",
    );
    expect(parser.results()[0]).toMatchObject({ status: "fail", reason: "_check_dmesg: something found" });
  });

  it("failure reasons: a missing line when the test printed less", () => {
    expect(
      failureReason(["- output mismatch (see x)", "    --- a", "    +++ b", "     same", "    -Silence is golden"]),
    ).toBe("output mismatch; missing: Silence is golden");
  });
});

describe("dm test selection", () => {
  let dir: string | undefined;
  afterEach(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it("reads the targets a test requires, also through common/dm* helpers", () => {
    expect(requiredTargets("_require_scratch\n_require_dm_target flakey\n")).toEqual(["flakey"]);
    expect(requiredTargets("_require_dm_target thin-pool\n_require_log_writes\n")).toEqual(["log-writes", "thin-pool"]);
    expect(requiredTargets("_require_flakey_with_error_writes")).toEqual(["flakey"]);
    expect(requiredTargets("_require_dmhugedisk")).toEqual(["snapshot", "zero"]);
    expect(requiredTargets("# _require_dm_target error\n_require_scratch")).toEqual([]);
    expect(requiredTargets("_require_log_writes_dax_mountopt dax")).toEqual(["log-writes"]);
  });

  it("runs flakey, error, delay, log-writes and thin-pool tests; leaves out those whose target udm lacks, and says which", () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "xfstests-select-"));
    const write = (name: string, body: string) => {
      fs.mkdirSync(path.dirname(path.join(dir!, "tests", name)), { recursive: true });
      fs.writeFileSync(path.join(dir!, "tests", name), `#! /bin/bash\n. ./common/preamble\n${body}\n`);
    };
    write("generic/001", "_require_scratch");
    write("generic/034", "_require_dm_target flakey");
    write("generic/034.out", "_require_dm_target flakey");
    write("generic/081", "_require_dm_target snapshot");
    write("generic/250", "_require_dm_target error");
    write("generic/455", "_require_log_writes\n_require_dm_target thin-pool");
    write("generic/470", "_require_log_writes_dax_mountopt dax");
    write("ext4/033", "_require_dmhugedisk");
    write("xfs/311", "_require_dm_target delay");
    const sel = selectDmTests(findDmTests(dir));
    expect(sel.run.map((t) => t.name)).toEqual(["generic/034", "generic/250", "generic/455", "generic/470"]);
    expect([sel.missingTarget, sel.missing]).toEqual([[], []]);
    expect(sel.otherTargets.map((t) => t.name)).toEqual(["generic/081", "ext4/033"]);
    // --fs xfs: generic/ and xfs/.
    expect(selectDmTests(findDmTests(dir, testDirs("xfs"))).run.map((t) => t.name)).toEqual([
      "generic/034",
      "generic/250",
      "generic/455",
      "generic/470",
      "xfs/311",
    ]);
    // With udm's own list of targets: what it lacks decides.
    const noThin = selectDmTests(findDmTests(dir), {
      available: ["error", "flakey", "log-writes", "snapshot", "zero"],
    });
    expect(noThin.run.map((t) => t.name)).toEqual(["generic/034", "generic/250", "generic/470"]);
    expect([noThin.missingTarget.map((t) => t.name), noThin.missing]).toEqual([["generic/455"], ["thin-pool"]]);
    const noError = selectDmTests(findDmTests(dir), { available: ["flakey", "log-writes", "snapshot", "zero"] });
    expect([noError.missingTarget.map((t) => t.name), noError.missing]).toEqual([
      ["generic/250", "generic/455"],
      ["error", "thin-pool"],
    ]);
    expect(selectDmTests(findDmTests(dir), { allTargets: true }).run.map((t) => t.name)).toEqual([
      "generic/034",
      "generic/081",
      "generic/250",
      "generic/455",
      "generic/470",
      "ext4/033",
    ]);
  });

  it("PATH_TO_XFSTESTS must be a checkout, and built", () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "xfstests-path-"));
    expect(xfstestsProblem(path.join(dir, "nope"))).toMatch(/no such directory/);
    expect(xfstestsProblem(dir)).toMatch(/is not an xfstests checkout \(no check, common\/rc/);
    for (const f of ["check", "common/rc", "common/dmflakey", "tests/generic/001"]) {
      fs.mkdirSync(path.dirname(path.join(dir, f)), { recursive: true });
      fs.writeFileSync(path.join(dir, f), "");
    }
    expect(xfstestsProblem(dir)).toMatch(/is an xfstests checkout, but it is not built \(no ltp\/fsstress.*run `make`/);
    for (const f of ["ltp/fsstress", "ltp/fsx", "src/log-writes/replay-log", "src/godown"]) {
      fs.mkdirSync(path.dirname(path.join(dir, f)), { recursive: true });
      fs.writeFileSync(path.join(dir, f), "");
    }
    expect(xfstestsProblem(dir)).toBeNull();
  });
});

describe("summary", () => {
  const results = parse(RUN).parser.results(["generic/999"]);

  it("a table: test, result, seconds, reason; long reasons cut to the width", () => {
    const lines = textTable(results, 80).split("\n");
    expect(lines[0]).toMatch(/^test\s+result\s+seconds\s+reason$/);
    expect(lines.find((l) => l.startsWith("generic/073"))).toMatch(/fail\s+\d+\s+_check_generic_filesystem.*\.\.\.$/);
    expect(lines.every((l) => l.length <= 80)).toBe(true);
    expect(lines.at(-1)).toMatch(/^generic\/999\s+not started$/);
  });

  it("as Markdown, with | escaped", () => {
    const md = markdownTable([{ ...results[0]!, reason: "a | b" }]);
    expect(md.split("\n")).toEqual([
      "| test | result | seconds | reason |",
      "|---|---|---:|---|",
      `| generic/034 | pass | ${results[0]!.seconds} | a \\| b |`,
    ]);
  });
});
