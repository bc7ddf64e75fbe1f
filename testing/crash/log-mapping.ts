/**
 * From a log-writes log and the recorded completions on its data device to log entries with clock
 * stamps: when each entry completed and when it became durable. The runner rebuilds the sequence
 * log-writes must have logged (dm-log-writes.c: log_writes_map, normal_end_io, log_mark,
 * log_writes_dtr) and requires the log to be exactly that.
 */
import {
  END_MARK,
  LOG_FLUSH_FLAG,
  LOG_FUA_FLAG,
  LOG_MARK_FLAG,
  type LogEntry,
  markName,
} from "../../targets/log-writes/format.js";
import { LogReader, deviceLogSource } from "../../targets/log-writes/replay.js";
import type { Completion } from "./devices.js";
import type { LoggedDevice } from "./logged-devices.js";

export type EntryKind = "flush" | "fua" | "plain" | "mark";

export interface MappedEntry {
  entry: LogEntry;
  kind: EntryKind;
  /** Completion stamp (plain writes) or the stamp of the entry itself. */
  completedAt: number;
  /**
   * When it became durable: its own stamp (flush, FUA, mark); for a plain write, the completion
   * of the first flush submitted after it completed (Infinity: none).
   */
  durableAt: number;
  /** Applied to the incremental replay. */
  applied: boolean;
}

export interface MappedLog {
  entries: MappedEntry[];
  /** Plain writes made durable by an earlier flush than the one log-writes gave them to. */
  earlierDurable: number;
  /** Sectors where the log has an older write after a newer one (see applyEntry in incremental-replay.ts). */
  reorderedSectors: Set<number>;
}

/** Read `device`'s log and map every entry to its stamps; throws when the log is not what the recorded I/O makes. */
export async function readMappedLog(device: LoggedDevice): Promise<MappedLog> {
  const reader = await LogReader.open(deviceLogSource(device.log));
  const logEntries: LogEntry[] = [];
  for await (const entry of reader.entries({ data: true })) logEntries.push(entry);
  const entries = mapEntries(device, logEntries);
  const earlierDurable = moveToFirstDurableFlush(device, entries);
  return { entries, earlierDurable, reorderedSectors: reorderedSectors(device.sectors, entries) };
}

/**
 * Give every log entry its stamps, by replaying what log-writes does with the recorded
 * completions: a flush takes the plain writes completed so far when it is mapped (= submitted
 * to the data device) and logs them, then itself, when it completes; a FUA write is logged when
 * it completes, a mark when it is sent; at teardown the writes still unflushed and the end mark.
 * The log must be exactly that sequence.
 */
