/**
 * udmsetup's commands: each turns dmsetup arguments into control requests and prints dmsetup's
 * output. Failures print what libdevmapper prints (`device-mapper: <op> ioctl on <name>  failed:
 * <strerror>`), preceded by the kernel's reason, and exit 1 after `Command failed.`.
 */
import fs from "node:fs";
import type { DeviceInfo, TableLine } from "../../core/device-mapper.js";
import { DmError, strerror } from "../../core/errors.js";
import { parseTableText, type TargetSpec } from "../../core/table-text.js";
import type { ControlClient } from "../control/client.js";
import type { CreateStep, Op, RequestMap } from "../control/protocol.js";
import { formatConcise, parseConcise } from "./concise.js";
import { formatDeps } from "./format/deps.js";
import { formatInfoLong } from "./format/info.js";
import { formatLs } from "./format/ls.js";
import { formatInfoColumns } from "./format/report.js";
import { formatTableLines, formatTargets, formatVersion } from "./format/table.js";
import { toJson } from "./format/text.js";
import { formatTree } from "./format/tree.js";
import { type CliOptions, UsageError } from "./options.js";

export interface Io {
  out(text: string): void;
  err(text: string): void;
  readStdin(): Promise<string>;
  /** stdout is a terminal: `merge` draws a progress bar instead of printing lines. */
  tty?: boolean;
  /** The locale's codeset is UTF-8: dmsetup then draws `ls --tree` with UTF-8 glyphs, else ASCII. */
  utf8?: boolean;
}

type Info = DeviceInfo & { nbdUri?: string; attached?: string };
type Dep = { major: number; minor: number; name?: string } | { path: string };
interface ListEntry {
  name: string;
  uuid: string;
  major: number;
  minor: number;
  deps: Dep[];
}

/** A failed command: the messages are already printed. */
export class CommandFailed extends Error {}

export class Commands {
  constructor(
    private readonly client: ControlClient,
    private readonly opts: CliOptions,
    private readonly io: Io,
  ) {}

  /** Issue one request; on failure print libdevmapper's line for `ioctlName` and fail. */
  private async call<O extends Op>(ioctlName: string, name: string, op: O, args: RequestMap[O]): Promise<unknown> {
    try {
      return await this.client.request(op, args);
    } catch (err) {
      throw this.failed(ioctlName, name, err);
    }
  }

  /** Print the kernel's reason and libdevmapper's ioctl failure line; return the error to throw. */
  private failed(ioctlName: string, name: string, err: unknown): CommandFailed {
    const errno = err instanceof DmError ? err.errno : "EIO";
    const reason = (err as Error).message;
    if (reason && reason !== strerror(errno)) this.io.err(`${reason}\n`);
    this.io.err(`device-mapper: ${ioctlName} ioctl on ${name} ${this.opts.uuid ?? ""} failed: ${strerror(errno)}\n`);
    return new CommandFailed(reason);
  }

  /** Names to operate on: the arguments, or every device (name order) when there are none. */
  private async names(args: string[]): Promise<string[]> {
    if (args.length > 0) return args;
    return ((await this.client.request("list", {})) as ListEntry[]).map((d) => d.name);
  }

  /** info/table/status on a missing device: `Device does not exist.` and failure. */
  private async infoOrMissing(name: string): Promise<Info | null> {
    try {
      return (await this.client.request("info", { name, inactive: this.opts.inactive })) as Info;
    } catch (err) {
      if (err instanceof DmError && err.errno === "ENXIO") return null;
      throw err;
    }
  }

  private async readTable(file: string | undefined): Promise<TargetSpec[]> {
    if (this.opts.table !== undefined) return parseTableText(this.opts.table, "on command line");
    if (file !== undefined) {
      let text: string;
      try {
        text = fs.readFileSync(file, "utf8");
      } catch (err) {
        this.io.err(`Couldn't open '${file}' for reading\n`);
        throw new CommandFailed((err as Error).message);
      }
      return parseTableText(text, file);
    }
    return parseTableText(await this.io.readStdin(), "on stdin");
  }

