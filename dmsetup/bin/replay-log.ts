#!/usr/bin/env node
/**
 * udm-replay-log: josefbacik's replay-log (log-writes/replay-log.c) for dm-log-writes logs, with
 * the same options, messages, output and exit codes:
 *
 *   udm-replay-log --log <logfile> [--replay <device>] [--limit N] [--start-entry N]
 *                  [--start-mark NAME] [--end-mark NAME] [--next-flush] [--next-fua] [--find]
 *                  [--num-entries] [--no-discard] [--fsck CMD --check N|flush|fua|discard]
 *                  [--start-sector S] [--end-sector S] [-v|-vv]
 *
 * The log and the replay target are files or block devices. Without --replay it prints the log's
 * summary; --find prints the entry the stop options name as ENTRY@BLOCK (BLOCK: the log block
 * right after it); --num-entries prints nr_entries. Long options may be abbreviated and written as --opt=value (getopt_long).
 */
import "../../core/node-version.js";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import { fileURLToPath } from "node:url";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { openBackingDevice } from "../../core/devices/open-device.js";
import { errnoNumber } from "../../core/sys/errors.js";
import {
  LOG_DISCARD_FLAG,
  LOG_FLUSH_FLAG,
  LOG_FUA_FLAG,
  LOG_MARK_FLAG,
  WRITE_LOG_VERSION,
  type LogEntry,
} from "../../targets/log-writes/format.js";
import { EntryReplayer, LogReader, deviceLogSource, shouldStop, syncDevice } from "../../targets/log-writes/replay.js";

export interface ReplayLogIo {
  out(text: string): void;
  err(text: string): void;
  /** system(3): run a shell command, return its exit status. Default: sh -c, output to out/err. */
  system?(command: string): number;
}

const USAGE = `Usage: udm-replay-log --log <logfile> [options]
\t--replay <device> - replay onto a specific device
\t--limit <number> - number of entries to replay
\t--next-flush - replay to/find the next flush
\t--next-fua - replay to/find the next fua
\t--start-entry <entry> - start at the given entry #
\t--start-mark <mark> - mark to start from
\t--end-mark <mark> - replay to/find the given mark
\t--find - put replay-log in find mode, will search based on the other options
\t--number-entries - print the number of entries in the log
\t--no-discard - don't process discard entries
\t--fsck - the fsck command to run, must specify --check
\t--check [<number>|flush|fua|discard] when to check the file system, must specify --fsck
\t--start-sector <sector> - replay ops on region from <sector> onto <device>
\t--end-sector <sector> - replay ops on region to <sector> onto <device>
\t-v or --verbose - print replayed ops
\t-vv - print also skipped ops
`;

const LONG_OPTIONS: Record<string, boolean> = {
  "next-flush": false,
  "next-fua": false,
  "start-entry": true,
  "end-mark": true,
  log: true,
  replay: true,
  limit: true,
  verbose: false,
  find: false,
  "num-entries": false,
  "no-discard": false,
  fsck: true,
  check: true,
  "start-mark": true,
  "start-sector": true,
  "end-sector": true,
  help: false,
};

class Usage extends Error {}
class Exit extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

interface Options {
  log?: string;
  replay?: string;
  limit: number;
  startEntry: number;
  startMark?: string;
  endMark?: string;
  stopFlags: number;
  find: boolean;
  numEntries: boolean;
  discard: boolean;
  fsck?: string;
  check?: { mode: "number"; every: number } | { mode: "flush" } | { mode: "fua" } | { mode: "discard" };
  startSector: number;
  endSector: number;
  verbose: number;
  help: boolean;
}

