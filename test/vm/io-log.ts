/**
 * What reached udm, read from a log-writes log (targets/log-writes/format.ts): one record per log
 * entry with a digest of its data, decoded on the host or, for a udmd running in the guest, by
 * Node in the guest (the same fields, as JSON), and the checks both VM tests make on it.
 */
import crypto from "node:crypto";
import { expect } from "vitest";
import {
  LOG_FLUSH_FLAG,
  LOG_FUA_FLAG,
  type LogEntry,
  flagsToString,
  markName,
} from "../../targets/log-writes/format.js";

export interface LoggedIo {
  index: number;
  flags: number;
  sector: number;
  nrSectors: number;
  mark?: string;
  /** sha256 of the entry's data (writes). */
  sha256?: string;
}

export const sha256 = (b: Buffer): string => crypto.createHash("sha256").update(b).digest("hex");

export function loggedIo(entries: readonly LogEntry[]): LoggedIo[] {
  return entries.map((e) => ({
    index: e.index,
    flags: e.flags,
    sector: e.sector,
    nrSectors: e.nrSectors,
    mark: markName(e),
    sha256: e.data && sha256(e.data),
  }));
}

/**
 * A shell command that prints the log `logFile` as the JSON of LoggedIo[], with the built
 * format module of the checkout at `checkout` (the guest has Node but no TypeScript loader).
 */
export function loggedIoCommand(node: string, checkout: string, logFile: string): string {
  const js = [
    'import fs from "node:fs";',
    'import crypto from "node:crypto";',
    `import { decodeLog, markName } from "${checkout}/dist/targets/log-writes/format.js";`,
    "const { entries } = decodeLog(fs.readFileSync(process.argv[1]));",
    "console.log(JSON.stringify(entries.map((e) => ({ index: e.index, flags: e.flags, sector: e.sector,",
    '  nrSectors: e.nrSectors, mark: markName(e), sha256: e.data && crypto.createHash("sha256").update(e.data).digest("hex") }))));',
  ].join(" ");
  return `${node} --input-type=module -e '${js}' ${logFile}`;
}

export function describeIo(list: readonly LoggedIo[]): string {
  return list.map((e) => `${e.index} ${flagsToString(e.flags)} ${e.sector}+${e.nrSectors}`).join("\n");
}

const flagged = (list: readonly LoggedIo[], flag: number) => list.filter((e) => e.flags & flag).length;

/**
 * The checks both paths must pass, on a log of: mkfs, mount, a file written with fsync, then a
 * one-block O_DIRECT|O_DSYNC write at `fua`, then a one-block buffered write + fsync at `plain`.
 * Returns the entries from the FUA write on, for the report.
 */
export function expectFuaAndFlush(
  log: readonly LoggedIo[],
  fua: { sector: number; data: Buffer },
  plain: { sector: number; data: Buffer },
): LoggedIo[] {
  const fuaAt = log.findIndex((e) => e.sector === fua.sector && e.nrSectors > 0);
  expect(fuaAt, `no write at sector ${fua.sector}:\n${describeIo(log.slice(-20))}`).toBeGreaterThanOrEqual(0);
  const fuaWrite = log[fuaAt]!;

  // ext4's journal commits (REQ_PREFLUSH | REQ_FUA) before it arrived as flushes and FUA writes.
  const before = log.slice(0, fuaAt);
  expect(flagged(before, LOG_FUA_FLAG), describeIo(before)).toBeGreaterThan(0);
  expect(flagged(before, LOG_FLUSH_FLAG), describeIo(before)).toBeGreaterThan(0);

  // The O_DSYNC direct write: one write with FUA and its data, then a flush (the kernel's fsync
  // of the range after an O_DSYNC write to a block device).
  const after = log.slice(fuaAt);
  expect(flagsToString(fuaWrite.flags), describeIo(after)).toBe("FUA");
  expect(fuaWrite.nrSectors).toBe(fua.data.length / 512);
  expect(fuaWrite.sha256).toBe(sha256(fua.data));
  expect(flushAfter(after, 0), `no flush after the FUA write:\n${describeIo(after)}`).toBe(true);

  // The buffered write + fsync: a plain write with its data, then a flush. log-writes logs a
  // plain write once a flush mapped after it completes: the writes waiting, then that flush.
  const plainAt = after.findIndex((e) => e.sector === plain.sector && e.nrSectors > 0);
  expect(plainAt, describeIo(after)).toBeGreaterThan(0);
  const plainWrite = after[plainAt]!;
  expect(flagsToString(plainWrite.flags), describeIo(after)).toBe("NONE");
  expect(plainWrite.sha256).toBe(sha256(plain.data));
  expect(flushAfter(after, plainAt), `no flush after the plain write:\n${describeIo(after)}`).toBe(true);
  return after;
}

/** Whether the entries after `list[at]`, past any plain writes logged with it, go on with a flush. */
function flushAfter(list: readonly LoggedIo[], at: number): boolean {
  let i = at + 1;
  while (i < list.length && list[i]!.flags === 0) i++;
  return i < list.length && (list[i]!.flags & LOG_FLUSH_FLAG) !== 0;
}
