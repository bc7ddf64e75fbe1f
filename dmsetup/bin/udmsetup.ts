#!/usr/bin/env node
/**
 * udmsetup: dmsetup's commands, arguments and output, against udmd.
 */
import "../../core/node-version.js";
import "reflect-metadata";
import { DmError, strerror } from "../../core/errors.js";
import { checkCommand, SELECT_COMMANDS, subCommandUsage } from "../cli/command-table.js";
import { CommandFailed, Commands, type Io } from "../cli/commands.js";
import { connectDaemon, NoDaemonError } from "../cli/connect.js";
import { parseDaemonCommand, runInForeground, startInBackground, stopDaemon } from "../cli/daemon-command.js";
import { checkReportFields } from "../cli/format/report.js";
import { commandHelp, USAGE } from "../cli/help.js";
import { LOCAL_COMMANDS, runLocalCommand } from "../cli/local-commands.js";
import { runPluginCommand } from "../cli/plugin-command.js";
import { deviceDir } from "../cli/exec.js";
import { ManglingClient } from "../cli/name-mangling.js";
import { OptionValueError, parseCommandLine, UsageError } from "../cli/options.js";
import { Selection, SelectionError, SelectionHelp } from "../cli/select.js";
import { defaultRunDir, runPaths } from "../daemon/run-dir.js";

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

/**
 * Where failures go: dmsetup's lines on stderr, or, with --json, one line `{"error": MESSAGE,
 * "errno": NAME}` on stderr (MESSAGE: what the text would say, without the usage and the
 * `Command failed.` line), the exit status unchanged. What a successful command writes on stderr
 * (`-S help`, `-o help`) is written as it is.
 */
class Failures {
  private text = "";
  errno: string | null = null;
  constructor(readonly json: boolean) {}
  /** stderr as the commands write it; with --json kept back until the status is known. */
  readonly err = (t: string) => {
    if (this.json) this.text += t;
    else io.err(t);
  };
  /** Text that only the plain-text form shows (the usage after an error, field lists). */
  readonly textOnly = (t: string) => {
    if (!this.json) io.err(t);
  };
  fail(errno: string | null, message?: string): number {
    this.errno ??= errno;
    if (message !== undefined) this.err(`${message}\n`);
    return 1;
  }
  finish(status: number): number {
    if (!this.json) return status;
    if (status === 0) {
      if (this.text) io.err(this.text);
      return 0;
    }
    const lines = this.text
      .split("\n")
      .filter((l) => !["", "Command failed.", "Couldn't process command line."].includes(l));
    io.err(`${JSON.stringify({ error: lines.join("\n"), errno: this.errno })}\n`);
    return status;
  }
}

/** The usage of udmd, for `udmsetup help daemon`. */
async function udmdUsage(): Promise<string> {
  return (await import("../daemon/udmd-options.js")).UDMD_USAGE;
}

async function main(argv: string[]): Promise<number> {
  const json = argv.slice(0, argv.includes("--") ? argv.indexOf("--") : undefined).includes("--json");
  const failures = new Failures(json);
  return failures.finish(await run(argv, failures));
}

