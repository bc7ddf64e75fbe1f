/**
 * dmsetup's command line: options may come before or after the command, as dmsetup allows.
 */
import { type ParseArgsConfig, parseArgs } from "node:util";
import { type ManglingMode, manglingModeFromEnv, parseManglingMode } from "./name-mangling.js";

export interface CliOptions {
  verbose: number;
  readonly: boolean;
  notable: boolean;
  table?: string;
  uuid?: string;
  setuuid?: string;
  noflush: boolean;
  nolockfs: boolean;
  noopencount: boolean;
  inactive: boolean;
  force: boolean;
  retry: boolean;
  deferred: boolean;
  target?: string;
  tree: boolean;
  options?: string;
  columns: boolean;
  noheadings: boolean;
  separator?: string;
  sort?: string;
  nameprefixes: boolean;
  rows: boolean;
  concise: boolean;
  json: boolean;
  autostart: boolean;
  foreground: boolean;
  runDir?: string;
  help: boolean;
  version: boolean;
  /** -S/--select: the selection text, parsed by select.ts. */
  select?: string;
  /** ls --exec: the command run with each device's path. */
  exec?: string;
  /** --manglename as given (the `mangle` command's target format). */
  manglename?: ManglingMode;
  /** The mode names are sent and read in: --manglename, else $DM_DEFAULT_NAME_MANGLING_MODE, else auto. */
  mangling: ManglingMode;
  checks: boolean;
  /** -U/-G/-M: owner and mode for the kernel device of an attached device. */
  uid?: number;
  gid?: number;
  mode?: number;
}

export class UsageError extends Error {}

/** An option value dmsetup refuses while reading its command line ("Couldn't process command line."). */
export class OptionValueError extends Error {}

/** C's atoi, as dmsetup reads -U and -G: leading blanks and a sign, then digits; otherwise 0. */
function atoi(text: string): number {
  const m = /^[ \t\n\v\f\r]*([+-]?\d+)/.exec(text);
  return m ? Number(m[1]) | 0 : 0;
}

/** -M as dmsetup reads it: strtol base 8, the whole string, not zero. */
function octalMode(text: string): number {
  const m = /^[ \t\n\v\f\r]*([+-]?)([0-7]+)$/.exec(text);
  const value = m ? parseInt(m[2]!, 8) * (m[1] === "-" ? -1 : 1) : 0;
  const overflow = Math.abs(value) > 2 ** 63 - 1;
  if (!m || value === 0 || overflow)
    throw new OptionValueError(
      `Invalid argument for --mode: ${text}. ${overflow ? "Numerical result out of range" : ""}`,
    );
  return value;
}

const OPTIONS = {
  verbose: { type: "boolean", short: "v", multiple: true },
  readonly: { type: "boolean", short: "r" },
  notable: { type: "boolean", short: "n" },
  table: { type: "string" },
  uuid: { type: "string", short: "u" },
  setuuid: { type: "string" },
  major: { type: "string", short: "j" },
  minor: { type: "string", short: "m" },
  noflush: { type: "boolean" },
  nolockfs: { type: "boolean" },
  noopencount: { type: "boolean" },
  inactive: { type: "boolean" },
  force: { type: "boolean", short: "f" },
  retry: { type: "boolean" },
  deferred: { type: "boolean" },
  target: { type: "string" },
  tree: { type: "boolean" },
  options: { type: "string", short: "o" },
  columns: { type: "boolean", short: "c" },
  C: { type: "boolean", short: "C" },
  noheadings: { type: "boolean" },
  select: { type: "string", short: "S" },
  exec: { type: "string" },
  manglename: { type: "string" },
  checks: { type: "boolean" },
  uid: { type: "string", short: "U" },
  gid: { type: "string", short: "G" },
  mode: { type: "string", short: "M" },
  separator: { type: "string" },
  sort: { type: "string", short: "O" },
  nameprefixes: { type: "boolean" },
  rows: { type: "boolean" },
  concise: { type: "boolean" },
  json: { type: "boolean" },
  "no-autostart": { type: "boolean" },
  foreground: { type: "boolean" },
  "run-dir": { type: "string" },
  help: { type: "boolean", short: "h" },
  version: { type: "boolean" },
  // Accepted for script compatibility; udev does not exist here.
  yes: { type: "boolean", short: "y" },
  noudevsync: { type: "boolean" },
  noudevrules: { type: "boolean" },
  verifyudev: { type: "boolean" },
  showkeys: { type: "boolean" },
  udevcookie: { type: "string" },
  readahead: { type: "string" },
  addnodeoncreate: { type: "boolean" },
  addnodeonresume: { type: "boolean" },
} satisfies ParseArgsConfig["options"];

const takesValue = (name: string | undefined) =>
  name !== undefined && (OPTIONS as Record<string, { type: string }>)[name]?.type === "string";
const shortName = (c: string) => Object.entries(OPTIONS).find(([, o]) => (o as { short?: string }).short === c)?.[0];

/**
 * getopt gives an option that takes a value the next word whatever it is (`-O -name` sorts by
 * name, descending); parseArgs would take `-name` for options. Such pairs become `--long=value`.
 */
