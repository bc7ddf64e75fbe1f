/**
 * The control protocol between udmsetup and udmd: the userspace equivalent of the dm ioctls
 * (include/uapi/linux/dm-ioctl.h). One JSON object per line in each direction over a unix socket:
 *
 *   request:  {"id": 7, "op": "load", "name": "vol", "table": [{"start":0,"length":8,"type":"zero","params":""}]}
 *   response: {"id": 7, "ok": true, "result": {...}}
 *          or {"id": 7, "ok": false, "errno": "EINVAL", "message": "linear: Invalid argument count"}
 *
 * `errno` is what the ioctl would return; `message` is the reason the kernel would log. Requests
 * on one connection may be pipelined; responses carry the request's id. docs/cli.md ("The control
 * protocol") lists the operations; `RequestMap` below is their exact shape.
 */
import type { TargetSpec } from "../../core/table-text.js";

/**
 * Largest request or response line, in bytes (16 MiB: a table of a few hundred thousand lines).
 * The client refuses a larger request before sending it; the server answers a larger response
 * with an E2BIG error instead.
 */
export const MAX_REQUEST_BYTES = 16 * 1024 * 1024;

export const PROTOCOL_VERSION = 1;

export interface RequestMap {
  version: Record<string, never>;
  create: { name: string; uuid?: string; readOnly?: boolean; table?: TargetSpec[] };
  load: { name: string; table: TargetSpec[]; readOnly?: boolean };
  clear: { name: string };
  suspend: { name: string; noflush?: boolean };
  resume: { name: string; noflush?: boolean };
  remove: { name: string; force?: boolean; deferred?: boolean };
  "remove-all": { force?: boolean };
  rename: { name: string; newName?: string; newUuid?: string };
  list: { target?: string };
  info: { name: string; inactive?: boolean };
  table: { name: string; inactive?: boolean };
  status: { name: string; inactive?: boolean; noflush?: boolean };
  message: { name: string; sector: number; message: string };
  targets: Record<string, never>;
  deps: { name: string; inactive?: boolean };
  wait: { name: string; eventNr: number };
  /** DM_DEV_SET_GEOMETRY: "CYL HEAD SECT START", parsed by the daemon as the kernel parses it. */
  setgeometry: { name: string; geometry: string };
  /** udm extensions */
  /** What HDIO_GETGEO would answer: the geometry set with `setgeometry` (all zero until then). */
  geometry: { name: string };
  /** `baseDir`: where relative paths and package names resolve (the client's working directory). */
  "load-plugin": { module: string; baseDir?: string };
  "list-plugins": Record<string, never>;
  attach: { name: string };
  detach: { name: string; force?: boolean };
}

export type Op = keyof RequestMap;
export type Request<O extends Op = Op> = { id: number; op: O } & RequestMap[O];

export interface OkResponse {
  id: number;
  ok: true;
  result: unknown;
}
export interface ErrorResponse {
  id: number;
  ok: false;
  errno: string;
  message: string;
  /** For a create with a table: the step that failed (dmsetup names its ioctl in the error). */
  step?: CreateStep;
}

/** The steps of a create with a table, done by the daemon as one operation. */
export type CreateStep = "create" | "load" | "resume";
export type Response = OkResponse | ErrorResponse;

/** Field validators per op: [field, type, required]. Anything else in a request is refused. */
type FieldType = "string" | "boolean" | "number" | "table";
const FIELDS: { [O in Op]: [string, FieldType, boolean][] } = {
  version: [],
  create: [
    ["name", "string", true],
    ["uuid", "string", false],
    ["readOnly", "boolean", false],
    ["table", "table", false],
  ],
  load: [
    ["name", "string", true],
    ["table", "table", true],
    ["readOnly", "boolean", false],
  ],
  clear: [["name", "string", true]],
  suspend: [
    ["name", "string", true],
    ["noflush", "boolean", false],
  ],
  resume: [
    ["name", "string", true],
    ["noflush", "boolean", false],
  ],
  remove: [
    ["name", "string", true],
    ["force", "boolean", false],
    ["deferred", "boolean", false],
  ],
  "remove-all": [["force", "boolean", false]],
  rename: [
    ["name", "string", true],
    ["newName", "string", false],
    ["newUuid", "string", false],
  ],
  list: [["target", "string", false]],
  info: [
    ["name", "string", true],
    ["inactive", "boolean", false],
  ],
  table: [
    ["name", "string", true],
    ["inactive", "boolean", false],
  ],
  status: [
    ["name", "string", true],
    ["inactive", "boolean", false],
    ["noflush", "boolean", false],
  ],
  message: [
    ["name", "string", true],
    ["sector", "number", true],
    ["message", "string", true],
  ],
  targets: [],
  deps: [
    ["name", "string", true],
    ["inactive", "boolean", false],
  ],
  wait: [
    ["name", "string", true],
    ["eventNr", "number", true],
  ],
  setgeometry: [
    ["name", "string", true],
    ["geometry", "string", true],
  ],
  geometry: [["name", "string", true]],
  "load-plugin": [
    ["module", "string", true],
    ["baseDir", "string", false],
  ],
  "list-plugins": [],
  attach: [["name", "string", true]],
  detach: [
    ["name", "string", true],
    ["force", "boolean", false],
  ],
};

