/**
 * dmsetup's command line: options may come before or after the command, as dmsetup allows.
 */
import { parseArgs } from "node:util";

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
}

export class UsageError extends Error {}

export function parseCommandLine(
  argv: string[],
  env: NodeJS.ProcessEnv = {},
): { command: string | undefined; args: string[]; opts: CliOptions } {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
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
      },
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const v = parsed.values;
  const [command, ...args] = parsed.positionals;
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
    },
  };
}
