/**
 * What udmsetup knows before it reaches udmd (dmsetup checks the same before it opens the
 * driver): which commands exist, how many arguments the ones with a fixed count take, which ones
 * take `-S`. An unknown command or a wrong count fails without a daemon being started.
 */
import { LOCAL_COMMANDS } from "./local-commands.js";

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

/** dmsetup's min_args/max_args for the commands udm checks before anything else. */
const ARG_COUNTS: Record<string, [number, number]> = {
  "target-version": [1, Infinity],
  setgeometry: [5, 5],
};

export type CommandCheck = "ok" | "unknown" | "argument-count";

export function checkCommand(command: string, args: readonly string[]): CommandCheck {
  if (!DAEMON_COMMANDS.has(command) && !LOCAL_COMMANDS.has(command) && command !== "daemon") return "unknown";
  const [min, max] = ARG_COUNTS[command] ?? [0, Infinity];
  return args.length < min || args.length > max ? "argument-count" : "ok";
}
