/**
 * `npm run xfstests -- [options] PATH_TO_XFSTESTS [TESTS...]`: xfstests' device-mapper tests on
 * udm devices. See USAGE and docs/testing.md ("xfstests").
 *
 * The run: check that PATH is a built xfstests checkout and that the tools are here; make the
 * environment (./environment.ts); run ./check in a process group of its own, passing its output
 * through while reading it (./check-output.ts) to know which test runs and to kill one that runs
 * longer than --timeout; then remove everything it made, whatever happened (also after Ctrl-C),
 * and print the table of results (./report.ts), also saved as summary.md and summary.json.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { type ParseArgsConfig, parseArgs } from "node:util";
import { killQuietly } from "../support/system-state.js";
import { CheckOutputParser, type TestRecord } from "./check-output.js";
import { DEFAULT_TMP_PARENT, XfstestsEnv, formatBytes, parseSize } from "./environment.js";
import { staleBuild, systemProblem, xfstestsProblem } from "./preflight.js";
import { allGood, counts, markdownReport, type RunInfo, textTable } from "./report.js";
import { FILESYSTEMS, type Filesystem, findDmTests, selectDmTests, type Selection, testDirs } from "./select.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

const USAGE = `Usage: npm run xfstests -- [options] PATH_TO_XFSTESTS [TESTS...]

Runs xfstests' device-mapper tests on udm: loop devices over sparse files for TEST_DEV (ext4,
or --fs xfs),
SCRATCH_DEV and LOGWRITES_DEV, a udmd of its own (auto-attach, symlinks in /dev/mapper) and
udmsetup as \`dmsetup\`. TESTS go to ./check as they are (generic/073, or check's options such as
-g quick); by default every test in generic/ and the filesystem's folder (ext4/, xfs/) that requires dm-flakey, dm-error,
dm-delay or dm-log-writes, except those that need thin-pool (udm has no thin-pool). Needs root.

Options (before PATH_TO_XFSTESTS):
  --timeout SECONDS   a test still running after this long is killed (default 900)
  --size SIZE         size of each sparse image, e.g. 10G (default 10G)
  --results DIR       check's results, udmd.log, dmsetup.log, check.log, summary.{md,json}
                      (default PATH_TO_XFSTESTS/results/udm-DATE)
  --tmp DIR           where the temporary directory goes (default ${DEFAULT_TMP_PARENT})
  --udm DIR           the udm checkout whose dist/ runs (default ${REPO})
  --dev-dir DIR       where udmd makes the device symlinks (default /dev/mapper)
  --fs ext4|xfs       the filesystem of TEST_DEV and xfstests' FSTYP (default ext4)
  --all-dm            by default, also the tests of the other dm targets (snapshot, linear)
  --list              print the default selection and exit (no root needed)
  -h, --help

Exit status: 0 when every test passed or did not run for a stated reason; 1 when one failed,
timed out or the run was interrupted; 2 for bad arguments or a setup that failed.
`;

const OPTIONS = {
  timeout: { type: "string" },
  size: { type: "string" },
  results: { type: "string" },
  tmp: { type: "string" },
  udm: { type: "string" },
  "dev-dir": { type: "string" },
  fs: { type: "string" },
  "all-dm": { type: "boolean" },
  list: { type: "boolean" },
  help: { type: "boolean", short: "h" },
} satisfies ParseArgsConfig["options"];

class UsageError extends Error {}

interface Command {
  xfstests: string;
  checkArgs: string[];
  timeoutS: number;
  devBytes: number;
  resultsDir: string | undefined;
  tmpParent: string;
  udmRoot: string;
  devDir: string;
  fsType: Filesystem;
  allDm: boolean;
  list: boolean;
}

/** Our options come before PATH_TO_XFSTESTS; everything after it belongs to ./check. */
function parseCommand(argv: string[]): Command | null {
  const at = argv.findIndex((a, i) => !a.startsWith("-") && !takesValue(argv[i - 1]));
  const ours = at < 0 ? argv : argv.slice(0, at);
  let values;
  try {
    ({ values } = parseArgs({ args: ours, options: OPTIONS, strict: true, allowPositionals: false }));
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  if (values.help) return null;
  if (at < 0) throw new UsageError("PATH_TO_XFSTESTS is missing");
  const timeoutS = values.timeout === undefined ? 900 : Number(values.timeout);
  if (!Number.isFinite(timeoutS) || timeoutS <= 0)
    throw new UsageError(`--timeout ${values.timeout}: not a positive number`);
  const devBytes = values.size === undefined ? 10 * 2 ** 30 : parseSize(values.size);
  if (devBytes === undefined || devBytes < 2 ** 30)
    throw new UsageError(`--size ${values.size}: give 1G or more (10G, 20G)`);
  const fsType = (values.fs ?? "ext4") as Filesystem;
  if (!FILESYSTEMS.includes(fsType)) throw new UsageError(`--fs ${values.fs}: expected ${FILESYSTEMS.join(" or ")}`);
  return {
    fsType,
    xfstests: path.resolve(argv[at]!),
    checkArgs: argv.slice(at + 1),
    timeoutS,
    devBytes,
    resultsDir: values.results === undefined ? undefined : path.resolve(values.results),
    tmpParent: path.resolve(values.tmp ?? DEFAULT_TMP_PARENT),
    udmRoot: path.resolve(values.udm ?? REPO),
    devDir: path.resolve(values["dev-dir"] ?? "/dev/mapper"),
    allDm: values["all-dm"] ?? false,
    list: values.list ?? false,
  };
}

function takesValue(arg: string | undefined): boolean {
  if (!arg?.startsWith("--") || arg.includes("=")) return false;
  const spec = (OPTIONS as Record<string, { type: string }>)[arg.slice(2)];
  return spec?.type === "string";
}

function gitDescribe(dir: string): string {
  const r = spawnSync("git", ["-C", dir, "log", "-1", "--format=%h %s"], { encoding: "utf8" });
  const line = r.status === 0 ? r.stdout.trim() : "";
  const dirty = spawnSync("git", ["-C", dir, "status", "--porcelain", "--untracked-files=no"], { encoding: "utf8" });
  if (!line) return dir;
  return `${dir} at ${line.length > 90 ? line.slice(0, 87) + "..." : line}${dirty.stdout?.trim() ? " (with uncommitted changes)" : ""}`;
}

function printSelection(sel: Selection): void {
  const names = (tests: { name: string; targets: string[] }[]) =>
    tests.map((t) => `${t.name} (${t.targets.join(", ")})`).join(", ");
  console.log(`${sel.run.length} tests selected: ${sel.run.map((t) => t.name).join(" ")}`);
  if (sel.missingTarget.length > 0)
    console.log(`skipped, they need ${sel.missing.join(", ")}, which udm does not have: ${names(sel.missingTarget)}`);
  if (sel.otherTargets.length > 0)
    console.log(`not selected, other dm targets (run them by name, or --all-dm): ${names(sel.otherTargets)}`);
}

/** Every process below `root` (children first found through /proc/PID/stat's ppid). */
function descendants(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry)]);
    } catch {
      // exited meanwhile
    }
  }
  const out: number[] = [];
  const queue = [root];
  while (queue.length > 0) {
    for (const c of children.get(queue.shift()!) ?? []) {
      out.push(c);
      queue.push(c);
    }
  }
  return out;
}

