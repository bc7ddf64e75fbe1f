#!/usr/bin/env node
/**
 * udmsetup: dmsetup's commands, arguments and output, against udmd.
 */
import "reflect-metadata";
import { DmError, strerror } from "../../core/errors.js";
import { checkCommand, SELECT_COMMANDS } from "../cli/command-table.js";
import { CommandFailed, Commands, type Io } from "../cli/commands.js";
import { connectDaemon, NoDaemonError } from "../cli/connect.js";
import { LOCAL_COMMANDS, runLocalCommand } from "../cli/local-commands.js";
import { runPluginCommand } from "../cli/plugin-command.js";
import { ManglingClient } from "../cli/name-mangling.js";
import { OptionValueError, parseCommandLine, UsageError } from "../cli/options.js";
import { Selection, SelectionError, SelectionHelp } from "../cli/select.js";
import { defaultRunDir, runPaths } from "../daemon/run-dir.js";

const USAGE = `Usage: udmsetup [--run-dir DIR] [--no-autostart] [--json] <command> [args]
Options (as dmsetup): [-v] [-f] [-r] [--checks] [--manglename none|hex|auto] [--noopencount] [--noflush]
  [--inactive] [--retry] [-c] [-o FIELDS] [-O SORT] [-S SELECTION] [--noheadings] [--separator S]
  [-U UID] [-G GID] [-M MODE]
Commands (as dmsetup):
  create NAME [TABLE_FILE] [--table TABLE] [-u UUID] [-r] [-n|--notable]
  create --concise [SPEC]
  load|reload NAME [TABLE_FILE] [--table TABLE] [-r]
  clear NAME...
  suspend [--noflush] NAME...
  resume NAME...
  remove [-f] [--retry] [--deferred] NAME...
  remove_all [-f]
  rename NAME NEWNAME | rename NAME --setuuid UUID
  ls [--target TYPE] [--exec COMMAND] [--tree] [-o OPTIONS]
  info [-c [-o FIELDS] [--noheadings] [--separator S]] [NAME...]
  table [--target TYPE] [--concise] [--inactive] [NAME...]
  status [--target TYPE] [--inactive] [NAME...]
  message NAME SECTOR MESSAGE...
  targets
  target-version TARGET...
  deps [-o devno|blkdevname|devname] [NAME...]
  wait NAME [EVENT_NR]
  mangle [NAME...]
  setgeometry NAME CYL HEAD SECT START
  version
  splitname NAME [SUBSYSTEM] [-o FIELDS]
  udevflags COOKIE | udevcookies | udevcomplete COOKIE | udevcomplete_all [AGE]
  mknodes [NAME] | help
  wipe_table NAME...     replace the table with one error target of the same size, and resume
udm extras:
  attach NAME            expose NAME as a kernel block device (root), print its path
  detach NAME            undo attach
  merge ORIGIN SNAPSHOT  merge SNAPSHOT back into ORIGIN (snapshot-merge), with progress;
                         ORIGIN ends as snapshot-origin
  daemon [--foreground]  run udmd (in the background unless --foreground)
  plugin load MODULE     load a target plugin into udmd: a path or a package name, resolved here
  plugin list            the plugins udmd loaded: FILE: TARGET...
`;

// dmsetup dies of SIGPIPE when its reader goes away (`udmsetup info | head -1`). Node ignores
// SIGPIPE and reports EPIPE as an error event instead: end quietly, with the status a shell shows
// for a SIGPIPE death, rather than with a stack trace.
for (const stream of [process.stdout, process.stderr]) {
  stream.on("error", (err: NodeJS.ErrnoException) => {
    if (err.code === "EPIPE") process.exit(128 + 13);
    throw err;
  });
}

const io: Io = {
  out: (t) => void process.stdout.write(t),
  err: (t) => void process.stderr.write(t),
  tty: process.stdout.isTTY === true,
  utf8: /utf-?8/i.test(process.env.LC_ALL || process.env.LC_CTYPE || process.env.LANG || ""),
  readStdin: async () => {
    const chunks: Buffer[] = [];
    for await (const c of process.stdin) chunks.push(c as Buffer);
    return Buffer.concat(chunks).toString("utf8");
  },
};

