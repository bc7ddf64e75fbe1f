/**
 * The malformed-table corpus (test/fixtures/bad-tables.txt): `## <reason>` headers, each followed
 * by table text; `## @load <reason>` entries are only loaded onto an existing device.
 */
import fs from "node:fs";

export interface BadTable {
  /** Line of the header in the corpus file (for failure messages). */
  line: number;
  reason: string;
  loadOnly: boolean;
  text: string;
}

export function loadBadTables(file: string, vars: Record<string, string>): BadTable[] {
  const lines = fs.readFileSync(file, "utf8").split("\n");
  const entries: BadTable[] = [];
  let current: { line: number; header: string; body: string[] } | null = null;
  const finish = () => {
    if (!current) return;
    const body = [...current.body];
    // Comment and blank lines after the table belong to the file, not to the entry (an entry
    // that is nothing but comments keeps them: that is its point).
    if (body.some((l) => l.trim() !== "" && !l.trim().startsWith("#"))) {
      while (body.length && (body.at(-1)!.trim() === "" || body.at(-1)!.trim().startsWith("#"))) body.pop();
    } else {
      while (body.length && body.at(-1)!.trim() === "") body.pop();
      if (body.length === 0) body.push("");
    }
    const loadOnly = current.header.startsWith("@load ");
    entries.push({
      line: current.line,
      reason: loadOnly ? current.header.slice("@load ".length) : current.header,
      loadOnly,
      text: body.join("\n").replace(/\$([A-Z_]+)/g, (m, name: string) => {
        if (!(name in vars)) throw new Error(`bad-tables.txt:${current!.line}: unknown placeholder ${m}`);
        return vars[name]!;
      }),
    });
  };
  lines.forEach((text, i) => {
    if (text.startsWith("## ")) {
      finish();
      current = { line: i + 1, header: text.slice(3).trim(), body: [] };
    } else if (current) {
      current.body.push(text);
    }
  });
  finish();
  return entries;
}