/** The processes of the running test `name` (the test script, started by check, and all below it). */
function testProcesses(checkPid: number, name: string): number[] {
  const script = descendants(checkPid).find((pid) => {
    try {
      return fs
        .readFileSync(`/proc/${pid}/cmdline`, "utf8")
        .split("\0")
        .some((a) => a.endsWith(`tests/${name}`));
    } catch {
      return false;
    }
  });
  return script === undefined ? [] : [script, ...descendants(script)];
}

/** After a test was killed, how long check may take to get to the next one before the run is given up. */
const GIVE_UP_AFTER_KILL_S = 240;
const KILL_GRACE_MS = 30_000;

async function run(cmd: Command): Promise<number> {
  const startedAt = Date.now();
  const dmTests = findDmTests(cmd.xfstests, testDirs(cmd.fsType));
  if (cmd.list) {
    printSelection(selectDmTests(dmTests, { allTargets: cmd.allDm }));
    return 0;
  }
  const problem = systemProblem();
  if (problem) {
    console.error(`npm run xfstests: ${problem}`);
    return 2;
  }
  for (const f of ["udmd.js", "udmsetup.js"]) {
    if (!fs.existsSync(path.join(cmd.udmRoot, "dist/dmsetup/bin", f))) {
      console.error(
        `npm run xfstests: ${cmd.udmRoot} is not built (no dist/dmsetup/bin/${f}): run npm run build there`,
      );
      return 2;
    }
  }
  const stale = staleBuild(cmd.udmRoot);
  if (stale.length > 0)
    console.error(
      `warning: ${stale.length} source file(s) are newer than dist/ (${stale.slice(0, 3).join(", ")}${stale.length > 3 ? ", ..." : ""}); this run uses dist/: npm run build to test them`,
    );

  const explicit = cmd.checkArgs.length > 0;
  let checkArgs = cmd.checkArgs;
  const stamp = new Date().toISOString().replace(/[:]/g, "").replace(/\..*$/, "");
  const resultsDir = cmd.resultsDir ?? path.join(cmd.xfstests, "results", `udm-${stamp}`);
  const log = (m: string) => console.log(`[xfstests-udm ${new Date().toISOString().slice(11, 19)}] ${m}`);
  const env = new XfstestsEnv({
    udmRoot: cmd.udmRoot,
    xfstests: cmd.xfstests,
    resultsDir,
    tmpParent: cmd.tmpParent,
    devBytes: cmd.devBytes,
    devDir: cmd.devDir,
    fsType: cmd.fsType,
    log,
  });

  let check: ChildProcess | undefined;
  let checkExit: Promise<number | null> | undefined;
  let interrupts = 0;
  let abortReason: string | undefined;
  let cleaned = false;
  const killCheck = (signal: NodeJS.Signals) => {
    if (check?.pid && check.exitCode === null && check.signalCode === null) killQuietly(-check.pid, signal);
  };
  const abort = (reason: string) => {
    if (abortReason) return;
    abortReason = reason;
    log(`stopping the run: ${reason}`);
    killCheck("SIGINT");
    setTimeout(() => killCheck("SIGKILL"), KILL_GRACE_MS).unref();
  };
  const onSignal = (sig: NodeJS.Signals) => {
    interrupts++;
    if (interrupts === 1) {
      abort(`interrupted (${sig})`);
      log("Ctrl-C again kills ./check at once; the cleanup follows either way");
    } else if (interrupts === 2) {
      log("killing ./check now; cleaning up (Ctrl-C once more leaves at once, lazily undoing what it can)");
      killCheck("SIGKILL");
    } else {
      env.cleanupSync();
      cleaned = true;
      process.exit(130);
    }
  };
  const signals: NodeJS.Signals[] = ["SIGINT", "SIGTERM", "SIGHUP"];
  for (const s of signals) process.on(s, onSignal);
  process.on("exit", () => {
    if (!cleaned) env.cleanupSync();
  });

  let parser: CheckOutputParser | undefined;
  let results: TestRecord[] = [];
  let setupFailed = false;
  let expected: string[] = [];
  try {
    try {
      await env.setup(() => abortReason !== undefined);
    } catch (err) {
      setupFailed = abortReason === undefined;
      throw err;
    }
    if (!explicit) {
      // The tests of the targets this udmd offers (thin-pool's are skipped while it has none).
      const selection = selectDmTests(dmTests, { allTargets: cmd.allDm, available: await env.targets() });
      printSelection(selection);
      checkArgs = selection.run.map((t) => t.name);
    }
    expected = checkArgs.filter((a) => /^[\w-]+\/\d+$/.test(a));
    const checkLog = fs.openSync(path.join(resultsDir, "check.log"), "w");
    let lastOutput = Date.now();
    let checkStderr = "";
    parser = new CheckOutputParser(Date.now);
    const p = parser;
    log(`./check -R xunit-quiet ${checkArgs.join(" ")}  (in ${cmd.xfstests}, results in ${resultsDir})`);
    check = spawn("./check", ["-R", "xunit-quiet", ...checkArgs], {
      cwd: cmd.xfstests,
      env: env.checkEnv(),
      detached: true,
      stdio: ["ignore", "pipe", "pipe"],
    });
    const c = check;
    checkExit = new Promise((resolve) => c.once("exit", (code, signal) => resolve(code ?? (signal ? 128 : null))));
    // Only stdout is parsed (a test's own stderr goes to its files; check's is its complaints,
    // which must not land in the middle of a test's line).
    for (const stream of [c.stdout!, c.stderr!]) {
      stream.setEncoding("utf8");
      stream.on("data", (chunk: string) => {
        lastOutput = Date.now();
        (stream === c.stdout ? process.stdout : process.stderr).write(chunk);
        fs.writeSync(checkLog, chunk);
        if (stream === c.stdout) p.feed(chunk);
        else checkStderr = (checkStderr + chunk).slice(-4000);
      });
    }
    // The watchdog: a test running past --timeout is killed (check then reports it failed and
    // goes on); if check still does not get to the next test, or prints nothing for that long
    // between tests, the run is given up.
    const killed = new Map<string, number>();
    const watchdog = setInterval(() => {
      env.noteAttachments();
      const name = p.running;
      const now = Date.now();
      if (name === undefined || p.runningSince === undefined) {
        if (now - lastOutput > cmd.timeoutS * 1000) abort(`./check printed nothing for ${cmd.timeoutS} s`);
        return;
      }
      const key = `${name}@${p.runningSince}`;
      const runningS = (now - p.runningSince) / 1000;
      if (runningS > cmd.timeoutS && !killed.has(key)) {
        killed.set(key, now);
        p.markTimedOut(cmd.timeoutS);
        const pids = testProcesses(c.pid!, name);
        log(`${name} has run for ${cmd.timeoutS} s: killing it (${pids.length} processes)`);
        for (const pid of pids) killQuietly(pid, "SIGTERM");
        setTimeout(
          () => testProcesses(c.pid!, name).forEach((pid) => killQuietly(pid, "SIGKILL")),
          KILL_GRACE_MS,
        ).unref();
      }
      const killedAt = killed.get(key);
      if (killedAt !== undefined && now - killedAt > GIVE_UP_AFTER_KILL_S * 1000)
        abort(`${name} was killed ${GIVE_UP_AFTER_KILL_S} s ago and check has not moved on (a hung device?)`);
    }, 5_000);
    // Once the run is being stopped, check gets a while to wrap up; if it is stuck in I/O on a
    // hung device, the cleanup (which aborts FUSE) is what lets it go.
    const givenUp = new Promise<void>((resolve) => {
      const t = setInterval(() => {
        if (abortReason !== undefined) {
          clearInterval(t);
          setTimeout(resolve, KILL_GRACE_MS + 30_000).unref();
        }
      }, 500);
      void checkExit!.then(() => clearInterval(t));
    });
    const code = await Promise.race([checkExit, givenUp.then(() => "given up" as const)]);
    clearInterval(watchdog);
    parser.end();
    fs.closeSync(checkLog);
    if (code === "given up") log("./check did not exit; cleaning up under it");
    else if (code !== 0 && parser.checkSummary.ran === undefined && !abortReason) {
      abortReason = `./check exited with status ${code} before its summary`;
      console.error([...parser.otherLines.slice(-10), checkStderr.trim()].filter(Boolean).join("\n"));
    }
    results = parser.results(expected);
  } catch (err) {
    console.error(`npm run xfstests: ${(err as Error).message}`);
    if (parser) results = parser.results(expected);
  } finally {
    log("cleaning up: mounts, udm devices, udmd, loop devices, temporary directory");
    killCheck("SIGKILL");
    const leftovers = await env.cleanup();
    cleaned = true;
    if (checkExit) await Promise.race([checkExit, sleep(10_000)]);
    if (leftovers.length > 0) console.error(`left behind (remove by hand):\n  ${leftovers.join("\n  ")}`);
  }
  for (const s of signals) process.off(s, onSignal);
  if (setupFailed) return 2;

  const info: RunInfo = {
    started: new Date(startedAt).toISOString(),
    seconds: Math.round((Date.now() - startedAt) / 1000),
    udm: gitDescribe(cmd.udmRoot),
    xfstests: gitDescribe(cmd.xfstests),
    kernel: `${os.release()} (${os.arch()})`,
    command: `npm run xfstests -- ${process.argv.slice(2).join(" ")}`,
    aborted: abortReason,
  };
  if (results.length > 0) console.log(`\n${textTable(results, process.stdout.columns || 160)}\n`);
  console.log(`${counts(results)}; ${info.seconds} s in all${abortReason ? `; stopped early: ${abortReason}` : ""}`);
  fs.writeFileSync(path.join(resultsDir, "summary.md"), markdownReport(info, results));
  fs.writeFileSync(path.join(resultsDir, "summary.json"), JSON.stringify({ ...info, results }, null, 2) + "\n");
  console.log(`results: ${resultsDir} (summary.md, check.log, udmd.log, dmsetup.log)`);
  console.log(`devices were ${formatBytes(cmd.devBytes)} sparse images; a test ran at most ${cmd.timeoutS} s`);
  return abortReason || !allGood(results) ? 1 : 0;
}

async function main(): Promise<number> {
  let cmd;
  try {
    cmd = parseCommand(process.argv.slice(2));
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`npm run xfstests: ${err.message}\n\n${USAGE}`);
    return 2;
  }
  if (cmd === null) {
    console.log(USAGE);
    return 0;
  }
  const problem = xfstestsProblem(cmd.xfstests);
  if (problem) {
    console.error(`npm run xfstests: ${problem}`);
    return 2;
  }
  return run(cmd);
}

process.exitCode = await main();