async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseCommandLine(argv, process.env);
  } catch (err) {
    if (err instanceof OptionValueError) io.err(`${err.message}\nCouldn't process command line.\n`);
    else io.err(`${(err as Error).message}\n${USAGE}`);
    return 1;
  }
  const { command, args, opts } = parsed;
  // `dmsetup --version` is the version command.
  if (opts.version && !command) return main(["version", ...argv.filter((a) => a !== "--version")]);
  if (opts.help || !command) {
    (opts.help ? io.out : io.err)(USAGE);
    return opts.help ? 0 : 1;
  }
  // Everything that can be refused without a daemon is refused before one is reached.
  const check = checkCommand(command, args);
  if (check !== "ok") {
    io.err(`${check === "unknown" ? "Unknown command." : "Incorrect number of arguments."}\n${USAGE}`);
    return 1;
  }
  let selection: Selection | null = null;
  if (opts.select !== undefined && SELECT_COMMANDS.has(command)) {
    try {
      selection = Selection.parse(opts.select);
    } catch (err) {
      if (!(err instanceof SelectionError)) throw err;
      io.err(err.message);
      return err instanceof SelectionHelp ? 0 : 1;
    }
  }
  if (LOCAL_COMMANDS.has(command)) {
    try {
      return runLocalCommand(command, args, opts, io, USAGE, selection);
    } catch (err) {
      io.err(`${(err as Error).message}\n${err instanceof UsageError ? USAGE : "Command failed.\n"}`);
      return 1;
    }
  }
  const paths = runPaths(opts.runDir ?? defaultRunDir());
  if (command === "daemon") {
    if (opts.foreground) {
      const { fileURLToPath } = await import("node:url");
      const { spawnSync } = await import("node:child_process");
      const udmd = fileURLToPath(new URL("./udmd.js", import.meta.url));
      return spawnSync(process.execPath, [udmd, "--run-dir", paths.dir, ...args], { stdio: "inherit" }).status ?? 1;
    }
    const { startDaemon } = await import("../cli/connect.js");
    startDaemon(paths);
    return 0;
  }
  let client;
  try {
    client = await connectDaemon(paths, { autostart: opts.autostart });
  } catch (err) {
    io.err(
      `${err instanceof NoDaemonError ? err.message : `cannot reach udmd: ${(err as Error).message}`}\nCommand failed.\n`,
    );
    return 1;
  }
  // dmsetup turns mangling off for `mangle`, so that it reaches names in any form.
  const mangling = command === "mangle" ? "none" : opts.mangling;
  const cmds = new Commands(new ManglingClient(client, mangling), { ...opts, mangling }, io, selection);
  try {
    switch (command) {
      case "create":
        await cmds.create(args);
        break;
      case "load":
      case "reload":
        await cmds.load(args);
        break;
      case "clear":
        await cmds.clear(args);
        break;
      case "suspend":
        await cmds.suspend(args);
        break;
      case "resume":
        await cmds.resume(args);
        break;
      case "remove":
        await cmds.remove(args);
        break;
      case "remove_all":
        await cmds.removeAll();
        break;
      case "rename":
        await cmds.rename(args);
        break;
      case "ls":
        await cmds.ls();
        break;
      case "info":
        await cmds.info(args);
        break;
      case "table":
        await cmds.tableOrStatus("table", args);
        break;
      case "status":
        await cmds.tableOrStatus("status", args);
        break;
      case "message":
        await cmds.message(args);
        break;
      case "targets":
        await cmds.targets();
        break;
      case "deps":
        await cmds.deps(args);
        break;
      case "wait":
        await cmds.wait(args);
        break;
      case "version":
        await cmds.version();
        break;
      case "wipe_table":
        await cmds.wipeTable(args);
        break;
      case "mangle":
        await cmds.mangle(args);
        break;
      case "target-version":
        await cmds.targetVersion(args);
        break;
      case "setgeometry":
        await cmds.setGeometry(args);
        break;
      case "attach":
        await cmds.attach(args);
        break;
      case "detach":
        await cmds.detach(args);
        break;
      case "merge":
        await cmds.merge(args);
        break;
      case "plugin":
        await runPluginCommand(client, args, opts, io);
        break;
      default:
        io.err("Unknown command.\n");
        return 1;
    }
    return 0;
  } catch (err) {
    if (err instanceof UsageError) io.err(`${err.message}\n`);
    else if (err instanceof DmError)
      io.err(`${err.message}\n`); // e.g. a table parse error
    else if (!(err instanceof CommandFailed)) io.err(`${(err as Error).message ?? strerror("EIO")}\n`);
    io.err("Command failed.\n");
    return 1;
  } finally {
    client.close();
  }
}

process.exitCode = await main(process.argv.slice(2));