  async create(args: string[]): Promise<void> {
    if (this.opts.concise) {
      for (const dev of parseConcise(args.join(" ") || (await this.io.readStdin()))) {
        await this.createOne(dev.name, dev.uuid || undefined, dev.readOnly, dev.table);
      }
      return;
    }
    const [name, file] = args;
    if (!name) throw new UsageError("create: device name required");
    const table = this.opts.notable ? undefined : await this.readTable(file);
    await this.createOne(name, this.opts.uuid, this.opts.readonly, table);
    if (this.opts.verbose) await this.info([name]);
  }

  /**
   * DM_DEV_CREATE, DM_TABLE_LOAD, resume in one request: the daemon removes the device again if
   * the load or the resume fails. The failure is reported under the ioctl dmsetup would name.
   */
  private async createOne(
    name: string,
    uuid: string | undefined,
    readOnly: boolean,
    table: TargetSpec[] | undefined,
  ): Promise<void> {
    try {
      await this.client.request("create", { name, uuid, readOnly, table });
    } catch (err) {
      const step = (err as { step?: CreateStep }).step;
      throw this.failed(step === "load" ? "reload" : (step ?? "create"), name, err);
    }
  }

  async load(args: string[]): Promise<void> {
    if (this.opts.notable) {
      this.io.err("--notable only available when creating new device.\n");
      throw new CommandFailed("notable");
    }
    const [name, file] = args;
    if (!name) throw new UsageError("load: device name required");
    await this.call("reload", name, "load", { name, table: await this.readTable(file), readOnly: this.opts.readonly });
  }

  async clear(args: string[]): Promise<void> {
    for (const name of args) await this.call("clear", name, "clear", { name });
  }

  async suspend(args: string[]): Promise<void> {
    for (const name of args) await this.call("suspend", name, "suspend", { name, noflush: this.opts.noflush });
    if (this.opts.verbose) await this.info(args);
  }

  async resume(args: string[]): Promise<void> {
    for (const name of args) await this.call("resume", name, "resume", { name, noflush: this.opts.noflush });
    if (this.opts.verbose) await this.info(args);
  }

  async remove(args: string[]): Promise<void> {
    if (args.length === 0) throw new UsageError("remove: device name required");
    for (const name of args) {
      for (let attempt = 0; ; attempt++) {
        try {
          await this.client.request("remove", { name, force: this.opts.force, deferred: this.opts.deferred });
          break;
        } catch (err) {
          // --retry: libdevmapper retries EBUSY 25 times, 200 ms apart.
          if (this.opts.retry && err instanceof DmError && err.errno === "EBUSY" && attempt < 25) {
            await new Promise((r) => setTimeout(r, 200));
            continue;
          }
          throw this.failed("remove", name, err);
        }
      }
    }
  }

  async removeAll(): Promise<void> {
    const { left } = (await this.call("remove_all", "", "remove-all", { force: this.opts.force })) as { left: number };
    if (left > 0) {
      this.io.err(`Unable to remove ${left} device(s).\n`);
      throw new CommandFailed("remove_all");
    }
  }

  async rename(args: string[]): Promise<void> {
    const [name, newName] = args;
    if (!name) throw new UsageError("rename: device name required");
    if (this.opts.setuuid !== undefined) {
      await this.call("rename", name, "rename", { name, newUuid: this.opts.setuuid });
    } else {
      if (!newName) throw new UsageError("rename: new name required");
      await this.call("rename", name, "rename", { name, newName });
    }
  }

  async ls(): Promise<void> {
    const list = (await this.call("names", "", "list", { target: this.opts.target })) as ListEntry[];
    if (this.opts.json) return this.io.out(toJson(list));
    if (this.opts.tree) {
      return this.io.out(
        formatTree(
          list.map((d) => ({ name: d.name, major: d.major, minor: d.minor, deps: d.deps })),
          { options: this.opts.options ?? "", charset: this.io.utf8 ? "utf" : "ascii" },
        ),
      );
    }
    this.io.out(
      formatLs(list, { target: this.opts.target !== undefined, blkdevname: this.opts.options === "blkdevname" }),
    );
  }

