/**
 * At a mark nothing is in flight, so what was durable then is exactly the log up to the mark:
 * replayLog(--end-mark) onto a fresh device must stop there and give what the incremental replay
 * has (a check of the runner's log mapping against the project's replay tool).
 */
import { SECTOR_SIZE } from "../../core/bio.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { markName } from "../../targets/log-writes/format.js";
import { replayLog } from "../../targets/log-writes/replay.js";
import type { IncrementalReplay } from "./incremental-replay.js";
import { markedWrite, readAll } from "./ram-disks.js";

/** Compare, for every device that logged `mark`, replayLog up to it with the incremental replay (advanced to it). */
export async function crossCheckAtMark(replays: IncrementalReplay[], mark: string): Promise<string[]> {
  const problems: string[] = [];
  for (const replay of replays) {
    const { key, sectors, initial, log } = replay.device;
    if (!replay.entries.some((mapped) => mapped.kind === "mark" && markName(mapped.entry) === mark)) continue;
    const fresh = new MemoryDevice(sectors);
    if (initial) fresh.submit(markedWrite(0, initial));
    const result = await replayLog(log, fresh, { endMark: mark });
    if (result.stoppedBy !== "condition") problems.push(`${key}: replayLog did not find mark ${mark}`);
    const upToMark = replay.entries.slice(0, result.lastEntry + 1);
    if (replay.appliedCount !== upToMark.length || upToMark.some((mapped) => !mapped.applied)) {
      problems.push(
        `${key}: mark ${mark} is log entry ${result.lastEntry}, ` +
          `but the clock makes ${replay.appliedCount} other entries durable then`,
      );
    }
    // They differ only where the log's order is not the device's (see applyEntry).
    const fromLog = await readAll(fresh, sectors);
    const incremental = await readAll(replay.replayed, sectors);
    for (let sector = 0; sector < sectors; sector++) {
      const range = [sector * SECTOR_SIZE, (sector + 1) * SECTOR_SIZE] as const;
      if (!replay.reorderedSectors.has(sector) && !fromLog.subarray(...range).equals(incremental.subarray(...range))) {
        problems.push(`${key}: replayLog to mark ${mark} differs from the incremental replay at sector ${sector}`);
        break;
      }
    }
  }
  return problems;
}
