/**
 * A control-protocol fuzzer for test/integration/fuzz-control.test.ts: request lines that must be
 * refused (malformed JSON, bad ids, unknown ops, missing, extra or mistyped fields, bad target
 * specs, invalid names, missing or busy devices, bad tables), read-only requests that may succeed,
 * random junk, and byte-level mutations of all of these. Each line says what its answer must be;
 * `checkResponse` holds every answer to it.
 */
import type { TargetSpec } from "../../core/table-text.js";
import type { Rng } from "../../testing/rng.js";

export interface ControlFuzzContext {
  /** An existing device that an NBD client holds open, with a UUID set. */
  keep: string;
  keepUuid: string;
  /** Every device that exists (all of them must be left exactly as they are). */
  devices: string[];
  /** Tables a create refuses (from the corpus). */
  badTables: TargetSpec[][];
  /** Tables a load onto `keep` refuses (device areas are only checked when a table goes live). */
  badLoads: TargetSpec[][];
}

export interface FuzzLine {
  text: string;
  /** The id the answer must carry; null when the line cannot be attributed (junk, mutations). */
  id: number | null;
  /** reject: must fail (with one of `errno` when given); readonly: may succeed; any: mutated. */
  expect: "reject" | "readonly" | "any";
  errno?: string[];
  what: string;
}

const OPS = [
  "version",
  "create",
  "load",
  "clear",
  "suspend",
  "resume",
  "remove",
  "remove-all",
  "rename",
  "list",
  "info",
  "table",
  "status",
  "message",
  "targets",
  "deps",
  "wait",
  "load-plugin",
  "attach",
  "detach",
] as const;

/** Required fields of each op, and a value of the right type for each. */
const REQUIRED: Record<string, [string, "string" | "number" | "table"][]> = {
  create: [["name", "string"]],
  load: [
    ["name", "string"],
    ["table", "table"],
  ],
  clear: [["name", "string"]],
  suspend: [["name", "string"]],
  resume: [["name", "string"]],
  remove: [["name", "string"]],
  rename: [["name", "string"]],
  info: [["name", "string"]],
  table: [["name", "string"]],
  status: [["name", "string"]],
  message: [
    ["name", "string"],
    ["sector", "number"],
    ["message", "string"],
  ],
  deps: [["name", "string"]],
  wait: [
    ["name", "string"],
    ["eventNr", "number"],
  ],
  "load-plugin": [["module", "string"]],
  attach: [["name", "string"]],
  detach: [["name", "string"]],
};
const OPTIONAL_BOOL: Record<string, string[]> = {
  create: ["readOnly"],
  load: ["readOnly"],
  suspend: ["noflush"],
  resume: ["noflush"],
  remove: ["force"],
  "remove-all": ["force"],
  info: ["inactive"],
  table: ["inactive"],
  status: ["inactive", "noflush"],
  deps: ["inactive"],
  detach: ["force"],
};

const WRONG_VALUES: unknown[] = [
  null,
  true,
  false,
  0,
  -1,
  1.5,
  1e300,
  "",
  "x",
  [],
  [1],
  {},
  { a: 1 },
  "0",
  2 ** 53,
  -0.0001,
];
const INVALID_NAMES = ["", "/", "a/b", ".", "..", "control", "x".repeat(128), "é".repeat(64)];

function missingName(r: Rng): string {
  return r.pick(["nosuch", "fz-missing", "KEEP", "keep ", " keep", "kee", "keep\t", "ключ", "🙂", String(r.u32())]);
}