  async info(args: string[]): Promise<void> {
    const names = await this.names(args);
    if (names.length === 0) return this.io.out("No devices found\n");
    const infos: Info[] = [];
    for (const name of names) {
      const info = await this.infoOrMissing(name);
      if (!info) {
        if (this.opts.columns) continue;
        this.io.err("Device does not exist.\n");
        throw new CommandFailed("no device");
      }
      infos.push(info);
    }
    if (this.opts.json) return this.io.out(toJson(args.length === 1 ? infos[0] : infos));
    if (this.opts.columns) {
      return this.io.out(
        formatInfoColumns(infos, {
          fields: this.opts.options?.split(","),
          noHeadings: this.opts.noheadings,
          separator: this.opts.separator,
          sort: this.opts.sort?.split(","),
          nameprefixes: this.opts.nameprefixes,
          rows: this.opts.rows,
        }),
      );
    }
    // Exactly dmsetup's lines: udm's extras (the NBD URI, the attached kernel device) are in --json.
    for (const info of infos) this.io.out(formatInfoLong(info, { noOpenCount: this.opts.noopencount }));
  }

  async tableOrStatus(kind: "table" | "status", args: string[]): Promise<void> {
    if (kind === "table" && this.opts.concise) return this.concise(args);
    const names = await this.names(args);
    if (names.length === 0) return this.io.out("No devices found\n");
    const all: Record<string, TableLine[]> = {};
    for (const name of names) {
      if (!(await this.infoOrMissing(name))) {
        this.io.err("Device does not exist.\n");
        throw new CommandFailed("no device");
      }
      if (this.opts.verbose) await this.info([name]);
      const lines = (await this.call(kind, name, kind, {
        name,
        inactive: this.opts.inactive,
        ...(kind === "status" ? { noflush: this.opts.noflush } : {}),
      })) as TableLine[];
      all[name] = this.opts.target ? lines.filter((l) => l.type === this.opts.target) : lines;
      if (!this.opts.json) {
        this.io.out(
          formatTableLines(lines, names.length !== 1 || args.length !== 1 ? name : undefined, {
            target: this.opts.target,
          }),
        );
      }
    }
    if (this.opts.json) this.io.out(toJson(args.length === 1 ? all[args[0]!] : all));
  }

  private async concise(args: string[]): Promise<void> {
    const names = await this.names(args);
    const devices = [];
    for (const name of names) {
      const info = (await this.call("info", name, "info", { name })) as Info;
      const table = (await this.call("table", name, "table", { name })) as TableLine[];
      devices.push({ name, uuid: info.uuid, minor: info.minor, readOnly: info.readOnly, table });
    }
    this.io.out(formatConcise(devices));
  }

  async message(args: string[]): Promise<void> {
    const [name, sectorText, ...words] = args;
    if (!name || sectorText === undefined || words.length === 0)
      throw new UsageError("message: NAME SECTOR MESSAGE required");
    if (!/^\d+$/.test(sectorText)) {
      this.io.err("Invalid sector.\n");
      throw new CommandFailed("sector");
    }
    const { output } = (await this.call("message", name, "message", {
      name,
      sector: Number(sectorText),
      message: words.join(" "),
    })) as { output: string | null };
    if (output) this.io.out(output.endsWith("\n") ? output : `${output}\n`);
  }

  async targets(): Promise<void> {
    const list = (await this.call("versions", "", "targets", {})) as { name: string; version: number[] }[];
    this.io.out(this.opts.json ? toJson(list) : formatTargets(list));
  }

  async deps(args: string[]): Promise<void> {
    const names = await this.names(args);
    if (names.length === 0) return this.io.out("No devices found\n");
    for (const name of names) {
      let deps: Dep[];
      try {
        deps = (await this.client.request("deps", { name, inactive: this.opts.inactive })) as Dep[];
      } catch (err) {
        if (err instanceof DmError && err.errno === "ENXIO") {
          this.io.out("Device does not exist.\n");
          continue;
        }
        throw err;
      }
      const format = (this.opts.options ?? "devno") as "devno" | "blkdevname" | "devname";
      this.io.out(
        this.opts.json ? toJson(deps) : formatDeps(deps, { prefix: names.length !== 1 ? name : undefined, format }),
      );
    }
  }

