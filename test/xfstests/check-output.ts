/**
 * Reading xfstests' `./check` output as it streams: when each test starts (check prints its name
 * without a newline, then the outcome when it ends), what became of it and why.
 *
 * What check prints for a test, after the name padded to a column (and, when a check.time from
 * an earlier run exists, "<seconds>s ... "):
 *
 *     generic/034         6s                                        passed
 *     generic/347        [not run] This test requires dm thin-pool support
 *     generic/359        [expunged]
 *     generic/073        _check_generic_filesystem: filesystem on /dev/loop1 is inconsistent
 *     (see /results/generic/073.full for details)
 *     generic/101        - output mismatch (see /results/generic/101.out.bad)
 *         --- tests/generic/101.out ...                             the diff, indented 4 spaces
 *     generic/311        [failed, exit status 1]- output mismatch (see ...)
 *
 * and at the end `Ran: ...`, `Not run: ...`, `Failures: ...`, `Failed N of M tests` or
 * `Passed all N tests`. The summary decides pass, fail and not run; the lines give the reasons.
 */

export type TestStatus = "pass" | "fail" | "notrun" | "expunged" | "timeout" | "aborted" | "not started";

export interface TestRecord {
  name: string;
  status: TestStatus;
  /** Wall-clock seconds from the test's name appearing to the next test or the summary. */
  seconds: number;
  /** The time check itself reported for a passing test. */
  checkSeconds?: number;
  /** Why it did not run or did not pass (one line). */
  reason: string;
  /** The runner killed it after this many seconds. */
  timedOutAfter?: number;
  /** What check printed for it after its name. */
  output: string[];
  startedAt: number;
  endedAt?: number;
}

export interface CheckSummary {
  ran?: string[];
  notRun?: string[];
  failures?: string[];
}

const TEST_AT_LINE_START = /^([A-Za-z0-9_-]+\/\d+)(?=\s|$)/;
const SUMMARY_LINE = /^(Ran|Not run|Failures):\s*(.*)$/;
const END_LINE = /^(Passed all \d+ tests|Failed \d+ of \d+ tests)$/;

export class CheckOutputParser {
  private pending = "";
  private current: TestRecord | undefined;
  private readonly records: TestRecord[] = [];
  private readonly summary: CheckSummary = {};
  /** Lines outside any test (the header, errors of check itself): the last 100. */
  readonly otherLines: string[] = [];

  constructor(
    private readonly now: () => number = Date.now,
    private readonly onStart: (name: string) => void = () => undefined,
  ) {}

  /** The test running now (its name has been printed, its outcome not yet), if any. */
  get running(): string | undefined {
    return this.current?.name;
  }

  /** The time the running test started. */
  get runningSince(): number | undefined {
    return this.current?.startedAt;
  }

  feed(chunk: string): void {
    this.pending += chunk.replace(/\r/g, "");
    let nl;
    while ((nl = this.pending.indexOf("\n")) >= 0) {
      const line = this.pending.slice(0, nl);
      this.pending = this.pending.slice(nl + 1);
      this.line(line, true);
    }
    // The name of a starting test comes without its newline: notice it now, not when it ends.
    if (this.pending) this.line(this.pending, false);
  }

  /** check has exited: what is still pending is finished. */
  end(): void {
    if (this.pending) this.line(this.pending, true);
    this.pending = "";
    this.finishCurrent();
  }

  /** Mark the running test as killed after `seconds` (its outcome line follows later, if any). */
  markTimedOut(seconds: number): void {
    if (!this.current) return;
    this.current.timedOutAfter = seconds;
    this.classify(this.current);
  }

  /** Every test seen, reconciled with check's summary; `expected` adds those that never started. */
  results(expected: string[] = []): TestRecord[] {
    const seen = new Set(this.records.map((r) => r.name));
    const out = [
      ...this.records,
      ...expected
        .filter((name) => !seen.has(name))
        .map((name): TestRecord => ({ name, status: "not started", seconds: 0, reason: "", output: [], startedAt: 0 })),
    ];
    for (const r of out) {
      if (r.status === "not started" || r.status === "expunged") continue;
      if (r.timedOutAfter !== undefined) r.status = "timeout";
      else if (this.summary.failures?.includes(r.name)) r.status = "fail";
      else if (this.summary.notRun?.includes(r.name)) r.status = "notrun";
      if (r.status === "fail" && !r.reason) r.reason = failureReason(r.output);
      if (r.status === "aborted" && !r.reason) r.reason = "check ended before the test finished";
    }
    return out;
  }

  /** What check's closing summary said (empty when it never got there). */
  get checkSummary(): CheckSummary {
    return this.summary;
  }