function joinOptionValues(argv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--") return [...out, ...argv.slice(i)];
    const next = argv[i + 1];
    if (next !== undefined && a.startsWith("--") && !a.includes("=") && takesValue(a.slice(2))) {
      out.push(`${a}=${next}`);
      i++;
    } else if (next !== undefined && /^-[^-]/.test(a)) {
      // In a cluster, the first option that takes a value takes the rest of the word, or the next.
      const j = [...a.slice(1)].findIndex((c) => takesValue(shortName(c)));
      if (j === a.length - 2) {
        if (j > 0) out.push(a.slice(0, -1));
        out.push(`--${shortName(a.at(-1)!)}=${next}`);
        i++;
      } else out.push(a);
    } else out.push(a);
  }
  return out;
}

/** Where the command is in `argv`: the first word that is neither an option nor an option's value; -1 if none. */
function commandIndex(argv: readonly string[]): number {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--") return i + 1 < argv.length ? i + 1 : -1;
    if (a.startsWith("--")) {
      if (!a.includes("=") && takesValue(a.slice(2))) i++;
    } else if (a.startsWith("-") && a.length > 1) {
      // A cluster of short options; one that takes a value takes the rest, or the next word.
      const j = [...a.slice(1)].findIndex((c) => takesValue(shortName(c)));
      if (j === a.length - 2) i++;
    } else return i;
  }
  return -1;
}

/** getopt_long's words for what parseArgs refused, as dmsetup prints them before "Couldn't process command line." */
function optionError(err: Error & { code?: string }, argv: readonly string[]): Error {
  const quoted = /'([^' ]+)/.exec(err.message)?.[1] ?? "";
  if (err.code === "ERR_PARSE_ARGS_UNKNOWN_OPTION") {
    return new OptionValueError(
      quoted.startsWith("--")
        ? `udmsetup: unrecognized option '${quoted}'`
        : `udmsetup: invalid option -- '${quoted.slice(1)}'`,
    );
  }
  if (err.code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE") {
    const long = /--[\w-]+/.exec(err.message)?.[0] ?? quoted;
    if (/does not take an argument/.test(err.message))
      return new OptionValueError(`udmsetup: option '${long}' doesn't allow an argument`);
    // Missing value: named as it was written, the last option on the line.
    const short = /'-(\w),/.exec(err.message)?.[1];
    const last = argv.at(-1) ?? "";
    if (short !== undefined && /^-[^-]/.test(last) && last.endsWith(short))
      return new OptionValueError(`udmsetup: option requires an argument -- '${short}'`);
    return new OptionValueError(`udmsetup: option '${long}' requires an argument`);
  }
  return new UsageError(err.message);
}

export function parseCommandLine(
  argv: string[],
  env: NodeJS.ProcessEnv = {},
): { command: string | undefined; args: string[]; opts: CliOptions } {
  const at = commandIndex(argv);
  let rest: string[] | undefined;
  if (at >= 0 && argv[at] === "daemon" && argv[at + 1] !== "stop") {
    // udmd's options follow `daemon` as they are (daemon-command.ts checks them with udmd's
    // table); `daemon stop` takes udmsetup's own (--run-dir, --json) anywhere.
    rest = argv.slice(at + 1);
    argv = argv.slice(0, at + 1);
  }
  let parsed;
  try {
    parsed = parseArgs({ args: joinOptionValues(argv), allowPositionals: true, strict: true, options: OPTIONS });
  } catch (err) {
    throw optionError(err as Error & { code?: string }, argv);
  }
  const v = parsed.values;
  const [command, ...positionals] = parsed.positionals;
  const args = rest ?? positionals;
  const manglename = v.manglename === undefined ? undefined : parseManglingMode(v.manglename);
  if (manglename === null) throw new OptionValueError("Unknown name mangling mode.");
  return {
    command,
    args,
    opts: {
      verbose: v.verbose?.length ?? 0,
      readonly: v.readonly ?? false,
      notable: v.notable ?? false,
      table: v.table,
      uuid: v.uuid,
      setuuid: v.setuuid,
      noflush: v.noflush ?? false,
      nolockfs: v.nolockfs ?? false,
      noopencount: v.noopencount ?? false,
      inactive: v.inactive ?? false,
      force: v.force ?? false,
      retry: v.retry ?? false,
      deferred: v.deferred ?? false,
      target: v.target,
      tree: v.tree ?? false,
      options: v.options,
      columns: (v.columns ?? false) || (v.C ?? false),
      noheadings: v.noheadings ?? false,
      separator: v.separator,
      sort: v.sort,
      nameprefixes: v.nameprefixes ?? false,
      rows: v.rows ?? false,
      concise: v.concise ?? false,
      json: v.json ?? false,
      autostart: !(v["no-autostart"] ?? false) && env.UDM_NO_AUTOSTART !== "1",
      foreground: v.foreground ?? false,
      runDir: v["run-dir"],
      help: v.help ?? false,
      version: v.version ?? false,
      select: v.select,
      exec: v.exec,
      manglename,
      mangling: manglename ?? manglingModeFromEnv(env),
      checks: v.checks ?? false,
      uid: v.uid === undefined ? undefined : atoi(v.uid),
      gid: v.gid === undefined ? undefined : atoi(v.gid),
      mode: v.mode === undefined ? undefined : octalMode(v.mode),
    },
  };
}
