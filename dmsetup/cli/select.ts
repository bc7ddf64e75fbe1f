/**
 * `-S/--select`: libdm's report selection (libdm-report.c, "Selection parsing"), parsed and
 * evaluated as libdm does over dmsetup's fields, with its messages for every syntax error.
 *
 *   SELECTION  := OR_EX
 *   OR_EX      := AND_EX (("||" | "#") OR_EX)
 *   AND_EX     := EX (("&&" | ",") AND_EX)
 *   EX         := "!" "(" OR_EX ")" | "(" OR_EX ")" | FIELD OP VALUE
 *
 * dmsetup's fields are strings and numbers only: `=`, `!=` and the regex operators `=~`, `!~`
 * compare strings; numbers take `=`, `!=`, `<`, `<=`, `>`, `>=`. Regular expressions are
 * JavaScript's, matched anywhere in the value as libdm's are.
 */
import { type Field, findField } from "./format/report-fields.js";
import { fieldListHelp, SELECTION_HELP } from "./format/report-help.js";

/** A selection that cannot be parsed: `message` is everything libdm prints, newline-terminated. */
export class SelectionError extends Error {}

// Comparison flags (FLD_CMP_*), kept as libdm combines them.
const EQUAL = 0x1;
const NOT = 0x2;
const GT = 0x4;
const LT = 0x8;
const REGEX = 0x10;
const NUMBER = 0x20;
const TIME = 0x40;

/** Longer operators first where one is a prefix of another, as in libdm's table. */
const CMP_OPS: [string, number][] = [
  ["=~", REGEX],
  ["!~", REGEX | NOT],
  ["=", EQUAL],
  ["!=", NOT | EQUAL],
  [">=", NUMBER | TIME | GT | EQUAL],
  [">", NUMBER | TIME | GT],
  ["<=", NUMBER | TIME | LT | EQUAL],
  ["<", NUMBER | TIME | LT],
  ["since", TIME | GT | EQUAL],
  ["after", TIME | GT],
  ["until", TIME | LT | EQUAL],
  ["before", TIME | LT],
];

// Logical and grouping tokens (SEL_*).
const AND = 0x1;
const OR = 0x2;
const MOD_NOT = 0x4;
const PS = 0x8;
const PE = 0x10;
const LIST = 0x20;

const LOG_OPS: [string, number][] = [
  ["&&", AND],
  [",", AND],
  ["||", OR],
  ["#", OR],
  ["!", MOD_NOT],
  ["(", PS],
  [")", PE],
  ["[", LIST],
  ["]", LIST],
  ["{", LIST],
  ["}", LIST],
];

type Node =
  | { kind: "item"; field: Field; flags: number; value: bigint | string | RegExp; not: boolean }
  | { kind: "and" | "or"; children: Node[]; not: boolean };

const UINT64_MAX = (1n << 64n) - 1n;
const isSpace = (c: string | undefined) => c !== undefined && " \t\n\v\f\r".includes(c);
const SYNTAX_HELP = "Use 'help' for selection to get more help.\n";

/** A parsed selection; `matches` evaluates it on a row whose field values `get` gives. */
export class Selection {
  private constructor(private readonly root: Node) {}

  /**
   * Parse `text`; null for no selection at all ("" or "all"). Throws SelectionError with libdm's
   * messages, or, for `help` (or `?`), SelectionHelp with the help text.
   */
  static parse(text: string): Selection | null {
    if (text === "" || text.toLowerCase() === "all") return null;
    if (text.toLowerCase() === "help" || text === "?") throw new SelectionHelp(`${fieldListHelp()}${SELECTION_HELP}`);
    const parser = new Parser(text);
    const [root, end] = parser.orEx(0);
    const next = parser.skipSpace(end);
    if (next < text.length)
      parser.fail(`Expecting logical operator\nSelection syntax error at '${text.slice(next)}'.\n${SYNTAX_HELP}`);
    return new Selection(root);
  }

  matches(get: (field: Field) => string | number): boolean {
    return evaluate(this.root, get);
  }
}

/** `-S help`: not an error, but nothing else is done (the text goes to stderr). */
export class SelectionHelp extends SelectionError {}