export class ProtocolError extends Error {
  constructor(
    message: string,
    readonly id = 0,
  ) {
    super(message);
    this.name = "ProtocolError";
  }
}

/** Parse and validate one request line; throws ProtocolError naming the problem. */
export function parseRequest(line: string): Request {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    throw new ProtocolError("request is not valid JSON");
  }
  if (typeof value !== "object" || value === null || Array.isArray(value))
    throw new ProtocolError("request must be a JSON object");
  const req = value as Record<string, unknown>;
  const id = req.id;
  if (typeof id !== "number" || !Number.isSafeInteger(id) || id < 0)
    throw new ProtocolError("request id must be a non-negative integer");
  const op = req.op;
  if (op === undefined) throw new ProtocolError("request has no 'op' field", id);
  if (typeof op !== "string") throw new ProtocolError("request 'op' must be a string", id);
  if (!Object.hasOwn(FIELDS, op)) throw new ProtocolError(`unknown operation: ${op}`, id);
  const fields = FIELDS[op as Op];
  for (const key of Object.keys(req)) {
    if (key !== "id" && key !== "op" && !fields.some(([f]) => f === key))
      throw new ProtocolError(`${op}: unexpected field '${key}'`, id);
  }
  for (const [field, type, required] of fields) {
    const v = req[field];
    if (v === undefined) {
      if (required) throw new ProtocolError(`${op}: missing field '${field}'`, id);
      continue;
    }
    if (!checkType(v, type))
      throw new ProtocolError(
        `${op}: field '${field}' must be ${type === "table" ? "an array of target specs" : `a ${type}`}`,
        id,
      );
  }
  return req as unknown as Request;
}

function checkType(v: unknown, type: FieldType): boolean {
  switch (type) {
    case "string":
      return typeof v === "string";
    case "boolean":
      return typeof v === "boolean";
    case "number":
      return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
    case "table":
      return Array.isArray(v) && v.length <= 1_048_576 && v.every(isSpec);
  }
}

function isSpec(s: unknown): boolean {
  if (typeof s !== "object" || s === null) return false;
  const t = s as Record<string, unknown>;
  return (
    Number.isSafeInteger(t.start) &&
    (t.start as number) >= 0 &&
    Number.isSafeInteger(t.length) &&
    (t.length as number) >= 0 &&
    typeof t.type === "string" &&
    typeof t.params === "string" &&
    Object.keys(t).length === 4
  );
}

/**
 * Splits a byte stream into lines without assuming one read is one message, and refuses lines
 * longer than the limit (the connection is then closed: there is no way to resynchronise).
 */
export class LineSplitter {
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;

  constructor(private readonly limit = MAX_REQUEST_BYTES) {}

  push(chunk: Buffer): string[] {
    const lines: string[] = [];
    let start = 0;
    for (let nl = chunk.indexOf(10); nl >= 0; nl = chunk.indexOf(10, start)) {
      const piece = chunk.subarray(start, nl);
      const line = this.bufferedBytes > 0 ? Buffer.concat([...this.buffered, piece]) : piece;
      this.buffered = [];
      this.bufferedBytes = 0;
      if (line.length > this.limit) throw new ProtocolError(`request longer than ${this.limit} bytes`);
      lines.push(line.toString("utf8"));
      start = nl + 1;
    }
    if (start < chunk.length) {
      this.buffered.push(chunk.subarray(start));
      this.bufferedBytes += chunk.length - start;
      if (this.bufferedBytes > this.limit) throw new ProtocolError(`request longer than ${this.limit} bytes`);
    }
    return lines;
  }
}