/** strtoull(text, &end, 0) with "*end must be NUL": decimal, 0x hex or 0 octal; "" is 0. */
function parseNumber(text: string, io: ReplayLogIo, what = "entry"): number {
  const m = /^\s*\+?(?:(0[xX][0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))?$/.exec(text);
  const n = !m ? null : m[1] ? BigInt(m[1]) : m[2] ? BigInt("0o" + (m[2].slice(1) || "0")) : m[3] ? BigInt(m[3]) : 0n;
  if (n === null || n > BigInt(Number.MAX_SAFE_INTEGER)) {
    io.err(`Invalid ${what} number\n`);
    throw new Exit(1);
  }
  return Number(n);
}

/** The marks come from strndup(optarg, 4097 - sizeof(struct log_write_entry)). */
function markArg(text: string): string {
  const buf = Buffer.from(text, "utf8");
  return buf.length <= 4065 ? text : buf.subarray(0, 4065).toString("utf8");
}

function parseArgs(argv: string[], io: ReplayLogIo): Options {
  const o: Options = {
    limit: 0,
    startEntry: 0,
    stopFlags: 0,
    find: false,
    numEntries: false,
    discard: true,
    verbose: 0,
    help: false,
    startSector: 0,
    endSector: Number.POSITIVE_INFINITY,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--") break;
    if (/^-[^-]/.test(arg)) {
      for (const c of arg.slice(1)) {
        if (c === "v") o.verbose++;
        else if (c === "h") o.help = true;
        else {
          io.err(`udm-replay-log: invalid option -- '${c}'\n`);
          throw new Usage();
        }
      }
      continue;
    }
    if (!arg.startsWith("--")) continue; // getopt_long permutes and the tool ignores non-options
    const eq = arg.indexOf("=");
    const given = arg.slice(2, eq >= 0 ? eq : undefined);
    const names = Object.keys(LONG_OPTIONS);
    const matches = names.includes(given) ? [given] : names.filter((n) => n.startsWith(given));
    if (matches.length !== 1 || given === "") {
      io.err(
        `udm-replay-log: ${matches.length > 1 ? "option" : "unrecognized option"} '--${given}'${matches.length > 1 ? " is ambiguous" : ""}\n`,
      );
      throw new Usage();
    }
    const name = matches[0]!;
    let value: string | undefined;
    if (LONG_OPTIONS[name]) {
      if (eq >= 0) value = arg.slice(eq + 1);
      else if (i + 1 < argv.length) value = argv[++i];
      else {
        io.err(`udm-replay-log: option '--${name}' requires an argument\n`);
        throw new Usage();
      }
    } else if (eq >= 0) {
      io.err(`udm-replay-log: option '--${name}' doesn't allow an argument\n`);
      throw new Usage();
    }
    switch (name) {
      case "next-flush":
        o.stopFlags |= LOG_FLUSH_FLAG;
        break;
      case "next-fua":
        o.stopFlags |= LOG_FUA_FLAG;
        break;
      case "start-entry":
        o.startEntry = parseNumber(value!, io);
        break;
      case "start-mark":
        o.startMark = markArg(value!);
        break;
      case "end-mark":
        o.endMark = markArg(value!);
        o.stopFlags |= LOG_MARK_FLAG;
        break;
      case "log":
        o.log = value!;
        break;
      case "replay":
        o.replay = value!;
        break;
      case "limit":
        o.limit = parseNumber(value!, io);
        break;
      case "verbose":
        o.verbose++;
        break;
      case "find":
        o.find = true;
        break;
      case "num-entries":
        o.numEntries = true;
        break;
      case "no-discard":
        o.discard = false;
        break;
      case "fsck":
        o.fsck = value!;
        break;
      case "check":
        if (value === "flush") o.check = { mode: "flush" };
        else if (value === "fua") o.check = { mode: "fua" };
        else if (value === "discard") o.check = { mode: "discard" };
        else {
          const every = parseNumber(value!, io);
          if (every === 0) {
            io.err("Invalid entry number\n"); // the tool would divide by zero
            throw new Exit(1);
          }
          o.check = { mode: "number", every };
        }
        break;
      case "start-sector":
        o.startSector = parseNumber(value!, io, "sector");
        break;
      case "end-sector":
        o.endSector = parseNumber(value!, io, "sector");
        break;
      case "help":
        o.help = true;
        break;
    }
  }
  return o;
}

function errnoOf(err: unknown): number {
  const code = (err as NodeJS.ErrnoException).code;
  const n = code ? errnoNumber(code) : undefined;
  return n ?? 5; // EIO
}

function defaultSystem(io: ReplayLogIo): (command: string) => number {
  return (command) => {
    const r = spawnSync("/bin/sh", ["-c", command], { encoding: "utf8" });
    if (r.stdout) io.out(r.stdout);
    if (r.stderr) io.err(r.stderr);
    return r.status ?? -1;
  };
}

/** Run replay-log with `argv` (without the program name); resolves with the exit status. */
export async function main(argv: string[], io: ReplayLogIo = processIo()): Promise<number> {
  const opened: BlockDevice[] = [];
  try {
    return await run(argv, io, opened);
  } catch (err) {
    if (err instanceof Usage) {
      io.err(USAGE);
      return 1;
    }
    if (err instanceof Exit) return err.code;
    io.err(`${(err as Error).message}\n`);
    return 1;
  } finally {
    for (const dev of opened) await dev.close().catch(() => {});
  }
}

async function run(argv: string[], io: ReplayLogIo, opened: BlockDevice[]): Promise<number> {
  const o = parseArgs(argv, io);
  if (o.help) {
    io.out(USAGE);
    return 0;
  }
  if (o.log === undefined) throw new Usage();

  let logDev: BlockDevice;
  try {
    logDev = await openBackingDevice(o.log, { mode: "r" });
  } catch (err) {
    io.err(`Couldn't open log ${o.log}: ${errnoOf(err)}\n`);
    return 1;
  }
  opened.push(logDev);
  let replayDev: BlockDevice | undefined;
  if (o.replay !== undefined) {
    try {
      replayDev = await openBackingDevice(o.replay, { mode: "rw" });
    } catch (err) {
      io.err(`Couldn't open replay file ${o.replay}: ${errnoOf(err)}\n`);
      return 1;
    }
    opened.push(replayDev);
  }
  const verbose = (level: number, line: string) => {
    if (o.verbose >= level) io.out(line + "\n");
  };
  const reader = await LogReader.open(deviceLogSource(logDev), { verbose });

  // Position first (so, as in the tool, an empty log fails here even for --num-entries).
  if (o.startMark !== undefined) await reader.seekPastMark(o.startMark);
  else await reader.seekEntry(o.startEntry);

  if ((o.fsck !== undefined) !== (o.check !== undefined)) throw new Usage();

  const stop = (e: LogEntry) => shouldStop(e, o.stopFlags, o.endMark);
  let count = 0;

  if (o.find) {
    for (let e = await reader.next({ verb: "seek entry" }); e; e = await reader.next({ verb: "seek entry" })) {
      count++;
      if ((o.limit && count === o.limit) || stop(e)) {
        io.out(`${e.index}@${reader.block}\n`);
        return 0;
      }
    }
    io.err("Couldn't find entry\n");
    return 1;
  }

  if (o.numEntries) {
    io.out(`${reader.nrEntries}\n`);
    return 0;
  }

  if (!replayDev) {
    io.out(`Log version=${WRITE_LOG_VERSION}, sectorsize=${reader.sectorSize}, entries=${reader.nrEntries}\n`);
    return 0;
  }

  const replayer = new EntryReplayer(replayDev, reader.sectorSize, {
    discard: o.discard,
    verbose,
    startSector: o.startSector,
    endSector: o.endSector,
    zeroDiscards: !fs.statSync(o.replay!).isBlockDevice(),
  });
  const system = io.system ?? defaultSystem(io);
  const runFsck = async (): Promise<boolean> => {
    await syncDevice(replayDev);
    return system(o.fsck!) === 0;
  };
  let failed = false;
  for (let e = await reader.next({ data: true }); e; e = await reader.next({ data: true })) {
    await replayer.apply(e);
    count++;
    if (o.check) {
      const due =
        (o.check.mode === "number" && count % o.check.every === 0) ||
        (o.check.mode === "fua" && shouldStop(e, LOG_FUA_FLAG)) ||
        (o.check.mode === "flush" && shouldStop(e, LOG_FLUSH_FLAG)) ||
        (o.check.mode === "discard" && shouldStop(e, LOG_DISCARD_FLAG));
      if (due && !(await runFsck())) {
        io.err(`Fsck errored out on entry ${e.index}\n`);
        failed = true;
        break;
      }
    }
    if ((o.limit && count === o.limit) || stop(e)) break;
  }
  await syncDevice(replayDev);
  return failed ? 1 : 0;
}

function processIo(): ReplayLogIo {
  return {
    out: (t) => void process.stdout.write(t),
    err: (t) => void process.stderr.write(t),
    system: (command) => spawnSync("/bin/sh", ["-c", command], { stdio: "inherit" }).status ?? -1,
  };
}

function invokedDirectly(): boolean {
  const script = process.argv[1];
  if (!script) return false;
  try {
    return fs.realpathSync(script) === fs.realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (invokedDirectly()) {
  void main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
