/** `dmsetup info` (the long form). */
import type { DeviceInfo } from "../../../core/device-mapper.js";
import type { RemoteDeviceInfo } from "../../control/remote-devices.js";

/** The kernel's default read-ahead for a new block device, in sectors. */
export const DEFAULT_READ_AHEAD = 256;

export interface InfoLongOptions {
  noOpenCount?: boolean;
  /** Sectors; null omits the line (libdm could not read it). Default 256. */
  readAhead?: number | null;
}

/** `dmsetup info`: one block per device, labels padded to column 19, always a blank line after. */
export function formatInfoLong(
  info: DeviceInfo & { deferredRemove?: boolean; remote?: readonly RemoteDeviceInfo[] },
  opts: InfoLongOptions = {},
): string {
  const readAhead = opts.readAhead === undefined ? DEFAULT_READ_AHEAD : opts.readAhead;
  const tables = [info.livePresent && "LIVE", info.inactivePresent && "INACTIVE"].filter(Boolean).join(" & ");
  let s = `Name:              ${info.name}\n`;
  s += `State:             ${info.suspended ? "SUSPENDED" : "ACTIVE"}`;
  s += `${info.readOnly ? " (READ-ONLY)" : ""}${info.deferredRemove ? " (DEFERRED REMOVE)" : ""}\n`;
  if (readAhead !== null) s += `Read Ahead:        ${readAhead}\n`;
  s += `Tables present:    ${tables || "None"}\n`;
  if (!opts.noOpenCount) s += `Open count:        ${info.openCount}\n`;
  s += `Event number:      ${info.eventNr}\n`;
  s += `Major, minor:      ${info.major}, ${info.minor}\n`;
  // The kernel's target_count: the live table's (0 without one), or the inactive one's with
  // --inactive; DeviceInfo.targetCount already is that. libdm reports -1 for "unknown".
  if (info.targetCount >= 0) s += `Number of targets: ${info.targetCount}\n`;
  // Not aligned with the other labels: dmsetup prints "UUID: %s".
  if (info.uuid) s += `UUID: ${info.uuid}\n`;
  for (const r of info.remote ?? []) s += formatRemote(r);
  return `${s}\n`;
}

const REPLIES: Record<RemoteDeviceInfo["replies"], string> = {
  extended: "extended headers",
  structured: "structured replies",
  simple: "simple replies",
};

/**
 * udm's lines for each remote device the table uses (dmsetup has none: a kernel table names block
 * devices), after dmsetup's, so scripts reading those are not disturbed; a table without remote
 * devices prints exactly dmsetup's block.
 */
function formatRemote(r: RemoteDeviceInfo): string {
  const plural = (n: number, what: string) => `${n} ${what}${n === 1 ? "" : "s"}`;
  const detail = [`${r.connected} of ${plural(r.connections, "connection")} up`, REPLIES[r.replies]];
  if (r.attempt > 0) detail.unshift(`attempt ${r.attempt}`);
  let s = `Remote device:     ${r.uri}\n`;
  s += `Remote server:     ${r.server}\n`;
  s += `Remote state:      ${r.state} (${detail.join(", ")})\n`;
  s += `Remote I/O:        ${r.inFlight} in flight, ${r.queued} queued, ${r.unflushedBytes} bytes unflushed, `;
  s += `${plural(r.reconnects, "reconnect")}\n`;
  if (r.lastError) s += `Remote last error: ${r.lastError}\n`;
  return s;
}