function badSpec(r: Rng): unknown {
  const good = { start: 0, length: 8, type: "zero", params: "" };
  switch (r.int(9)) {
    case 0:
      return { ...good, start: r.pick([-1, 1.5, "0", null, 2 ** 53, 1e300]) };
    case 1:
      return { ...good, length: r.pick([-8, 0.5, "8", null, 2 ** 53, 1e300]) };
    case 2:
      return { ...good, type: r.pick([null, 7, [], {}]) };
    case 3:
      return { ...good, params: r.pick([null, 7, ["a"], {}]) };
    case 4:
      return { ...good, extra: 1 };
    case 5: {
      const { type: _t, ...rest } = good;
      void _t;
      return rest;
    }
    case 6:
      return r.pick([null, 0, "0 8 zero", [], [0, 8, "zero", ""]]);
    case 7: {
      const { params: _p, ...rest } = good;
      void _p;
      return rest;
    }
    default:
      return { ...good, start: 0, length: 8, type: "zero", params: "", __proto__x: 1 };
  }
}

/** A request object refused by the protocol's validation (parseRequest): EINVAL. */
function malformed(
  r: Rng,
  id: number,
): { obj: Record<string, unknown>; what: string } | { text: string; what: string; idOk: boolean } {
  const op = r.pick(OPS);
  const base: Record<string, unknown> = { id, op };
  for (const [f, t] of REQUIRED[op] ?? [])
    base[f] =
      t === "string" ? missingNameFor(f) : t === "number" ? 0 : [{ start: 0, length: 8, type: "zero", params: "" }];
  switch (r.int(8)) {
    case 0: {
      const badId = r.pick<unknown>([-1, 1.5, "7", null, true, [], {}, 2 ** 53, 1e300]);
      return {
        text: JSON.stringify({ ...base, id: badId }),
        what: `${op} with id ${JSON.stringify(badId)}`,
        idOk: false,
      };
    }
    case 1: {
      const { id: _id, ...rest } = base;
      void _id;
      return { text: JSON.stringify(rest), what: `${op} without id`, idOk: false };
    }
    case 2: {
      const badOp = r.pick<unknown>([
        "",
        "CREATE",
        "Create",
        "creat",
        "remove_all",
        "reload",
        "__proto__",
        "constructor",
        "toString",
        "hasOwnProperty",
        null,
        7,
        ["info"],
        "info\u0000",
      ]);
      return { obj: { ...base, op: badOp }, what: `unknown op ${JSON.stringify(badOp)}` };
    }
    case 3: {
      const req = REQUIRED[op];
      if (!req?.length)
        return {
          obj: { ...base, [r.pick(["name", "table", "x", "id2", "constructor"])]: "x" },
          what: `${op} with an unexpected field`,
        };
      const [field] = r.pick(req);
      const { [field]: _drop, ...rest } = base;
      void _drop;
      return { obj: rest, what: `${op} without ${field}` };
    }
    case 4: {
      const fields = [...(REQUIRED[op] ?? []).map(([f]) => f), ...(OPTIONAL_BOOL[op] ?? [])];
      if (!fields.length) return { obj: { ...base, bogus: r.pick(WRONG_VALUES) }, what: `${op} with field bogus` };
      const field = r.pick(fields);
      const kind = (REQUIRED[op] ?? []).find(([f]) => f === field)?.[1] ?? "boolean";
      const wrong = WRONG_VALUES.filter((v) => !fitsType(v, kind));
      const value = r.pick(wrong);
      return { obj: { ...base, [field]: value }, what: `${op} with ${field}=${JSON.stringify(value)}` };
    }
    case 5:
      return {
        obj: {
          ...base,
          [r.pick(["extra", "Name", "force ", "__proto__", "prototype", "table2"])]: r.pick(WRONG_VALUES),
        },
        what: `${op} with an unexpected field`,
      };
    case 6: {
      const op2 = r.pick(["create", "load"] as const);
      const table = Array.from({ length: r.range(1, 4) }, (_, i) =>
        i === 0 ? badSpec(r) : { start: 8 * i, length: 8, type: "zero", params: "" },
      );
      if (r.chance(0.5)) table.reverse();
      return {
        obj: {
          id,
          op: op2,
          name: "fz-spec",
          table: r.chance(0.1) ? r.pick<unknown>(["0 8 zero", {}, null, 7]) : table,
        },
        what: `${op2} with a malformed target spec`,
      };
    }
    default:
      return {
        text: JSON.stringify(r.pick<unknown>([[base], "request", 7, null, true, [id, op]])),
        what: "a JSON value that is not an object",
        idOk: false,
      };
  }
}

