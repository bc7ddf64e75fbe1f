/**
 * NBD wire constants and the typed messages the parser produces (NetworkBlockDevice/nbd
 * doc/proto.md). Everything on the wire is big-endian. Only what udm's server speaks is here:
 * fixed newstyle handshake, NBD_OPT_GO/INFO, STARTTLS, structured replies; no block status, no
 * extended headers (those options are answered with NBD_REP_ERR_UNSUP).
 */

// The wire constants, shared with udm's NBD client.
export * from "../core/nbd-protocol.js";
import { Cmd, Opt } from "../core/nbd-protocol.js";

// ---- messages produced by the parser (client → server) ----

/** The 32-bit client flags that open the handshake. */
export interface ClientFlagsMessage {
  kind: "clientFlags";
  flags: number;
}

/** NBD_OPT_EXPORT_NAME: the name is the whole option payload. */
export interface ExportNameMessage {
  kind: "exportName";
  name: string;
}

/** NBD_OPT_INFO or NBD_OPT_GO: an export name and the NBD_INFO_* items asked for. */
export interface InfoMessage {
  kind: "info";
  option: typeof Opt.INFO | typeof Opt.GO;
  name: string;
  requests: number[];
}

/** Any other option, with its raw payload (the server decides what the payload may be). */
export interface RawOptionMessage {
  kind: "option";
  option: number;
  data: Buffer;
}

/**
 * An option whose framing was fine but whose payload was malformed (bad name length, NUL in a
 * name...): the stream is still in sync, so the server answers NBD_REP_ERR_INVALID and goes on.
 */
export interface InvalidOptionMessage {
  kind: "invalidOption";
  option: number;
  reason: string;
}

/** An option longer than MAX_OPTION_LENGTH: its payload was skipped without being buffered. */
export interface OversizeOptionMessage {
  kind: "oversizeOption";
  option: number;
  length: number;
}

export type HandshakeMessage =
  | ClientFlagsMessage
  | ExportNameMessage
  | InfoMessage
  | RawOptionMessage
  | InvalidOptionMessage
  | OversizeOptionMessage;

/** One transmission-phase request. */
export interface NbdRequest {
  kind: "request";
  flags: number;
  type: number;
  /** Opaque 64-bit cookie echoed in the reply. */
  handle: bigint;
  /**
   * Byte offset. Exact up to 2^53; beyond that, sector-aligned offsets are still exact (up to
   * 2^62, past the end of any export) and unaligned ones are +Infinity (parser.ts), so an offset
   * that was rounded is only ever answered with an error.
   */
  offset: number;
  length: number;
  /** NBD_CMD_WRITE payload (exactly `length` bytes); null for other commands. */
  data: Buffer | null;
  /**
   * True when a WRITE was longer than the payload limit: its payload was read and thrown away so
   * the stream stays in sync, and the server answers EINVAL.
   */
  payloadDropped: boolean;
}

/** The client broke the framing (bad magic, unknown client flags...): the connection must close. */
export class NbdProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "NbdProtocolError";
  }
}

/** Names for log lines. */
export function optionName(option: number): string {
  for (const [name, value] of Object.entries(Opt)) if (value === option) return `NBD_OPT_${name}`;
  return `option ${option}`;
}

export function commandName(type: number): string {
  for (const [name, value] of Object.entries(Cmd)) if (value === type) return `NBD_CMD_${name}`;
  return `command ${type}`;
}