  private line(text: string, complete: boolean): void {
    const test = TEST_AT_LINE_START.exec(text);
    // A partial line is a test's name only once the padding after the name has come.
    if (test && (complete || text.length > test[1]!.length)) {
      const current =
        this.current && this.current.name === test[1] && this.current.output.length === 0
          ? this.current
          : this.start(test[1]!);
      if (!complete) return;
      current.output.push(text.slice(test[1]!.length).trim());
      this.classify(current);
      return;
    }
    if (!complete) return;
    const summary = SUMMARY_LINE.exec(text);
    if (summary || END_LINE.test(text)) {
      this.finishCurrent();
      if (summary) {
        const names = summary[2]!.split(/\s+/).filter(Boolean);
        if (summary[1] === "Ran") this.summary.ran = names;
        else if (summary[1] === "Not run") this.summary.notRun = names;
        else this.summary.failures = names;
      }
      this.other(text);
      return;
    }
    if (this.current) {
      this.current.output.push(text);
      this.classify(this.current);
    } else {
      this.other(text);
    }
  }

  private start(name: string): TestRecord {
    this.finishCurrent();
    const record: TestRecord = { name, status: "aborted", seconds: 0, reason: "", output: [], startedAt: this.now() };
    this.current = record;
    this.records.push(record);
    this.onStart(name);
    return record;
  }

  private finishCurrent(): void {
    const r = this.current;
    if (!r) return;
    this.current = undefined;
    r.endedAt = this.now();
    r.seconds = Math.round((r.endedAt - r.startedAt) / 1000);
    // Trailing blank lines belong to no one.
    while (r.output.length > 1 && r.output.at(-1)!.trim() === "") r.output.pop();
    this.classify(r);
  }

  /** The outcome as far as the lines so far tell. */
  private classify(r: TestRecord): void {
    const first = (r.output[0] ?? "").replace(/^\d+s \.\.\.\s*/, "").trim();
    const rest = r.output.slice(1).filter((l) => l.trim() !== "");
    const timedOut = r.timedOutAfter === undefined ? undefined : `timed out after ${r.timedOutAfter} s (killed)`;
    if (first === "" && rest.length === 0) {
      r.status = "aborted";
      r.reason = timedOut ?? "";
      return;
    }
    const notRun = /^\[not run\]\s*(.*)$/.exec(first);
    if (notRun) {
      r.status = "notrun";
      r.reason = [notRun[1]!, ...rest].join(" ").trim();
    } else if (/^\[expunged\]/.test(first)) {
      r.status = "expunged";
      r.reason = "expunged";
    } else if (/^\d+s$/.test(first) && rest.length === 0) {
      r.status = "pass";
      r.checkSeconds = Number(first.slice(0, -1));
      r.reason = "";
    } else {
      r.status = "fail";
      r.reason = failureReason(r.output);
    }
    if (timedOut) r.reason = r.status === "fail" ? `${timedOut}; ${r.reason}` : timedOut;
  }

  private other(text: string): void {
    this.otherLines.push(text);
    if (this.otherLines.length > 100) this.otherLines.shift();
  }
}

/**
 * One line saying why a test failed, from what check printed: its own messages (fsck found the
 * filesystem inconsistent, dmesg had a warning, the exit status) and the first lines the test
 * printed that its golden output does not have.
 */
export function failureReason(output: string[]): string {
  const parts: string[] = [];
  const added: string[] = [];
  const removed: string[] = [];
  const lines = [...output];
  // A time before the outcome: an earlier run's ("12s ... "), or this one's before a late complaint.
  if (lines[0] !== undefined) lines[0] = lines[0].replace(/^\d+s \.\.\.\s*/, "").replace(/^\d+s(\s+|$)/, "");
  for (const raw of lines) {
    if (raw.startsWith("    ")) {
      const diff = raw.slice(4);
      if (/^\+(?!\+\+ )/.test(diff)) added.push(diff.slice(1).trim());
      else if (/^-(?!-- )/.test(diff)) removed.push(diff.slice(1).trim());
      continue;
    }
    let text = raw.trim();
    const exit = /\[failed, exit status (\d+)\]/.exec(text);
    if (exit) parts.push(`exit status ${exit[1]}`);
    text = text
      .replace(/\[failed, exit status \d+\]/, "")
      .replace(/\(see [^)]*\)/g, "")
      .replace(/\(Run '[^']*'\s*to see the entire diff\)/, "")
      .replace(/^-\s*/, "")
      .trim();
    if (text && text !== "...") parts.push(text);
  }
  const firstAdded = added.find((l) => l !== "");
  if (firstAdded !== undefined) parts.push(`+${firstAdded}`);
  else if (removed.length > 0) parts.push(`missing: ${removed[0]}`);
  return [...new Set(parts)].join("; ") || "failed (no reason printed)";
}