function evaluate(node: Node, get: (field: Field) => string | number): boolean {
  let r: boolean;
  if (node.kind === "item") r = compare(node, get(node.field));
  else if (node.kind === "and") r = node.children.every((n) => evaluate(n, get));
  else r = node.children.some((n) => evaluate(n, get));
  return node.not ? !r : r;
}

function compare(item: Extract<Node, { kind: "item" }>, value: string | number): boolean {
  const { flags, value: sel } = item;
  if (sel instanceof RegExp) {
    const match = sel.test(String(value));
    return flags & NOT ? !match : match;
  }
  if (typeof sel === "string") return flags & NOT ? String(value) !== sel : String(value) === sel;
  // Numbers are unsigned 64-bit values in libdm: -1 (an unknown open count) is the largest.
  const v = BigInt.asUintN(64, BigInt(value));
  switch (flags & (EQUAL | NOT | GT | LT)) {
    case EQUAL:
      return v === sel;
    case NOT | EQUAL:
      return v !== sel;
    case GT:
      return v > sel;
    case GT | EQUAL:
      return v >= sel;
    case LT:
      return v < sel;
    default:
      return v <= sel;
  }
}

class Parser {
  constructor(private readonly s: string) {}

  fail(message: string): never {
    throw new SelectionError(message);
  }

  skipSpace(p: number): number {
    while (isSpace(this.s[p])) p++;
    return p;
  }

  /** _tok_op: the first operator of `table` (allowed by `expect`) at p, after blanks. */
  private tokOp(table: [string, number][], p: number, expect = 0): { flags: number; end: number } {
    p = this.skipSpace(p);
    for (const [op, flags] of table) {
      if (expect && !(flags & expect)) continue;
      if (this.s.startsWith(op, p)) return { flags, end: p + op.length };
    }
    return { flags: 0, end: p };
  }

  private rest(p: number): string {
    return this.s.slice(p);
  }

  /** OR_EX: its node and the position after it. */
  orEx(p: number): [Node, number] {
    let or: (Node & { kind: "or" }) | undefined;
    for (;;) {
      const [n, next] = this.andEx(p);
      const op = this.tokOp(LOG_OPS, next, OR);
      if (!op.flags) {
        if (!or) return [n, next];
        or.children.push(n);
        return [or, next];
      }
      or ??= { kind: "or", children: [], not: false };
      or.children.push(n);
      p = op.end;
    }
  }

  private andEx(p: number): [Node, number] {
    let and: (Node & { kind: "and" }) | undefined;
    for (;;) {
      const [n, next] = this.ex(p);
      const op = this.tokOp(LOG_OPS, next, AND);
      if (!op.flags) {
        if (!and) return [n, next];
        and.children.push(n);
        return [and, next];
      }
      and ??= { kind: "and", children: [], not: false };
      and.children.push(n);
      p = op.end;
    }
  }

  private ex(p: number): [Node, number] {
    const t = this.tokOp(LOG_OPS, p, MOD_NOT | PS);
    if (t.flags === MOD_NOT) {
      const ps = this.tokOp(LOG_OPS, t.end, PS);
      if (!ps.flags) this.fail(`Syntax error: left parenthesis expected at '${this.rest(t.end)}'\n`);
      const [n, next] = this.orEx(ps.end);
      const pe = this.tokOp(LOG_OPS, next, PE);
      if (!pe.flags) this.fail(`Syntax error: right parenthesis expected at '${this.rest(next)}'\n`);
      // libdm sets the flag rather than flipping it: `!(!(x))` is `!(x)` there too.
      n.not = true;
      return [n, pe.end];
    }
    if (t.flags === PS) {
      const [n, next] = this.orEx(t.end);
      const pe = this.tokOp(LOG_OPS, next, PE);
      if (!pe.flags) this.fail(`Syntax error: right parenthesis expected at '${this.rest(pe.end)}'\n`);
      return [n, pe.end];
    }
    return this.selection(this.skipSpace(p));
  }