async function run(argv: string[], f: Failures): Promise<number> {
  let parsed;
  try {
    parsed = parseCommandLine(argv, process.env);
  } catch (err) {
    if (err instanceof OptionValueError) return f.fail("EINVAL", `${err.message}\nCouldn't process command line.`);
    f.fail("EINVAL", (err as Error).message);
    f.textOnly(USAGE);
    return 1;
  }
  const { command, args, opts } = parsed;
  // `dmsetup --version` is the version command.
  if (opts.version && !command) return run(["version", ...argv.filter((a) => a !== "--version")], f);
  if (!command) {
    if (opts.help) {
      io.out(USAGE);
      return 0;
    }
    f.textOnly(USAGE);
    return f.fail("EINVAL", f.json ? "No command given." : undefined);
  }
  // Everything that can be refused without a daemon is refused before one is reached.
  const check = checkCommand(command, args);
  if (check === "unknown") {
    f.fail("EINVAL", "Unknown command.");
    f.textOnly(USAGE);
    return 1;
  }
  if ((command === "help" && check === "ok") || opts.help) {
    const topic = command === "help" ? args[0] : command;
    if (topic === undefined) {
      io.out(USAGE);
      return 0;
    }
    const help = commandHelp(topic, await udmdUsage());
    if (help === undefined) return f.fail("EINVAL", `Unknown command: ${topic}.`);
    io.out(help);
    return 0;
  }
  if (check === "sub-command") return f.fail("EINVAL", `${subCommandUsage(command)}\nCommand failed.`);
  if (check !== "ok") {
    f.fail("EINVAL", "Incorrect number of arguments.");
    f.textOnly(USAGE);
    return 1;
  }
  let selection: Selection | null = null;
  if (opts.select !== undefined && SELECT_COMMANDS.has(command)) {
    try {
      selection = Selection.parse(opts.select);
    } catch (err) {
      if (!(err instanceof SelectionError)) throw err;
      if (err instanceof SelectionHelp) {
        io.err(err.message);
        return 0;
      }
      f.err(err.message);
      return f.fail("EINVAL");
    }
  }
  // A report's -o and -O are read before anything else (libdm's report setup): `help` lists the
  // fields, an unknown one is named.
  if ((command === "info" && opts.columns) || command === "splitname") {
    const report = checkReportFields({ fields: opts.options, sort: opts.sort });
    if (report && report.error === undefined) {
      io.err(report.help);
      return 0;
    }
    if (report) {
      f.textOnly(report.help);
      return f.fail("EINVAL", report.error);
    }
  }
  const cio: Io = { ...io, err: f.err };
  if (LOCAL_COMMANDS.has(command)) {
    try {
      return runLocalCommand(command, args, opts, cio, USAGE, selection);
    } catch (err) {
      f.fail("EINVAL", (err as Error).message);
      if (err instanceof UsageError) f.textOnly(USAGE);
      else f.err("Command failed.\n");
      return 1;
    }
  }
  const runDir = opts.runDir ?? defaultRunDir();
  if (command === "daemon") return daemon(args, runDir, opts.foreground, opts.verbose > 0, cio, f);
  const paths = runPaths(runDir);
  let client;
  try {
    client = await connectDaemon(paths, { autostart: opts.autostart });
  } catch (err) {
    const errno = err instanceof NoDaemonError ? err.errno : ((err as NodeJS.ErrnoException).code ?? "EIO");
    const message = err instanceof NoDaemonError ? err.message : `cannot reach udmd: ${(err as Error).message}`;
    return f.fail(errno, `${message}\nCommand failed.`);
  }
  // dmsetup turns mangling off for `mangle`, so that it reaches names in any form.
  const mangling = command === "mangle" ? "none" : opts.mangling;
  // Devices named by a path: udmd's links first, then dmsetup's own directory (libdm's dm_dir).
  const devDirs = [deviceDir(), "/dev/mapper"];
  const cmds = new Commands(new ManglingClient(client, mangling, devDirs), { ...opts, mangling }, cio, selection);
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
        await runPluginCommand(client, args, opts, cio);
        break;
      default:
        return f.fail("EINVAL", "Unknown command.");
    }
    return 0;
  } catch (err) {
    reportFailure(err, f);
    return 1;
  } finally {
    client.close();
  }
}

/** A command's failure: its message (unless already printed), its errno, `Command failed.` */
function reportFailure(err: unknown, f: Failures): void {
  if (err instanceof CommandFailed) f.fail(err.errno);
  else if (err instanceof UsageError) f.fail("EINVAL", err.message);
  else if (err instanceof DmError)
    f.fail(err.errno, err.message); // e.g. a table parse error
  else {
    const code = (err as NodeJS.ErrnoException).code;
    f.fail(code && /^E[A-Z0-9]+$/.test(code) ? code : "EIO", (err as Error).message ?? strerror("EIO"));
  }
  f.err("Command failed.\n");
}

/** `udmsetup daemon ...` (daemon-command.ts). */
async function daemon(args: string[], runDir: string, foreground: boolean, verbose: boolean, cio: Io, f: Failures) {
  let cmd;
  try {
    cmd = parseDaemonCommand(args, runDir);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    return f.fail("EINVAL", `${err.message}\nCommand failed.`);
  }
  if (cmd.help) {
    io.out(commandHelp("daemon", await udmdUsage())!);
    return 0;
  }
  try {
    if (cmd.kind === "stop") await stopDaemon(cmd, cio);
    else if (foreground || cmd.foreground) return await runInForeground(cmd);
    else await startInBackground(cmd, cio, verbose);
    return 0;
  } catch (err) {
    if (err instanceof NoDaemonError) f.fail(err.errno, err.message);
    else reportFailure(err, f);
    if (err instanceof NoDaemonError) f.err("Command failed.\n");
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
