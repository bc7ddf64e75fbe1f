/**
 * The data checks of a crash point: what each sector of the recovered origin and snapshots may
 * hold after a crash at a given moment, by the model (docs/testing.md, "Crash-consistency runner").
 */
import { SECTOR_SIZE } from "../../core/bio.js";
import type { CowImage } from "../../targets/snapshot/cow-image.js";
import { type DeviceHistory, type SnapshotModel, type TopWrite, decodeSector, describeValue } from "./model.js";
import type { Problems } from "./report.js";

/**
 * The origin after a crash at `crashAt`: every sector the last durable write or a later one
 * submitted by then (the initial data while nothing is durable). While a merge of `merging` ran,
 * a chunk it had recorded holds the snapshot's data instead, unless an origin write made during
 * the merge is there.
 */
export function checkOrigin(
  origin: DeviceHistory,
  data: Buffer,
  crashAt: number,
  problems: Problems,
  merging: SnapshotModel | null,
): void {
  for (let sector = 0; sector < origin.sectors; sector++) {
    const found = decodeSector(data, sector * SECTOR_SIZE, sector);
    if (merging?.recordedAtMerge!.has(Math.floor(sector / merging.chunkSize))) {
      // Merged from the snapshot: what the snapshot held (its own writes, or its point in time),
      // unless a write to the origin device made during the merge is there or durable.
      // (The merged writes themselves were submitted at mergeStartedAt.)
      const duringMerge = origin.allowedAt(sector, crashAt, { after: merging.mergeStartedAt });
      const own = merging.history.allowedAt(sector, crashAt);
      const ok =
        duringMerge.ids.includes(found) ||
        (duringMerge.base && (own.ids.includes(found) || (own.base && found === merging.pointInTime[sector])));
      if (!ok) {
        const pointInTime = own.base ? `${describeValue(merging.pointInTime[sector]!)} (its point in time), ` : "";
        const ownWrites = describeAllowed(own.ids, false, own.durable);
        const allowed = duringMerge.base
          ? `${pointInTime}${ownWrites}` +
            (duringMerge.ids.length ? `, writes during the merge ${describeAllowed(duringMerge.ids, false, null)}` : "")
          : `writes during the merge ${describeAllowed(duringMerge.ids, false, duringMerge.durable)}`;
        const holds = `origin sector ${sector} holds ${describeValue(found)}`;
        problems.add("origin", `${holds} after the merge of ${merging.name}; allowed: ${allowed}`);
      }
      continue;
    }
    const allowed = origin.allowedAt(sector, crashAt);
    if ((found === 0 && allowed.base) || (found >= 0 && allowed.ids.includes(found))) continue;
    const allowedText = describeAllowed(allowed.ids, allowed.base, allowed.durable);
    problems.add("origin", `origin sector ${sector} holds ${describeValue(found)}; allowed: ${allowedText}`);
  }
}

/**
 * A snapshot after a crash at `crashAt`: its own durable writes where it has any; elsewhere, in a
 * chunk its COW image records, exactly its point-in-time data; in a chunk it does not record,
 * only origin data from before the snapshot was taken.
 */
export function checkSnapshot(
  origin: DeviceHistory,
  snapshot: SnapshotModel,
  image: CowImage,
  data: Buffer,
  crashAt: number,
  problems: Problems,
): void {
  const recorded = new Set(image.state === "valid" ? image.records.map((record) => record.oldChunk) : []);
  const idList = (ids: number[]) => ids.map((id) => `#${id}`).join(" ");
  for (let sector = 0; sector < origin.sectors; sector++) {
    const found = decodeSector(data, sector * SECTOR_SIZE, sector);
    const own = snapshot.history.allowedAt(sector, crashAt);
    const pointInTime = snapshot.pointInTime[sector]!;
    const chunk = Math.floor(sector / snapshot.chunkSize);
    let why: (() => string) | null = null;
    if (!own.base) {
      if (!own.ids.includes(found)) why = () => `its own writes ${idList(own.ids)} (#${own.durable!.id} durable)`;
    } else if (recorded.has(chunk)) {
      if (found !== pointInTime && !own.ids.includes(found)) {
        why = () =>
          `chunk ${chunk} is recorded: ${describeValue(pointInTime)} (point in time)` +
          `${own.ids.length ? ` or its own writes ${idList(own.ids)}` : ""}`;
      }
    } else {
      const originBefore = origin.allowedAt(sector, crashAt, { before: snapshot.createdAt });
      if (!((found === 0 && originBefore.base) || (found >= 0 && originBefore.ids.includes(found)))) {
        why = () =>
          `chunk ${chunk} is not recorded: the origin's data from before the snapshot ` +
          `(${describeValue(pointInTime)} or older, if not durable)`;
      }
    }
    if (why) {
      problems.add(snapshot.name, `${snapshot.name} sector ${sector} holds ${describeValue(found)}; allowed: ${why()}`);
    }
  }
}

export function describeAllowed(ids: number[], base: boolean, durable: TopWrite | null): string {
  const parts = ids.map((id) => `#${id}${durable && durable.id === id ? " (durable)" : ""}`);
  if (base) parts.unshift("its previous content (initial data)");
  return parts.join(", ") || "nothing";
}

/** Where two device images first differ, in the model's terms. */
export function firstDifference(got: Buffer, want: Buffer): string {
  for (let sector = 0; sector < got.length / SECTOR_SIZE; sector++) {
    const offset = sector * SECTOR_SIZE;
    if (!got.subarray(offset, offset + SECTOR_SIZE).equals(want.subarray(offset, offset + SECTOR_SIZE))) {
      const gotValue = describeValue(decodeSector(got, offset, sector));
      return `first at sector ${sector}: ${gotValue} instead of ${describeValue(decodeSector(want, offset, sector))}`;
    }
  }
  return "no difference";
}