function missingNameFor(field: string): string {
  return field === "module" ? "/nonexistent/udm-plugin.mjs" : field === "message" ? "hello" : "fz-nosuch";
}

function fitsType(v: unknown, kind: string): boolean {
  if (kind === "string") return typeof v === "string";
  if (kind === "boolean") return typeof v === "boolean";
  if (kind === "number") return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
  return Array.isArray(v) && v.every((s) => typeof s === "object" && s !== null);
}

/** Well-formed, refused by the device mapper (or the daemon): missing/busy devices, bad names and tables. */
function refused(
  r: Rng,
  id: number,
  ctx: ControlFuzzContext,
): { obj: Record<string, unknown>; errno: string[]; what: string } {
  const missing = missingName(r);
  const existing = r.pick(ctx.devices);
  switch (r.int(14)) {
    case 0: {
      const op = r.pick([
        "info",
        "table",
        "status",
        "deps",
        "suspend",
        "resume",
        "clear",
        "remove",
        "attach",
        "detach",
      ] as const);
      return {
        obj: { id, op, name: missing },
        errno: ["ENXIO"],
        what: `${op} of missing device ${JSON.stringify(missing)}`,
      };
    }
    case 1:
      return {
        obj: { id, op: "load", name: missing, table: [{ start: 0, length: 8, type: "zero", params: "" }] },
        errno: ["ENXIO"],
        what: "load of a missing device",
      };
    case 2:
      return {
        obj: { id, op: "message", name: missing, sector: 0, message: "hi" },
        errno: ["ENXIO"],
        what: "message to a missing device",
      };
    case 3:
      return {
        obj: { id, op: "wait", name: missing, eventNr: r.int(3) },
        errno: ["ENXIO"],
        what: "wait on a missing device",
      };
    case 4: {
      const name = r.pick(INVALID_NAMES);
      return {
        obj: {
          id,
          op: "create",
          name,
          ...(r.chance(0.5) ? { table: [{ start: 0, length: 8, type: "zero", params: "" }] } : {}),
        },
        errno: ["EINVAL"],
        what: `create with invalid name ${JSON.stringify(name)}`,
      };
    }
    case 5:
      return { obj: { id, op: "create", name: existing }, errno: ["EBUSY"], what: `create of existing ${existing}` };
    case 6:
      return {
        obj: { id, op: "create", name: `fz-u${id}`, uuid: ctx.keepUuid },
        errno: ["EBUSY"],
        what: "create with a UUID in use",
      };
    case 7:
      return {
        obj: { id, op: "create", name: `fz-u${id}`, uuid: "u".repeat(129) },
        errno: ["EINVAL"],
        what: "create with a 129-byte UUID",
      };
    case 8: {
      const newName = r.pick([...INVALID_NAMES, ...ctx.devices]);
      return {
        obj: { id, op: "rename", name: ctx.keep, newName },
        errno: ["EINVAL", "EBUSY"],
        what: `rename ${ctx.keep} to ${JSON.stringify(newName)}`,
      };
    }
    case 9:
      return {
        obj: { id, op: "rename", name: ctx.keep, ...(r.chance(0.5) ? { newUuid: `fz-uuid-${id}` } : {}) },
        errno: ["EINVAL"],
        what: "rename to a second UUID, or to nothing",
      };
    case 10:
      return {
        obj: { id, op: "remove", name: ctx.keep },
        errno: ["EBUSY"],
        what: `remove of ${ctx.keep}, open over NBD`,
      };
    case 11: {
      const message = r.pick(["", "   ", "@bogus", "@cancel_deferred_remove x", "hello world"]);
      return {
        obj: { id, op: "message", name: ctx.keep, sector: r.pick([0, 1, 2 ** 40]), message },
        errno: ["EINVAL"],
        what: `message ${JSON.stringify(message)} to ${ctx.keep}`,
      };
    }
    case 12: {
      const table = r.pick(ctx.badLoads);
      return {
        obj: { id, op: "load", name: ctx.keep, table },
        errno: [],
        what: `load of a bad table onto ${ctx.keep}: ${JSON.stringify(table).slice(0, 120)}`,
      };
    }
    default: {
      const table = r.pick(ctx.badTables);
      return {
        obj: { id, op: "create", name: `fz-t${id}`, table },
        errno: [],
        what: `create with a bad table: ${JSON.stringify(table).slice(0, 120)}`,
      };
    }
  }
}

