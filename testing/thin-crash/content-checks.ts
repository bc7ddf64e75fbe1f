/**
 * The checks of one recovered thin volume: its data sector by sector against the model, and its
 * status line against the mappings the metadata holds.
 */
import { SECTOR_SIZE } from "../../core/bio.js";
import { MISPLACED, decodeSector } from "../crash/model.js";
import type { Problems } from "../crash/report.js";
import { STALE_ID, type ThinPoolModel, type ThinVolume } from "./model.js";

/**
 * After a crash at `crashAt` every sector holds the volume's last durable write (or discard), or
 * a later one submitted by then; where none is durable, also what the volume held when it was
 * created (zeros, or its origin's data at the snapshot).
 */
export function checkVolume(
  model: ThinPoolModel,
  volume: ThinVolume,
  data: Buffer,
  crashAt: number,
  problems: Problems,
): void {
  for (let sector = 0; sector < model.volumeSectors; sector++) {
    const found = decodeSector(data, sector * SECTOR_SIZE, sector);
    const allowed = volume.history.allowedAt(sector, crashAt);
    if (allowed.ids.some((id) => model.matches(found, id))) continue;
    const base = model.baseAt(volume, sector);
    if (allowed.base && model.matches(found, base)) continue;
    const parts = allowed.ids.map((id) => `${model.describe(id)}${allowed.durable?.id === id ? " (durable)" : ""}`);
    if (allowed.base) parts.unshift(`${model.describe(base)} (${volume.base ? "at the snapshot" : "as created"})`);
    problems.add(
      volume.name,
      `${volume.name} sector ${sector} holds ${describeFound(model, data, sector, found)}; ` +
        `allowed: ${parts.join(", ") || "nothing"}`,
    );
  }
}

/** What a sector holds, naming the write and sector a misplaced stamp comes from. */
function describeFound(model: ThinPoolModel, data: Buffer, sector: number, found: number): string {
  if (found !== MISPLACED) return model.describe(found);
  const offset = sector * SECTOR_SIZE;
  const from = data.readUInt32LE(offset + 8);
  const id = decodeSector(data, offset, from);
  if (id === STALE_ID) return `stale data (data device sector ${from}: a block neither zeroed nor written)`;
  return `${model.describe(id)} of sector ${from}`;
}

/** thin's status, "<mapped sectors> <highest mapped sector>", must be what the metadata's mappings make. */
export function checkVolumeStatus(
  model: ThinPoolModel,
  volume: ThinVolume,
  status: string,
  mappings: ReadonlyMap<number, unknown>,
  problems: Problems,
): void {
  const bs = model.blockSize;
  const highest = mappings.size ? Math.max(...mappings.keys()) : -1;
  const want = `${mappings.size * bs} ${highest < 0 ? "-" : (highest + 1) * bs - 1}`;
  if (status !== want) {
    problems.add(
      `${volume.name} status`,
      `${volume.name}: status "${status}", but its mapping tree has ${mappings.size} blocks: "${want}"`,
    );
  }
}
