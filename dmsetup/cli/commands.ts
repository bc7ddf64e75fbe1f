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
import type { RemoteDeviceInfo } from "../control/remote-devices.js";
import { formatConcise, parseConcise } from "./concise.js";
import { ExecCommandError, execOnDevice, execWords } from "./exec.js";
import { formatDeps } from "./format/deps.js";
import { formatInfoLong } from "./format/info.js";
import { formatLs } from "./format/ls.js";
import { formatInfoColumns } from "./format/report.js";
import { formatTableLines, formatTargets, formatVersion } from "./format/table.js";
import { toJson } from "./format/text.js";
import { formatTree } from "./format/tree.js";
import { mangleDecision } from "./mangle.js";
import { ManglingError, sentName } from "./name-mangling.js";
import { applyNodeOwner, hasNodeOwner } from "./node-owner.js";
import { type CliOptions, UsageError } from "./options.js";
import type { Selection } from "./select.js";
import { filterSelected, forEachSelected, graphOf, type ListEntry } from "./selected-devices.js";
import { checkChildrenNotSuspended, SuspendCheckError } from "./suspend-checks.js";
import { DevicePathError } from "./device-path.js";

export interface Io {
  out(text: string): void;
  err(text: string): void;
  readStdin(): Promise<string>;
  /** stdout is a terminal: `merge` draws a progress bar instead of printing lines. */
  tty?: boolean;
  /** The locale's codeset is UTF-8: dmsetup then draws `ls --tree` with UTF-8 glyphs, else ASCII. */
  utf8?: boolean;
}

type Info = DeviceInfo & { nbdUri?: string; attached?: string; remote?: RemoteDeviceInfo[] };
type Dep = { major: number; minor: number; name?: string } | { path: string };

/** A failed command: the messages are already printed. `errno`: the failure's, when there is one. */
export class CommandFailed extends Error {
  constructor(
    message: string,
    readonly errno: string | null = null,
  ) {
    super(message);
  }
}

export class Commands {
  constructor(
    private readonly client: Pick<ControlClient, "request">,
    private readonly opts: CliOptions,
    private readonly io: Io,
    /** -S, parsed (null for "" and "all", which select every device). */
    private readonly selection: Selection | null = null,
  ) {}

  /** -S was given: the command runs on the devices that pass it, as dmsetup runs it. */
  private get selecting(): boolean {
    return this.opts.select !== undefined;
  }

  /** Run `run` on the selected devices among `args` (selected-devices.ts). */
  private forSelected(args: string[], run: (name: string) => Promise<void>): Promise<void> {
    return forEachSelected(
      {
        client: this.client,
        selection: this.selection,
        noOpenCount: this.opts.noopencount,
        out: (t) => this.io.out(t),
        err: (t) => this.io.err(t),
        failure: (message) => new CommandFailed(message),
      },
      args,
      run,
    );
  }

  /** Issue one request; on failure print libdevmapper's line for `ioctlName` and fail. */
  private async call<O extends Op>(ioctlName: string, name: string, op: O, args: RequestMap[O]): Promise<unknown> {
    try {
      return await this.client.request(op, args);
    } catch (err) {
      throw this.failed(ioctlName, name, err);
    }
  }

  /**
   * Print the kernel's reason and libdevmapper's ioctl failure line (naming the device as it was
   * sent, mangled); return the error to throw. A name libdm could not (un)mangle has its own words.
   */
  private failed(ioctlName: string, name: string, err: unknown): CommandFailed {
    if (err instanceof CommandFailed) return err;
    if (err instanceof ManglingError || err instanceof DevicePathError) {
      this.io.err(`${err.message}\n`);
      return new CommandFailed(err.message, "EINVAL");
    }
    const errno = err instanceof DmError ? err.errno : "EIO";
    const reason = (err as Error).message;
    if (reason && reason !== strerror(errno)) this.io.err(`${reason}\n`);
    let sent = name;
    try {
      sent = sentName(name, this.opts.mangling);
    } catch {
      // the request never left: ManglingError above
    }
    this.io.err(`device-mapper: ${ioctlName} ioctl on ${sent} ${this.opts.uuid ?? ""} failed: ${strerror(errno)}\n`);
    return new CommandFailed(reason, errno);
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
    let info: Info;
    try {
      info = (await this.client.request("create", { name, uuid, readOnly, table })) as Info;
    } catch (err) {
      const step = (err as { step?: CreateStep }).step;
      throw this.failed(step === "load" ? "reload" : (step ?? "create"), name, err);
    }
    // udmd attached it (--auto-attach): -U/-G/-M are for its node.
    if (info.attached !== undefined) this.ownNode(info.attached);
  }

