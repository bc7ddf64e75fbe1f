/**
 * The summary of a run: a table (test, result, seconds, reason) for the terminal and as Markdown
 * (docs/testing.md takes it as it is), and counts.
 */
import type { TestRecord, TestStatus } from "./check-output.js";

export interface RunInfo {
  /** When the run started (ISO). */
  started: string;
  /** Wall-clock seconds of the whole run. */
  seconds: number;
  udm: string;
  xfstests: string;
  kernel: string;
  command: string;
  /** Why the run stopped early, if it did. */
  aborted?: string;
}

const ORDER: TestStatus[] = ["pass", "fail", "timeout", "aborted", "notrun", "not started", "expunged"];

export function counts(results: TestRecord[]): string {
  const by = new Map<TestStatus, number>();
  for (const r of results) by.set(r.status, (by.get(r.status) ?? 0) + 1);
  if (results.length === 0) return "no test results";
  return ORDER.filter((s) => by.has(s))
    .map((s) => `${by.get(s)} ${s}`)
    .join(", ");
}

/** Passed, or did not run for a stated reason: nothing to look at. */
export function allGood(results: TestRecord[]): boolean {
  return results.every((r) => r.status === "pass" || r.status === "notrun" || r.status === "expunged");
}

export function textTable(results: TestRecord[], width = 160): string {
  const rows = results.map((r) => [r.name, r.status, r.status === "not started" ? "" : String(r.seconds), r.reason]);
  const head = ["test", "result", "seconds", "reason"];
  const w = [0, 1, 2].map((i) => Math.max(head[i]!.length, ...rows.map((row) => row[i]!.length)));
  const fmt = (row: string[]) => {
    const left = `${row[0]!.padEnd(w[0]!)}  ${row[1]!.padEnd(w[1]!)}  ${row[2]!.padStart(w[2]!)}  `;
    const reason = row[3]!;
    const room = Math.max(20, width - left.length);
    return (left + (reason.length > room ? reason.slice(0, room - 3) + "..." : reason)).trimEnd();
  };
  return [fmt(head), ...rows.map(fmt)].join("\n");
}

export function markdownTable(results: TestRecord[]): string {
  const cell = (s: string) => s.replace(/\|/g, "\\|").replace(/\n/g, " ");
  return [
    "| test | result | seconds | reason |",
    "|---|---|---:|---|",
    ...results.map(
      (r) => `| ${r.name} | ${r.status} | ${r.status === "not started" ? "" : r.seconds} | ${cell(r.reason)} |`,
    ),
  ].join("\n");
}

export function markdownReport(info: RunInfo, results: TestRecord[]): string {
  return [
    `# xfstests dm tests on udm, ${info.started}`,
    "",
    `- command: \`${info.command}\``,
    `- udm: ${info.udm}`,
    `- xfstests: ${info.xfstests}`,
    `- kernel: ${info.kernel}`,
    `- ${counts(results)}; ${info.seconds} s in all`,
    ...(info.aborted ? [`- run stopped early: ${info.aborted}`] : []),
    "",
    markdownTable(results),
    "",
  ].join("\n");
}