  /** FIELD OP VALUE, from p (blanks already skipped). */
  private selection(p: number): [Node, number] {
    const bad = (message: string): never =>
      this.fail(`${message}Selection syntax error at '${this.rest(p)}'.\n${SYNTAX_HELP}`);
    const ws = this.skipSpace(p);
    let we = ws;
    while (we < this.s.length && /[A-Za-z0-9_-]/.test(this.s[we]!)) we++;
    if (we === ws) bad("Expecting field name\n");
    const id = this.s.slice(ws, we);
    if (id.replace(/_/g, "").toLowerCase() === "help")
      bad(`${fieldListHelp()}Selection field is uncomparable: ${id}.\n`);
    const field = findField(id);
    if (!field) bad(`${fieldListHelp()}Unrecognised selection field: ${id}\n`);
    const f = field!;

    const op = this.tokOp(CMP_OPS, we);
    if (!op.flags) bad(`${SELECTION_HELP}Unrecognised comparison operator: ${this.rest(we)}\n`);
    let flags = op.flags;
    let q = op.end;
    let value: bigint | string | RegExp;
    if (flags & REGEX) {
      q = this.skipSpace(q);
      if (q >= this.s.length) bad(`Regular expression expected for selection field ${f.id}\n`);
      const close = { "(": ")", "{": "}", "[": "]", '"': '"', "'": "'" }[this.s[q]!];
      const tok = this.tokString(close === undefined ? q : q + 1, close);
      if (!tok) bad(`Missing end quote.\nFailed to parse regex value for selection field ${f.id}.\n`);
      if (f.num) this.fail(`dm_report: incompatible comparison type for selection field ${f.id}\n`);
      try {
        value = new RegExp(tok!.text);
      } catch (err) {
        this.fail(
          `${(err as Error).message}\nCouldn't parse regex\n` +
            `dm_report: failed to create regex matcher for selection field ${f.id}\n`,
        );
      }
      return [{ kind: "item", field: f, flags, value: value!, not: false }, this.skipSpace(tok!.next)];
    }
    if (flags & NUMBER && !f.num)
      bad(`${SELECTION_HELP}Operator can be used only with number, size, time or percent fields: ${this.rest(ws)}\n`);
    if (flags & TIME && !(flags & NUMBER))
      bad(`${SELECTION_HELP}Operator can be used only with time fields: ${this.rest(ws)}\n`);
    q = this.skipSpace(q);
    if (f.num) {
      const [text, next] = this.tokNumber(q, f, bad);
      flags &= ~TIME;
      const whole = BigInt(/^\d*/.exec(text)![0] || "0");
      if (whole > UINT64_MAX) this.fail(`Field selection value ${text} out of supported range for field ${f.id}.\n`);
      value = whole;
      q = next;
    } else {
      const quote = this.s[q] === '"' || this.s[q] === "'" ? this.s[q] : undefined;
      const tok = this.tokString(quote ? q + 1 : q, quote);
      if (!tok) bad(`Missing end quote.\nFailed to parse string value for selection field ${f.id}.\n`);
      value = tok!.text;
      q = tok!.next;
    }
    return [{ kind: "item", field: f, flags, value, not: false }, this.skipSpace(q)];
  }

  /**
   * _tok_value_string: up to `close` (then past it), or, unquoted, up to a blank or an operator
   * that can end a value (`&&` `,` `||` `#` `)`). Null when the closing quote is missing.
   */
  private tokString(p: number, close: string | undefined): { text: string; next: number } | null {
    if (close !== undefined) {
      const end = this.s.indexOf(close, p);
      return end < 0 ? null : { text: this.s.slice(p, end), next: end + 1 };
    }
    let end = p;
    while (end < this.s.length && this.s[end] !== " ") {
      if (LOG_OPS.some(([op, fl]) => fl & (AND | OR | PE) && this.s.startsWith(op, end))) break;
      end++;
    }
    return { text: this.s.slice(p, end), next: end };
  }

  /** _tok_value_number: digits with at most one `.`; a `%` or a size unit after it is refused. */
  private tokNumber(p: number, f: Field, bad: (message: string) => never): [string, number] {
    let end = p;
    let dot = false;
    while (end < this.s.length && (/\d/.test(this.s[end]!) || (!dot && this.s[end] === "." && (dot = true)))) end++;
    if (end === p) bad(`Failed to parse numeric value for selection field ${f.id}.\n`);
    if (this.s[end] === "%") bad(`Found percent value but numeric value expected for selection field ${f.id}.\n`);
    // dm_units_to_factor's unit letters.
    if (end < this.s.length && "hHrRbBsSkmgtpeKMGTPE".includes(this.s[end]!))
      bad(`Found size unit specifier but numeric value expected for selection field ${f.id}.\n`);
    return [this.s.slice(p, end), end];
  }
}