/** Requests that read state only: they may succeed. */
function readOnly(r: Rng, id: number, ctx: ControlFuzzContext): { obj: Record<string, unknown>; what: string } {
  const name = r.pick(ctx.devices);
  const op = r.pick(["version", "targets", "list", "info", "table", "status", "deps", "wait"] as const);
  const obj: Record<string, unknown> = { id, op };
  if (op === "list" && r.chance(0.5)) obj.target = r.pick(["linear", "zero", "snapshot", "nosuch", ""]);
  if (["info", "table", "status", "deps", "wait"].includes(op)) obj.name = name;
  if (["info", "table", "status", "deps"].includes(op) && r.chance(0.3)) obj.inactive = true;
  // A wait for an event number the device does not have returns at once.
  if (op === "wait") obj.eventNr = 1_000_000 + r.int(1000);
  return { obj, what: `${op} ${name}` };
}

function junk(r: Rng): string {
  switch (r.int(10)) {
    case 0:
      return r.bytes(r.range(1, 200)).toString("latin1").replaceAll("\n", " ");
    case 1:
      return Buffer.from(r.bytes(r.range(1, 100)).map((b) => (b === 10 ? 11 : b))).toString("binary");
    case 2:
      return r.pick([
        "{",
        "}",
        "[",
        "]",
        "null",
        "true",
        "1",
        '"str"',
        "[]",
        "{}",
        '{"id":',
        '{"id":1,',
        ",",
        ":",
        "\\",
        '"',
        "\ufeff{}",
      ]);
    case 3:
      return "[".repeat(r.range(1000, 200_000));
    // Well formed with id 0 (the id of answers that cannot be attributed): a long missing name.
    case 4:
      return `{"id":0,"op":"info","name":"fz-${"x".repeat(r.range(1000, 300_000))}"}`;
    case 5:
      return `{"id":${r.pick(["1e400", "0x10", "NaN", "Infinity", "1_000", "01", '"1"'])},"op":"list"}`;
    case 6:
      return `{"id":"u","op":"list","target":"\\u${r.u32().toString(16).padStart(4, "0").slice(0, 4)}"}`;
    case 7:
      return JSON.stringify({ id: 1, op: "list" }).slice(0, r.range(1, 19)); // never the whole request
    case 8:
      return "\u0000".repeat(r.range(1, 50));
    default:
      return `{"id":1,"op":"list"}{"id":2,"op":"list"}`;
  }
}

/** Flip, drop, insert or repeat a few bytes. May insert a newline (the line then splits). */
function mutateText(r: Rng, text: string): string {
  const b = Buffer.from(text, "utf8");
  let out = b;
  for (let i = r.range(1, 3); i > 0; i--) {
    const at = r.int(Math.max(1, out.length));
    switch (r.int(4)) {
      case 0:
        out = Buffer.from(out);
        if (out.length) out[at]! ^= 1 << r.int(8);
        break;
      case 1:
        out = Buffer.concat([out.subarray(0, at), out.subarray(at + 1)]);
        break;
      case 2:
        out = Buffer.concat([out.subarray(0, at), r.bytes(r.range(1, 4)), out.subarray(at)]);
        break;
      default:
        out = Buffer.concat([out.subarray(0, at), out.subarray(Math.max(0, at - 8), at), out.subarray(at)]);
    }
  }
  return out.toString("latin1");
}

