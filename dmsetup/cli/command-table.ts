/**
 * What udmsetup knows before it reaches udmd (dmsetup checks the same before it opens the
 * driver): which commands exist, how many arguments the ones with a fixed count take, which ones
 * take `-S`. An unknown command or a wrong count fails without a daemon being started.
 */
import { LOCAL_COMMANDS } from "./local-commands.js";
import { PLUGIN_USAGE } from "./plugin-command.js";

/** Commands udmd answers. */
export const DAEMON_COMMANDS: ReadonlySet<string> = new Set([
  "create",
  "load",
  "reload",
  "clear",
  "suspend",
  "resume",
  "remove",
  "remove_all",
  "rename",
  "ls",
  "info",
  "table",
  "status",
  "message",
  "targets",
  "deps",
  "wait",
  "version",
  "wipe_table",
  "mangle",
  "target-version",
  "setgeometry",
  "attach",
  "detach",
  "merge",
  "plugin",
]);

/**
 * Commands dmsetup applies `-S` to (its repeatable commands "with --select", `info -c` and
 * `splitname`, which are reports), and `ls` and `info`, which udm filters too.
 */
export const SELECT_COMMANDS: ReadonlySet<string> = new Set([
  "remove",
  "suspend",
  "resume",
  "clear",
  "wipe_table",
  "deps",
  "status",
  "table",
  "info",
  "ls",
  "splitname",
]);

/**
 * dmsetup's min_args/max_args (its _dm_commands table, as the installed dmsetup checks them), and
 * udm's own commands'. Commands not listed take any number.
 */
const ARG_COUNTS: Record<string, [number, number]> = {
  create: [0, 2],
  remove_all: [0, 0],
  load: [0, 2],
  reload: [0, 2],
  rename: [1, 2],
  message: [2, Infinity],
  ls: [0, 0],
  wait: [0, 2],
  udevflags: [1, 1],
  udevcomplete: [1, 1],
  udevcomplete_all: [0, 1],
  udevcookies: [0, 0],
  "target-version": [1, Infinity],
  targets: [0, 0],
  version: [0, 0],
  setgeometry: [5, 5],
  splitname: [1, 2],
  help: [0, 1],
  attach: [1, 1],
  detach: [1, 1],
  merge: [2, 2],
};

/** Sub-commands, their argument counts, and the usage a wrong one gets. */
const SUB_COMMANDS: Record<string, { counts: Record<string, number>; usage: string }> = {
  plugin: { counts: { load: 1, list: 0 }, usage: PLUGIN_USAGE },
};

/** The usage line for a wrong use of `command`'s sub-commands. */
export function subCommandUsage(command: string): string {
  return `Usage: udmsetup ${SUB_COMMANDS[command]?.usage ?? command}`;
}

export type CommandCheck = "ok" | "unknown" | "argument-count" | "sub-command";

export function checkCommand(command: string, args: readonly string[]): CommandCheck {
  if (!DAEMON_COMMANDS.has(command) && !LOCAL_COMMANDS.has(command) && command !== "daemon") return "unknown";
  const subs = SUB_COMMANDS[command]?.counts;
  if (subs) {
    const sub = args[0];
    return sub !== undefined && Object.hasOwn(subs, sub) && args.length - 1 === subs[sub] ? "ok" : "sub-command";
  }
  const [min, max] = ARG_COUNTS[command] ?? [0, Infinity];
  return args.length < min || args.length > max ? "argument-count" : "ok";
}
