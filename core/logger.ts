/**
 * Structured logging: one line per event. The daemon writes JSON lines; tests use a silent or
 * capturing logger. Injected into targets and services as `Services.Logger`.
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

/** Writes `{"time":...,"level":...,"msg":...,...fields}` lines to a stream. */
export class JsonLineLogger extends LevelLogger {
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
