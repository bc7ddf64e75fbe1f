/**
 * Structured logging: one line per event. The daemon writes JSON lines, or text lines for people
 * (TextLineLogger: on a terminal, or with udmd --log-format text); tests use a silent or capturing
 * logger. Injected into targets and services as `Services.Logger`.
 */
export type LogLevel = "debug" | "info" | "warn" | "error";
const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(msg: string, fields?: object): void;
  info(msg: string, fields?: object): void;
  warn(msg: string, fields?: object): void;
  error(msg: string, fields?: object): void;
}

/** The four level methods over one `log` of the implementation's own. */
abstract class LevelLogger implements Logger {
  protected abstract log(level: LogLevel, msg: string, fields?: object): void;
  debug(msg: string, fields?: object): void {
    this.log("debug", msg, fields);
  }
  info(msg: string, fields?: object): void {
    this.log("info", msg, fields);
  }
  warn(msg: string, fields?: object): void {
    this.log("warn", msg, fields);
  }
  error(msg: string, fields?: object): void {
    this.log("error", msg, fields);
  }
}

/** How udmd writes its log lines: `json` for programs, `text` for people. */
export type LogFormat = "json" | "text";
export const LOG_FORMATS: readonly LogFormat[] = ["json", "text"];

/** A logger writing one line per record to a stream, with fields added to every line. */
export interface LineLogger extends Logger {
  child(fields: object): LineLogger;
}

/** Writes `{"time":...,"level":...,"msg":...,...fields}` lines to a stream. */
export class JsonLineLogger extends LevelLogger implements LineLogger {
  constructor(
    private readonly level: LogLevel = "info",
    private readonly out: { write(line: string): unknown } = process.stderr,
    private readonly base: object = {},
  ) {
    super();
  }
  protected log(level: LogLevel, msg: string, fields?: object): void {
    if (ORDER[level] < ORDER[this.level]) return;
    this.out.write(JSON.stringify({ time: new Date().toISOString(), level, msg, ...this.base, ...fields }) + "\n");
  }
  /** A logger that adds `fields` to every line (e.g. the device or target name). */
  child(fields: object): JsonLineLogger {
    return new JsonLineLogger(this.level, this.out, { ...this.base, ...fields });
  }
}

/**
 * Writes `HH:MM:SS.mmm LEVEL msg key=value ...` lines: the fields of a JSON line, for a person at a
 * terminal. Values that are not plain words are written as JSON (quoted strings, arrays, objects).
 */
export class TextLineLogger extends LevelLogger implements LineLogger {
  constructor(
    private readonly level: LogLevel = "info",
    private readonly out: { write(line: string): unknown } = process.stderr,
    private readonly base: object = {},
  ) {
    super();
  }
  protected log(level: LogLevel, msg: string, fields?: object): void {
    if (ORDER[level] < ORDER[this.level]) return;
    const d = new Date();
    const two = (n: number) => String(n).padStart(2, "0");
    const time = `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
    const pairs = Object.entries({ ...this.base, ...fields })
      .filter(([, v]) => v !== undefined && v !== null)
      .map(([k, v]) => `${k}=${textValue(v)}`);
    this.out.write(`${time} ${level.padEnd(5)} ${[msg, ...pairs].join(" ")}\n`);
  }
  child(fields: object): TextLineLogger {
    return new TextLineLogger(this.level, this.out, { ...this.base, ...fields });
  }
}

function textValue(v: unknown): string {
  if (typeof v === "string" && /^[\w./:@+,=-]+$/.test(v)) return v;
  if (typeof v === "bigint") return v.toString();
  return JSON.stringify(v) ?? String(v);
}

/** A line logger in `format`: text or JSON lines. */
export function lineLogger(
  format: LogFormat,
  level: LogLevel = "info",
  out: { write(line: string): unknown } = process.stderr,
  base: object = {},
): LineLogger {
  return format === "text" ? new TextLineLogger(level, out, base) : new JsonLineLogger(level, out, base);
}

/** Keeps records in memory (tests) or drops them. */
export class MemoryLogger extends LevelLogger {
  readonly records: { level: LogLevel; msg: string; fields?: object }[] = [];
  constructor(private readonly keep = true) {
    super();
  }
  protected log(level: LogLevel, msg: string, fields?: object): void {
    if (this.keep) this.records.push({ level, msg, fields });
  }
}
