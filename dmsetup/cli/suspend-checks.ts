/**
 * `--checks` (dm_task_enable_checks): the one check libdm makes is on suspend
 * (_check_children_not_suspended_v4): suspending a device that uses an already-suspended mapped
 * device, at any depth, could trap I/O between the two, so it is refused before the suspend.
 */
import type { DeviceInfo } from "../../core/device-mapper.js";
import type { ControlClient } from "../control/client.js";
import type { DepRef } from "./format/dep-tree.js";

/** libdm's words, an "Internal error"; the suspend is not done. */
export class SuspendCheckError extends Error {}

type Requester = Pick<ControlClient, "request">;

/**
 * Walk what `name` uses, mapped devices only. The message names the device whose dependency is
 * suspended as libdm does: the top one by name (with no space before "that", as in libdm), a
 * deeper one by its numbers.
 */
export async function checkChildrenNotSuspended(client: Requester, name: string): Promise<void> {
  const walk = async (device: string, label: string): Promise<void> => {
    for (const dep of (await client.request("deps", { name: device })) as DepRef[]) {
      if ("path" in dep || dep.name === undefined) continue;
      const info = (await client.request("info", { name: dep.name })) as DeviceInfo;
      const devno = `${dep.major}:${dep.minor}`;
      if (info.suspended)
        throw new SuspendCheckError(
          `Internal error: Attempt to suspend device ${label}that uses already-suspended device (${devno})`,
        );
      await walk(dep.name, `(${devno}) `);
    }
  };
  await walk(name, name);
}