/**
 * One request line. Ids of lines whose answer can be attributed count up from `id`; mutated lines
 * carry ids of ten digits, so a mutation (which may drop or change digits) does not collide.
 */
export function genLine(r: Rng, id: number, ctx: ControlFuzzContext): FuzzLine {
  const roll = r.int(100);
  if (roll < 28) {
    const m = malformed(r, id);
    if ("text" in m) return { text: m.text, id: null, expect: "reject", errno: ["EINVAL"], what: m.what };
    return { text: JSON.stringify(m.obj), id, expect: "reject", errno: ["EINVAL"], what: m.what };
  }
  if (roll < 58) {
    const m = refused(r, id, ctx);
    return {
      text: JSON.stringify(m.obj),
      id,
      expect: "reject",
      errno: m.errno.length ? m.errno : undefined,
      what: m.what,
    };
  }
  if (roll < 72) {
    const m = readOnly(r, id, ctx);
    return { text: JSON.stringify(m.obj), id, expect: "readonly", what: m.what };
  }
  if (roll < 85) return { text: junk(r), id: null, expect: "reject", errno: ["EINVAL"], what: "junk" };
  // Mutations of the above, with ids far from the others.
  const mid = 5_000_000_000 + id;
  const base = r.chance(0.5)
    ? refused(r, mid, ctx).obj
    : r.chance(0.5)
      ? readOnly(r, mid, ctx).obj
      : (() => {
          const m = malformed(r, mid);
          return "obj" in m ? m.obj : { id: mid, op: "list" };
        })();
  // Only mutate what cannot change an existing device however the bytes turn out: read-only ops,
  // and requests naming fz-* devices (which do not exist; one a mutation creates is removed).
  const readOnlyOp = ["version", "targets", "list", "info", "table", "status", "deps", "wait"].includes(
    String(base.op),
  );
  if (!readOnlyOp && !(typeof base.name === "string" && base.name.startsWith("fz-"))) return genLine(r, id, ctx);
  return {
    text: mutateText(r, JSON.stringify(base)),
    id: null,
    expect: "any",
    what: `mutated ${JSON.stringify(base).slice(0, 100)}`,
  };
}

export class ControlFuzzStats {
  lines = 0;
  bytes = 0;
  responses = 0;
  rejected = 0;
  readOnlyAnswered = 0;
  mutatedAccepted = 0;
  failureCount = 0;
  readonly failures: string[] = [];
  readonly errnos = new Map<string, number>();
  /** Devices that mutated requests managed to create (removed again by the test). */
  readonly created = new Set<string>();

  fail(what: string): void {
    if (this.failureCount++ < 25) this.failures.push(what);
  }
}

/** What a refusal must look like: a known errno and a reason a person can read. */
export function reasonProblem(res: { errno?: unknown; message?: unknown }): string | null {
  if (typeof res.errno !== "string" || !/^E[A-Z0-9]+$/.test(res.errno)) return `errno ${JSON.stringify(res.errno)}`;
  const m = res.message;
  if (typeof m !== "string" || m.trim() === "") return "empty message";
  if (/undefined|\[object |NaN|\n\s+at /.test(m)) return `unclear message ${JSON.stringify(m.slice(0, 200))}`;
  return null;
}

/** The lines the server will see in `bytes` (split on \n, blank ones dropped): each gets one answer. */
export function countRequestLines(bytes: Buffer): number {
  let count = 0;
  let start = 0;
  for (let nl = bytes.indexOf(10); nl >= 0; nl = bytes.indexOf(10, start)) {
    if (bytes.subarray(start, nl).toString("utf8").trim() !== "") count++;
    start = nl + 1;
  }
  return count;
}