  /** -U/-G/-M on the kernel device of an attached device (node-owner.ts). */
  private ownNode(path: string): void {
    if (!hasNodeOwner(this.opts)) return;
    try {
      applyNodeOwner(path, this.opts);
    } catch (err) {
      this.io.err(`${(err as Error).message}\n`);
      throw new CommandFailed((err as Error).message);
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
    const clearOne = async (name: string) => void (await this.call("clear", name, "clear", { name }));
    if (this.selecting) return this.forSelected(args, clearOne);
    for (const name of args) await clearOne(name);
  }

  async suspend(args: string[]): Promise<void> {
    const suspendOne = async (name: string) => {
      if (this.opts.checks) {
        try {
          await checkChildrenNotSuspended(this.client, name);
        } catch (err) {
          if (!(err instanceof SuspendCheckError)) throw this.failed("deps", name, err);
          this.io.err(`${err.message}\n`);
          throw new CommandFailed(err.message);
        }
      }
      await this.call("suspend", name, "suspend", { name, noflush: this.opts.noflush });
    };
    if (this.selecting) return this.forSelected(args, suspendOne);
    for (const name of args) await suspendOne(name);
    if (this.opts.verbose) await this.info(args);
  }

  async resume(args: string[]): Promise<void> {
    const resumeOne = async (name: string) =>
      void (await this.call("resume", name, "resume", { name, noflush: this.opts.noflush }));
    if (this.selecting) return this.forSelected(args, resumeOne);
    for (const name of args) await resumeOne(name);
    if (this.opts.verbose) await this.info(args);
  }

  async remove(args: string[]): Promise<void> {
    if (this.selecting) return this.forSelected(args, (name) => this.removeOne(name));
    if (args.length === 0) throw new UsageError("remove: device name required");
    for (const name of args) await this.removeOne(name);
  }

  private async removeOne(name: string): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      try {
        await this.client.request("remove", { name, force: this.opts.force, deferred: this.opts.deferred });
        return;
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
    const all = (await this.call("names", "", "list", {})) as ListEntry[];
    const target = this.opts.target;
    let list = target === undefined ? all : ((await this.call("names", "", "list", { target })) as ListEntry[]);
    // dmsetup ignores -S on ls; udm lists only what passes it (not with --tree: a tree is drawn whole).
    if (this.selecting && !this.opts.tree) list = await this.selectEntries(list, all);
    if (this.opts.json) return this.io.out(toJson(list));
    if (this.opts.exec !== undefined) return this.lsExec(list, all.length === 0);
    if (this.opts.tree) {
      return this.io.out(
        formatTree(
          list.map((d) => ({ name: d.name, major: d.major, minor: d.minor, deps: d.deps })),
          { options: this.opts.options ?? "", charset: this.io.utf8 ? "utf" : "ascii" },
        ),
      );
    }
    if (list.length === 0 && all.length > 0) return; // devices, none selected
    this.io.out(formatLs(list, { target: target !== undefined, blkdevname: this.opts.options === "blkdevname" }));
  }

  /** The entries of `list` whose devices pass -S; `all` is every device, for the relationship fields. */
  private async selectEntries(list: ListEntry[], all: readonly ListEntry[]): Promise<ListEntry[]> {
    const infos = await Promise.all(
      list.map((d) => this.call("info", d.name, "info", { name: d.name }) as Promise<Info>),
    );
    const kept = new Set(filterSelected(infos, all, this.selection, this.opts.noopencount).map((i) => i.name));
    return list.filter((d) => kept.has(d.name));
  }

  /**
   * `ls --exec CMD` (exec.ts), as dmsetup runs it through its status loop: with -v each device's
   * `NAME\t(MAJ, MIN)` line first; the command on each device in turn.
   */
  private lsExec(list: readonly ListEntry[], noDevices: boolean): void {
    if (noDevices) return this.io.out("No devices found\n");
    if (list.length === 0) return;
    let words: string[];
    try {
      words = execWords(this.opts.exec!);
    } catch (err) {
      if (!(err instanceof ExecCommandError)) throw err;
      if (err.message) this.io.err(`${err.message}\n`);
      throw new CommandFailed(err.message);
    }
    for (const d of list) {
      if (this.opts.verbose) this.io.out(`${d.name}\t(${d.major}, ${d.minor})\n`);
      execOnDevice(words, sentName(d.name, this.opts.mangling));
    }
  }

  async info(args: string[]): Promise<void> {
    const names = await this.names(args);
    // --json: an empty list, which a script can read as such (dmsetup's line is for people).
    if (names.length === 0) return this.io.out(this.opts.json ? toJson([]) : "No devices found\n");
    let infos: Info[] = [];
    for (const name of names) {
      const info = await this.infoOrMissing(name);
      if (!info) {
        if (this.opts.columns) continue;
        this.io.err("Device does not exist.\n");
        throw new CommandFailed("no device", "ENXIO");
      }
      infos.push(info);
    }
    // The relationship fields and the selection need every device and what it uses.
    const all = (await this.call("names", "", "list", {})) as ListEntry[];
    if (this.opts.columns) {
      return this.io.out(
        formatInfoColumns(infos, {
          fields: this.opts.options?.split(","),
          noHeadings: this.opts.noheadings,
          separator: this.opts.separator,
          sort: this.opts.sort?.split(","),
          nameprefixes: this.opts.nameprefixes,
          rows: this.opts.rows,
          noOpenCount: this.opts.noopencount,
          graph: graphOf(all),
          selection: this.selection ?? undefined,
        }),
      );
    }
    // dmsetup ignores -S here; udm shows only what passes it.
    if (this.selecting) infos = filterSelected(infos, all, this.selection, this.opts.noopencount) as Info[];
    if (this.opts.json) {
      // udm's extras beside dmsetup's: the geometry `setgeometry` set (what HDIO_GETGEO would say).
      const withGeometry = [];
      for (const info of infos)
        withGeometry.push({ ...info, geometry: await this.call("info", info.name, "geometry", { name: info.name }) });
      return this.io.out(toJson(args.length === 1 && !this.selecting ? withGeometry[0] : withGeometry));
    }
    // dmsetup's lines, then each remote device's (format/info.ts); the NBD URI, the attached kernel
    // device and the geometry are in --json only.
    for (const info of infos) this.io.out(formatInfoLong(info, { noOpenCount: this.opts.noopencount }));
  }

  async tableOrStatus(kind: "table" | "status", args: string[]): Promise<void> {
    if (kind === "table" && this.opts.concise) return this.concise(args);
    const all: Record<string, TableLine[]> = {};
    const one = async (name: string, prefixed: boolean) => {
      if (this.opts.verbose) await this.info([name]);
      const lines = (await this.call(kind, name, kind, {
        name,
        inactive: this.opts.inactive,
        ...(kind === "status" ? { noflush: this.opts.noflush } : {}),
      })) as TableLine[];
      all[name] = this.opts.target ? lines.filter((l) => l.type === this.opts.target) : lines;
      if (!this.opts.json)
        this.io.out(formatTableLines(lines, prefixed ? name : undefined, { target: this.opts.target }));
    };
    if (this.selecting) {
      // dmsetup runs the command on each selected device as one of several: names are prefixed.
      await this.forSelected(args, (name) => one(name, true));
      if (this.opts.json) this.io.out(toJson(all));
      return;
    }
    const names = await this.names(args);
    if (names.length === 0) return this.io.out("No devices found\n");
    for (const name of names) {
      if (!(await this.infoOrMissing(name))) {
        this.io.err("Device does not exist.\n");
        throw new CommandFailed("no device", "ENXIO");
      }
      await one(name, names.length !== 1 || args.length !== 1);
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
    if (this.selecting) return this.forSelected(args, (name) => this.depsOne(name, true));
    const names = await this.names(args);
    if (names.length === 0) return this.io.out("No devices found\n");
    for (const name of names) await this.depsOne(name, names.length !== 1);
  }

  private async depsOne(name: string, prefixed: boolean): Promise<void> {
    let deps: Dep[];
    try {
      deps = (await this.client.request("deps", { name, inactive: this.opts.inactive })) as Dep[];
    } catch (err) {
      if (err instanceof DmError && err.errno === "ENXIO") return this.io.out("Device does not exist.\n");
      throw err;
    }
    const format = (this.opts.options ?? "devno") as "devno" | "blkdevname" | "devname";
    this.io.out(this.opts.json ? toJson(deps) : formatDeps(deps, { prefix: prefixed ? name : undefined, format }));
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
    const wipeOne = async (name: string) => {
      const info = (await this.call("info", name, "info", { name })) as Info;
      const table = [{ start: 0, length: info.sizeSectors, type: "error", params: "" }];
      await this.call("reload", name, "load", { name, table });
      await this.call("resume", name, "resume", { name, noflush: this.opts.noflush });
    };
    if (this.selecting) return this.forSelected(args, wipeOne);
    if (args.length === 0) throw new UsageError("wipe_table: device name required");
    for (const name of args) await wipeOne(name);
  }

  /**
   * `mangle [NAME...]` (mangle.ts). The client given for this command sends and reads names as
   * they are (dmsetup sets mangling to none for it), so every name the daemon holds is reachable.
   */
  async mangle(args: string[]): Promise<void> {
    const target = this.opts.manglename ?? "auto";
    const mangleOne = async (name: string) => {
      let info: Info;
      try {
        info = (await this.client.request("info", { name })) as Info;
      } catch (err) {
        // dmsetup asks with a status ioctl, which reports a missing device without a message.
        if (err instanceof DmError && err.errno === "ENXIO") throw new CommandFailed("no device", "ENXIO");
        throw this.failed("status", name, err);
      }
      let decision;
      try {
        decision = mangleDecision(name, info.uuid, target);
      } catch (err) {
        throw this.failed("status", name, err);
      }
      this.io.out(`${decision.message}\n`);
      if (decision.rename) await this.call("rename", name, "rename", { name, newName: decision.newName });
    };
    if (args.length > 0) {
      for (const name of args) await mangleOne(name);
      return;
    }
    const list = (await this.call("names", "", "list", {})) as ListEntry[];
    if (list.length === 0) return this.io.out("No devices found\n");
    let failure: unknown;
    for (const { name } of list) await mangleOne(name).catch((err: unknown) => (failure ??= err));
    if (failure !== undefined) throw failure;
  }

  /** `target-version TARGET...`: from the list `targets` prints, so the two always agree. */
  async targetVersion(args: string[]): Promise<void> {
    const list = (await this.call("versions", "", "targets", {})) as { name: string; version: number[] }[];
    for (const name of args) {
      const target = list.find((t) => t.name === name);
      // DM_GET_TARGET_VERSION of an unknown type: EINVAL, and the kernel says nothing more.
      if (!target) throw this.failed("target-version", name, new DmError("EINVAL", strerror("EINVAL")));
      this.io.out(formatTargets([target]));
    }
  }

  /** `setgeometry NAME CYL HEAD SECT START`: the daemon checks the values as the kernel does. */
  async setGeometry(args: string[]): Promise<void> {
    const [name, ...values] = args as [string, ...string[]];
    await this.call("setgeometry", name, "setgeometry", { name, geometry: values.join(" ") });
  }

  async version(): Promise<void> {
    const v = (await this.call("version", "", "version", {})) as { driver: string; library: string };
    this.io.out(formatVersion(v.library, v.driver));
  }

  async attach(args: string[]): Promise<void> {
    const [name] = args;
    if (!name) throw new UsageError("attach: device name required");
    const { path } = (await this.call("attach", name, "attach", { name })) as { path: string };
    this.ownNode(path);
    this.io.out(`${path}\n`);
  }

  async detach(args: string[]): Promise<void> {
    for (const name of args) await this.call("detach", name, "detach", { name, force: this.opts.force });
  }
}
