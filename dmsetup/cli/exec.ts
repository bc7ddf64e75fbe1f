/**
 * `ls --exec COMMAND` (dmsetup.c _exec_command): COMMAND is split at blanks (no shell, no
 * quoting), the device's path is appended, and it runs to completion before the next device; its
 * exit status is not looked at, as dmsetup does not. The path is where udmd links the device's
 * kernel device when it is attached: `$UDM_DEV_DIR/NAME` (udmd's default dev dir, /dev/udm, when
 * unset), as dmsetup passes `$DM_DEV_DIR/mapper/NAME`.
 */
import { spawnSync } from "node:child_process";
import path from "node:path";

/** dmsetup's ARGS_MAX: the command and its arguments, the path excluded. */
const ARGS_MAX = 256;

export class ExecCommandError extends Error {}

/** The words of an --exec command; dmsetup refuses none at all and too many. */
export function execWords(command: string): string[] {
  const words = command.split(/[ \t\n\v\f\r]+/).filter((w) => w !== "");
  if (words.length === 0) throw new ExecCommandError("");
  if (words.length >= ARGS_MAX) throw new ExecCommandError("Too many args to --exec.");
  return words;
}

/** Where udmd links attached devices by name: $UDM_DEV_DIR, else its default. */
export function deviceDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.UDM_DEV_DIR || "/dev/udm";
}

export function devicePath(name: string, env: NodeJS.ProcessEnv = process.env): string {
  return path.join(deviceDir(env), name);
}

/** Run the command on one device, with the caller's stdin, stdout and stderr. */
export function execOnDevice(words: readonly string[], name: string): void {
  spawnSync(words[0]!, [...words.slice(1), devicePath(name)], { stdio: "inherit" });
}