function mapEntries(device: LoggedDevice, logEntries: LogEntry[]): MappedEntry[] {
  type Event = { at: number; run: () => void };
  type Expected = {
    kind: EntryKind;
    completedAt: number;
    durableAt: number;
    sector: number;
    sectors: number;
    mark?: string;
  };
  const events: Event[] = [];
  const expected: Expected[] = [];
  let unflushed: Completion[] = [];
  const takenByFlush = new Map<Completion, Completion[]>();
  for (const completion of device.recorder.completions) {
    const { at, sector, sectors } = completion;
    if (completion.kind === "flush") {
      events.push({ at: completion.submitted, run: () => (takenByFlush.set(completion, unflushed), (unflushed = [])) });
      events.push({
        at,
        run: () => {
          for (const write of takenByFlush.get(completion)!) {
            expected.push({
              kind: "plain",
              completedAt: write.at,
              durableAt: at,
              sector: write.sector,
              sectors: write.sectors,
            });
          }
          expected.push({ kind: "flush", completedAt: at, durableAt: at, sector: 0, sectors: 0 });
        },
      });
    } else if (completion.kind === "fua") {
      events.push({ at, run: () => expected.push({ kind: "fua", completedAt: at, durableAt: at, sector, sectors }) });
    } else {
      events.push({ at, run: () => unflushed.push(completion) });
    }
  }
  for (const mark of device.marks) {
    const at = mark.at;
    events.push({
      at,
      run: () =>
        expected.push({ kind: "mark", completedAt: at, durableAt: at, sector: 0, sectors: 0, mark: mark.name }),
    });
  }
  events.sort((a, b) => a.at - b.at);
  for (const event of events) event.run();
  for (const write of unflushed) {
    expected.push({
      kind: "plain",
      completedAt: write.at,
      durableAt: Infinity,
      sector: write.sector,
      sectors: write.sectors,
    });
  }
  expected.push({ kind: "mark", completedAt: Infinity, durableAt: Infinity, sector: 0, sectors: 0, mark: END_MARK });

  if (logEntries.length !== expected.length) {
    throw new Error(
      `${device.key}: the log has ${logEntries.length} entries, the recorded I/O makes ${expected.length}`,
    );
  }
  return logEntries.map((entry, i) => {
    const want = expected[i]!;
    const kind = kindOf(entry);
    const same =
      kind === want.kind &&
      (kind === "mark"
        ? markName(entry) === want.mark
        : kind === "flush" || (entry.sector === want.sector && entry.nrSectors === want.sectors));
    if (!same) {
      const found = kind === "mark" ? markName(entry) : `${entry.sector}+${entry.nrSectors}`;
      const wanted = want.kind === "mark" ? want.mark : `${want.sector}+${want.sectors}`;
      throw new Error(
        `${device.key}: log entry ${i} is ${kind} ${found}, the recorded I/O makes it ${want.kind} ${wanted}`,
      );
    }
    return { entry, kind, completedAt: want.completedAt, durableAt: want.durableAt, applied: false };
  });
}

function kindOf(entry: LogEntry): EntryKind {
  if (entry.flags & LOG_MARK_FLAG) return "mark";
  if (entry.flags & LOG_FLUSH_FLAG) return "flush";
  return entry.flags & LOG_FUA_FLAG ? "fua" : "plain";
}

/**
 * log-writes gives a plain write to the first flush mapped after it completed, but any flush
 * submitted after that makes it durable: with flushes completing out of order, a later one can
 * finish first, and replaying the log up to it would miss writes it covered. Moves each plain
 * write's durableAt to the first such completion; returns how many moved.
 */
function moveToFirstDurableFlush(device: LoggedDevice, entries: MappedEntry[]): number {
  const flushes = device.recorder.completions
    .filter((completion) => completion.kind === "flush")
    .sort((a, b) => a.submitted - b.submitted);
  // firstDone[i]: the earliest completion among the flushes submitted i-th or later.
  const firstDone = new Array<number>(flushes.length + 1).fill(Infinity);
  for (let i = flushes.length - 1; i >= 0; i--) firstDone[i] = Math.min(firstDone[i + 1]!, flushes[i]!.at);
  let moved = 0;
  for (const mapped of entries) {
    if (mapped.kind !== "plain") continue;
    let low = 0;
    let high = flushes.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (flushes[middle]!.submitted > mapped.completedAt) high = middle;
      else low = middle + 1;
    }
    const durableAt = firstDone[low]!;
    if (durableAt < mapped.durableAt) moved++;
    mapped.durableAt = durableAt;
  }
  return moved;
}

/** Sectors where the log has an older write after a newer one (see applyEntry in incremental-replay.ts). */
function reorderedSectors(sectors: number, entries: MappedEntry[]): Set<number> {
  const reordered = new Set<number>();
  const newest = new Float64Array(sectors);
  for (const mapped of entries) {
    if (mapped.kind !== "plain" && mapped.kind !== "fua") continue;
    for (let sector = mapped.entry.sector; sector < mapped.entry.sector + mapped.entry.nrSectors; sector++) {
      if (mapped.completedAt < newest[sector]!) reordered.add(sector);
      else newest[sector] = mapped.completedAt;
    }
  }
  return reordered;
}