  async wait(args: string[]): Promise<void> {
    const [name, eventText] = args;
    if (!name) throw new UsageError("wait: device name required");
    const eventNr = eventText === undefined ? 0 : Number(eventText);
    if (!Number.isSafeInteger(eventNr) || eventNr < 0)
      throw new UsageError(`wait: invalid event number '${eventText}'`);
    await this.call("waitevent", name, "wait", { name, eventNr });
    if (this.opts.verbose) await this.info([name]);
  }

  /**
   * `merge ORIGIN SNAPSHOT` (udm extra): what `lvconvert --merge` does with an active origin. Load
   * `snapshot-merge` (the snapshot's own arguments) on ORIGIN, suspend SNAPSHOT, resume ORIGIN (the
   * merge takes over the snapshot's store and starts), remove the old snapshot device, follow the
   * merge through ORIGIN's status (allocated counts down to metadata) and events, then reload
   * ORIGIN as `snapshot-origin` and print its table.
   */
  async merge(args: string[]): Promise<void> {
    const [origin, snapshot] = args;
    if (!origin || !snapshot || args.length > 2)
      throw new UsageError("merge: ORIGIN and SNAPSHOT device names required");
    const fail = (message: string): CommandFailed => {
      this.io.err(`${message}\n`);
      return new CommandFailed(message);
    };
    const originLines = (await this.call("table", origin, "table", { name: origin })) as TableLine[];
    const snapLines = (await this.call("table", snapshot, "table", { name: snapshot })) as TableLine[];
    const o = originLines[0];
    const sn = snapLines[0];
    if (originLines.length !== 1 || o!.type !== "snapshot-origin")
      throw fail(`${origin}: not a snapshot-origin device`);
    if (snapLines.length !== 1 || sn!.type !== "snapshot") throw fail(`${snapshot}: not a snapshot device`);
    const [realDev, , store, chunkText] = sn!.params.split(/\s+/);
    if (realDev !== o!.params.trim() || sn!.length !== o!.length)
      throw fail(`${snapshot} is not a snapshot of ${origin}`);
    if (!store?.toUpperCase().startsWith("P"))
      throw fail(`${snapshot}: only persistent snapshots (P, PO) can be merged`);
    const snapStatus = ((await this.call("status", snapshot, "status", { name: snapshot })) as TableLine[])[0]!.params;
    if (snapStatus === "Invalid") throw fail(`Unable to merge invalidated snapshot ${snapshot}.`);
    const chunk = Number(chunkText) || 1;
    /** Records not merged yet, from a status line: (allocated − metadata) / chunk size. */
    const recordsLeft = (params: string): number | null => {
      const m = /^(\d+)\/\d+ (\d+)$/.exec(params);
      return m ? Math.max(0, (Number(m[1]) - Number(m[2])) / chunk) : null;
    };

    // Hand over and start: load, suspend the snapshot (the handover source), resume the origin.
    await this.call("reload", origin, "load", {
      name: origin,
      table: [{ start: 0, length: o!.length, type: "snapshot-merge", params: sn!.params }],
    });
    let eventNr: number;
    try {
      eventNr = ((await this.call("info", origin, "info", { name: origin })) as Info).eventNr;
      await this.call("suspend", snapshot, "suspend", { name: snapshot });
    } catch (err) {
      await this.client.request("clear", { name: origin }).catch(() => undefined);
      throw err;
    }
    try {
      await this.call("resume", origin, "resume", { name: origin });
    } catch (err) {
      // The merge table may be live but suspended: put the origin back as it was.
      await this.client.request("load", { name: origin, table: [o!] }).catch(() => undefined);
      await this.client.request("resume", { name: origin }).catch(() => undefined);
      await this.client.request("resume", { name: snapshot }).catch(() => undefined);
      throw err;
    }
    // The old snapshot device gave its store away and fails all I/O: remove it, as LVM does.
    await this.client.request("remove", { name: snapshot }).catch((err: unknown) => {
      this.io.err(
        `${snapshot}: not removed (${(err as Error).message}); it fails all I/O now, remove it once it is closed\n`,
      );
    });

    // Follow the merge: status after every event, and at least every so often for the progress.
    const status = async () =>
      ((await this.call("status", origin, "status", { name: origin })) as TableLine[])[0]!.params;
    let waiter: Promise<unknown> | null = null;
    const nextEvent = () => {
      waiter ??= this.client.request("wait", { name: origin, eventNr }).then(
        (r) => {
          eventNr = (r as { info: Info }).info.eventNr;
          waiter = null;
        },
        () => undefined,
      );
      return waiter;
    };
    const interval = this.io.tty ? 100 : 1000;
    let total = recordsLeft(snapStatus) ?? -1;
    let shown = "";
    const show = (left: number) => {
      const done = total > 0 ? (total - left) / total : 1;
      const pct = Math.floor(done * 100);
      if (this.io.tty) {
        const width = 30;
        const filled = Math.round(done * width);
        this.io.out(
          `\r${origin}: merging [${"#".repeat(filled)}${"-".repeat(width - filled)}] ${String(pct).padStart(3)}% (${total - left}/${total} chunks)`,
        );
        return;
      }
      const line = `${origin}: ${pct}% merged (${left} of ${total} chunks left)`;
      if (line !== shown) this.io.out(`${line}\n`);
      shown = line;
    };
    const startEvent = eventNr;
    for (let first = true; ; first = false) {
      const s = await status();
      const left = recordsLeft(s);
      if (s === "Overflow") {
        // A PO snapshot that overflowed keeps saying so: no numbers to follow, only the merge's
        // event (any failure would show as `Merge failed` instead).
        if (first && !this.io.tty)
          this.io.out(`${origin}: merging ${snapshot} (status Overflow: no progress to show)\n`);
        if (eventNr !== startEvent) break;
        await nextEvent();
        continue;
      }
      if (left === null) {
        if (this.io.tty && !first) this.io.out("\n");
        throw fail(
          `${origin}: merge of ${snapshot} stopped: status '${s}' (see the daemon's log); ${origin} keeps its snapshot-merge table`,
        );
      }
      if (first) {
        if (total < left) total = left;
        if (!this.io.tty) this.io.out(`${origin}: merging ${snapshot} (${total} chunks)\n`);
      }
      show(left);
      if (left === 0) break;
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([nextEvent(), new Promise<void>((resolve) => (timer = setTimeout(resolve, interval)))]);
      clearTimeout(timer);
    }
    if (this.io.tty) this.io.out(total >= 0 ? "\n" : "");
    else this.io.out(`${origin}: merge complete\n`);

    // Back to a plain origin, and show it.
    await this.call("reload", origin, "load", { name: origin, table: [o!] });
    await this.call("resume", origin, "resume", { name: origin });
    this.io.out(formatTableLines((await this.call("table", origin, "table", { name: origin })) as TableLine[]));
  }

  /** dmsetup.c _error_device: load one `error` target over the device's size, then resume. */
  async wipeTable(args: string[]): Promise<void> {
    if (args.length === 0) throw new UsageError("wipe_table: device name required");
    for (const name of args) {
      const info = (await this.call("info", name, "info", { name })) as Info;
      const table = [{ start: 0, length: info.sizeSectors, type: "error", params: "" }];
      await this.call("reload", name, "load", { name, table });
      await this.call("resume", name, "resume", { name, noflush: this.opts.noflush });
    }
  }

  async version(): Promise<void> {
    const v = (await this.call("version", "", "version", {})) as { driver: string; library: string };
    this.io.out(formatVersion(v.library, v.driver));
  }

  async attach(args: string[]): Promise<void> {
    const [name] = args;
    if (!name) throw new UsageError("attach: device name required");
    const { path } = (await this.call("attach", name, "attach", { name })) as { path: string };
    this.io.out(`${path}\n`);
  }

  async detach(args: string[]): Promise<void> {
    for (const name of args) await this.call("detach", name, "detach", { name, force: this.opts.force });
  }
}
