/** Text helpers shared by the benchmark reports (bench/run.ts, bench/matrix.ts). */
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** "64M", "1G", "512K", "1GiB", "4096" → bytes. */
export function parseSize(text: string): number {
  const m = /^(\d+)\s*([KMG]?)(i?B)?$/i.exec(text.trim());
  if (!m) throw new Error(`bad size: ${text}`);
  const unit = { "": 1, K: KiB, M: MiB, G: GiB }[m[2]!.toUpperCase() as "" | "K" | "M" | "G"];
  return Number(m[1]) * unit;
}

export const fmt = (x: number, digits = 1) =>
  x.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });

export const bytesText = (b: number) =>
  b >= GiB && b % GiB === 0 ? `${b / GiB} GiB` : b >= MiB ? `${b / MiB} MiB` : `${b / KiB} KiB`;

/** A Markdown table with padded columns: readable in a terminal and in results.md. */
export function markdownTable(header: string[], rows: string[][], rightAligned: Set<number>): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) =>
    "| " +
    cells.map((c, i) => (rightAligned.has(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join(" | ") +
    " |";
  const rule =
    "|" + widths.map((w, i) => (rightAligned.has(i) ? "-".repeat(w + 1) + ":" : "-".repeat(w + 2))).join("|") + "|";
  return [line(header), rule, ...rows.map(line)].join("\n");
}

/** Replace the text between `<!-- key:begin -->` and `<!-- key:end -->` in `file` (append if absent). */
export function replaceSection(file: string, key: string, body: string, fallbackHeader: string): void {
  const begin = `<!-- ${key}:begin -->`;
  const end = `<!-- ${key}:end -->`;
  const section = `${begin}\n${body}\n${end}`;
  let text = fs.existsSync(file) ? fs.readFileSync(file, "utf8") : "";
  if (!text.startsWith("# ")) text = fallbackHeader + text;
  const at = text.indexOf(begin);
  const stop = text.indexOf(end);
  text =
    at >= 0 && stop > at
      ? text.slice(0, at) + section + text.slice(stop + end.length)
      : text.trimEnd() + "\n\n" + section + "\n";
  fs.writeFileSync(file, text);
}

/** A results.md section: its title, when and how it was run, what its rows mean, the table. */
export function recordResultsSection(
  file: string,
  key: string,
  title: string,
  description: string[],
  table: string,
  command: string,
): void {
  const body = [
    `## ${title}`,
    "",
    `Run on ${new Date().toISOString()} by \`${command}\`.`,
    "",
    ...description.map((d) => `- ${d}`),
    "",
    table,
  ].join("\n");
  replaceSection(file, key, body, "# udm micro-benchmark results\n");
}

/**
 * When the module at `moduleUrl` is the script node was started with (`node --import tsx
 * bench/X.ts`): run it and print the lines `report` makes of its result; a failure prints its
 * stack and sets the exit status. Imported as a library, nothing happens.
 */
export function runAsScript<R>(moduleUrl: string, run: () => Promise<R>, report: (result: R) => string[]): void {
  if (!process.argv[1] || moduleUrl !== pathToFileURL(path.resolve(process.argv[1])).href) return;
  run().then(
    (result) => {
      for (const line of report(result)) console.log(line);
    },
    (err: unknown) => {
      console.error(err instanceof Error ? (err.stack ?? err.message) : err);
      process.exitCode = 1;
    },
  );
}
