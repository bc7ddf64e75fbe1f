/**
 * Which xfstests tests are the device-mapper ones, and which of those `npm run xfstests` runs by
 * default: it reads each test's requirements, as `_require_dm_target TARGET` and the helpers of
 * common/dm* that call it state them.
 */
import fs from "node:fs";
import path from "node:path";

/** The filesystems the runner can make on TEST_DEV and have xfstests use (`--fs`). */
export const FILESYSTEMS = ["ext4", "xfs"] as const;
export type Filesystem = (typeof FILESYSTEMS)[number];

/** The test folders searched for dm tests: generic/ and the filesystem's own. */
export function testDirs(fs: Filesystem = "ext4"): string[] {
  return ["generic", fs];
}

/** The test folders searched for dm tests with the default filesystem (ext4). */
export const DEFAULT_TEST_DIRS = testDirs();

/** The targets whose tests are run by default. */
export const SELECTED_TARGETS = ["flakey", "error", "delay", "log-writes"];

/**
 * Targets udm is taken not to have when its own list is not at hand (`--list`); a run asks its
 * udmd (`dmsetup targets`) and skips the tests that need a target missing there.
 */
export const MISSING_TARGETS: string[] = [];

/** Helpers of common/dm* that require targets without naming them in the test. */
const HELPER_TARGETS: Record<string, string[]> = {
  _require_log_writes: ["log-writes"],
  _require_log_writes_dax_mountopt: ["log-writes"],
  _require_flakey_with_error_writes: ["flakey"],
  _require_dmhugedisk: ["zero", "snapshot"],
};

export interface DmTest {
  /** As ./check names it: `generic/073`. */
  name: string;
  /** Every dm target it requires, sorted. */
  targets: string[];
}

export interface Selection {
  /** The tests to run, in check's order. */
  run: DmTest[];
  /** dm tests left out because they need a target udm lacks. */
  missingTarget: DmTest[];
  /** Those targets. */
  missing: string[];
  /** dm tests that need none of SELECTED_TARGETS (snapshot, linear, ...): run them by name. */
  otherTargets: DmTest[];
}

/** The dm targets a test script requires (empty: not a dm test). */
export function requiredTargets(script: string): string[] {
  const targets = new Set<string>();
  for (const line of script.split("\n")) {
    const code = line.replace(/(^|\s)#.*$/, "");
    for (const m of code.matchAll(/\b_require_dm_target\s+["']?([\w-]+)/g)) targets.add(m[1]!);
    for (const [helper, helperTargets] of Object.entries(HELPER_TARGETS)) {
      if (new RegExp(`(^|[\\s;&|(])${helper}(\\s|$|;)`).test(code)) helperTargets.forEach((t) => targets.add(t));
    }
  }
  return [...targets].sort();
}

/** Every dm test in `dirs` (folders of `xfstests/tests`), sorted as check sorts them. */
export function findDmTests(xfstests: string, dirs = DEFAULT_TEST_DIRS): DmTest[] {
  const found: DmTest[] = [];
  for (const dir of dirs) {
    const full = path.join(xfstests, "tests", dir);
    if (!fs.existsSync(full)) continue;
    for (const entry of fs.readdirSync(full).sort()) {
      // Tests are numbered (generic/073); their expected outputs (073.out, 073.out.64k) are not tests.
      if (!/^\d+$/.test(entry)) continue;
      const targets = requiredTargets(fs.readFileSync(path.join(full, entry), "utf8"));
      if (targets.length > 0) found.push({ name: `${dir}/${entry}`, targets });
    }
  }
  return found;
}

/**
 * Split the dm tests into those to run, those needing a target udm lacks (not in `available`, or
 * in MISSING_TARGETS when udm's list is not given) and the others.
 */
export function selectDmTests(tests: DmTest[], opts: { allTargets?: boolean; available?: string[] } = {}): Selection {
  const selection: Selection = { run: [], missingTarget: [], missing: [], otherTargets: [] };
  const lacks = (t: string) => (opts.available ? !opts.available.includes(t) : MISSING_TARGETS.includes(t));
  for (const test of tests) {
    const missing = test.targets.filter(lacks);
    if (missing.length > 0) {
      selection.missingTarget.push(test);
      for (const t of missing) if (!selection.missing.includes(t)) selection.missing.push(t);
    } else if (opts.allTargets || test.targets.some((t) => SELECTED_TARGETS.includes(t))) selection.run.push(test);
    else selection.otherTargets.push(test);
  }
  return selection;
}
