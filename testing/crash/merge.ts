/** Merges in the crash runner: whether the workload merges at all, and waiting for a merge to end. */
import { Bio, submitAndWait } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { MemoryLogger } from "../../core/logger.js";
import { createDeviceMapper } from "../../index.js";
import { firstDifference } from "./content-checks.js";
import { NamedDevices } from "./devices.js";
import { writeData } from "./model.js";
import { cowSectorsFor, markedWrite, readAll } from "./ram-disks.js";

export interface MergeDecision {
  enabled: boolean;
  /** For the report: "on", or why not. */
  note: string;
}

/**
 * Merges are part of the workload when asked for (`true`: required, an error if impossible), or
 * with "auto" when the registry of `dm` lists snapshot-merge and the self-test passes.
 */
export async function decideMerges(dm: DeviceMapper, wanted: boolean | "auto" | undefined): Promise<MergeDecision> {
  if (wanted === false) return { enabled: false, note: "merges off" };
  if (!dm.targets().some((target) => target.name === "snapshot-merge")) {
    if (wanted === true) throw new Error("merges requested, but snapshot-merge is not registered");
    return { enabled: false, note: "snapshot-merge is not registered: no merges" };
  }
  const failure = await mergeSelfTest();
  if (failure) {
    const note = `snapshot-merge does not work (${failure}): no merges`;
    if (wanted === true) throw new Error(`merges requested, but ${note}`);
    return { enabled: false, note };
  }
  return { enabled: true, note: "on" };
}

/**
 * Wait until the snapshot-merge table of `name` has merged everything (its usage shows nothing
 * but metadata, as Documentation/admin-guide/device-mapper/snapshot.rst says to check); returns
 * why not, or null.
 */
export async function waitForMerge(dm: DeviceMapper, name: string, timeoutMs: number): Promise<string | null> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const eventNr = dm.info(name).eventNr;
    const status = dm.status(name)[0]?.params ?? "";
    const usage = /^(\d+)\/\d+ (\d+)$/.exec(status);
    if (usage && usage[1] === usage[2]) return null;
    if (!usage) return `status "${status}"`;
    const left = deadline - performance.now();
    if (left <= 0) return `not finished after ${timeoutMs} ms (status "${status}")`;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      dm.waitEvent(name, eventNr),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, Math.min(left, 50)))),
    ]);
    clearTimeout(timer);
  }
}

/**
 * Does snapshot-merge work at all? A snapshot with copied and written chunks, merged into a small
 * origin, must leave the origin equal to the snapshot. Returns why not, or null.
 */
async function mergeSelfTest(): Promise<string | null> {
  const backing = new NamedDevices();
  const dm = createDeviceMapper({ backing, logger: new MemoryLogger(false) });
  try {
    const size = 256;
    const origin = backing.add("o", new MemoryDevice(size));
    backing.add("c", new MemoryDevice(cowSectorsFor(8, size)));
    origin.submit(markedWrite(0, writeData(1, 0, size)));
    await dm.create("base", { table: `0 ${size} snapshot-origin o` });
    await dm.suspend("base");
    await dm.create("snap", { table: `0 ${size} snapshot o c P 8` });
    await dm.resume("base");
    await submitAndWait(dm.device("base"), new Bio("write", 16, 40, writeData(2, 16, 40), 0, null));
    await submitAndWait(dm.device("snap"), new Bio("write", 100, 20, writeData(3, 100, 20), 0, null));
    const want = await readAll(dm.device("snap"), size);
    await dm.load("base", `0 ${size} snapshot-merge o c P 8`);
    await dm.suspend("snap");
    await dm.resume("base");
    const failure = await waitForMerge(dm, "base", 5000);
    if (failure) return failure;
    await dm.load("base", `0 ${size} snapshot-origin o`);
    await dm.resume("base");
    await dm.remove("snap");
    const got = await readAll(origin, size);
    return got.equals(want) ? null : `the merged origin differs from the snapshot (${firstDifference(got, want)})`;
  } catch (err) {
    return (err as Error).message;
  } finally {
    await dm.close().catch(() => undefined);
  }
}
