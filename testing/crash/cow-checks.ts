/** The metadata check of a COW image after a crash: no chunk leaked by the store. */
import { isMetadataChunk, skipMetadata } from "../../targets/snapshot/cow-format.js";
import type { CowImage } from "../../targets/snapshot/cow-image.js";

/**
 * Records in allocation order, next_free = last recorded chunk + 1 (past a metadata chunk), and
 * every data chunk below next_free recorded. Exceptions are committed in the order their chunks
 * were allocated (dm-snap.c: copy_callback, persistent_prepare_exception in
 * dm-snap-persistent.c), and a reload sets next_free past the last record
 * (dm-snap-persistent.c: insert_exceptions), so anything else loses or reuses a chunk.
 */
export function leakProblems(image: CowImage): string[] {
  if (image.state !== "valid") return image.state === "new" ? [] : [`COW image is ${image.state}`];
  const problems: string[] = [];
  const exceptionsPerArea = image.exceptionsPerArea;
  const records = image.records;
  for (let i = 1; i < records.length; i++) {
    const previous = records[i - 1]!;
    const record = records[i]!;
    if (record.newChunk <= previous.newChunk) {
      const where = `area ${record.area} slot ${record.slot}`;
      problems.push(
        `records out of allocation order: ${where} has chunk ${record.newChunk} after ${previous.newChunk}`,
      );
    }
  }
  const lastChunk = records.length > 0 ? records[records.length - 1]!.newChunk : 1;
  const expectedNext = skipMetadata(exceptionsPerArea, lastChunk + 1);
  if (image.nextFree !== expectedNext) {
    problems.push(`next_free is ${image.nextFree}, the last recorded chunk + 1 is ${expectedNext}`);
  }
  const used = new Set(records.map((record) => record.newChunk));
  for (let chunk = 2; chunk < image.nextFree; chunk++) {
    if (!isMetadataChunk(exceptionsPerArea, chunk) && !used.has(chunk)) {
      problems.push(`chunk ${chunk} lies below next_free (${image.nextFree}) but no record points at it (leaked)`);
      if (problems.length > 6) break;
    }
  }
  return problems;
}
