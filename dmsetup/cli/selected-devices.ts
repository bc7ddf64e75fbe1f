/**
 * `-S` on the commands dmsetup runs device by device (remove, suspend, resume, clear, wipe_table,
 * deps, status, table): dmsetup turns the command into `info -c` over its arguments (every device
 * when there are none) with the selection, and runs the command on each device that passes
 * (dmsetup.c main and _display_info_cols). udm also filters `ls` and the long `info` with it.
 */
import type { DeviceInfo } from "../../core/device-mapper.js";
import { DmError } from "../../core/errors.js";
import type { ControlClient } from "../control/client.js";
import type { DepRef, GraphDevice } from "./format/dep-tree.js";
import { fieldContexts, selects } from "./format/report.js";
import type { Selection } from "./select.js";

type Requester = Pick<ControlClient, "request">;

/** A device as the `list` request reports it. */
export interface ListEntry {
  name: string;
  uuid: string;
  major: number;
  minor: number;
  deps: DepRef[];
}

/** The dependency graph the relationship fields need, from a `list` answer. */
export function graphOf(list: readonly ListEntry[]): GraphDevice[] {
  return list.map((d) => ({ name: d.name, uuid: d.uuid, major: d.major, minor: d.minor, deps: d.deps }));
}

/** Whether each device passes the selection (all of them without one), in order. */
export function filterSelected(
  infos: readonly DeviceInfo[],
  list: readonly ListEntry[],
  selection: Selection | null,
  noOpenCount: boolean,
): DeviceInfo[] {
  if (!selection) return [...infos];
  const contexts = fieldContexts(infos, { graph: graphOf(list), noOpenCount });
  return contexts.filter((c) => selects(selection, c)).map((c) => c.info);
}

export interface SelectedRun {
  client: Requester;
  selection: Selection | null;
  noOpenCount: boolean;
  /** Where "No devices found" goes (stdout) and "Device does not exist." (stderr). */
  out(text: string): void;
  err(text: string): void;
  /** A failure whose messages are printed: the command goes on with the next device. */
  failure(message: string): Error;
}

/**
 * Run `run` on each device of `args` (every device, in name order, when empty) that passes the
 * selection. With arguments the first failure ends the command, as dmsetup's argument loop does;
 * over every device, the others still run and the command fails at the end (_process_all).
 */
export async function forEachSelected(
  ctx: SelectedRun,
  args: readonly string[],
  run: (name: string) => Promise<void>,
): Promise<void> {
  const list = (await ctx.client.request("list", {})) as ListEntry[];
  if (args.length === 0 && list.length === 0) return ctx.out("No devices found\n");
  let failure: unknown;
  for (const name of args.length > 0 ? args : list.map((d) => d.name)) {
    try {
      let info: DeviceInfo;
      try {
        info = (await ctx.client.request("info", { name })) as DeviceInfo;
      } catch (err) {
        if (!(err instanceof DmError && err.errno === "ENXIO")) throw err;
        ctx.err("Device does not exist.\n");
        throw ctx.failure("Device does not exist.");
      }
      if (filterSelected([info], list, ctx.selection, ctx.noOpenCount).length > 0) await run(info.name);
    } catch (err) {
      if (args.length > 0) throw err;
      failure ??= err;
    }
  }
  if (failure !== undefined) throw failure;
}
