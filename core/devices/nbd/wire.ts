/**
 * The client's side of the NBD wire format (NetworkBlockDevice/nbd doc/proto.md): the constants it
 * sends and reads, and the two messages it builds, option requests and transmission requests.
 * Everything on the wire is big-endian.
 *
 * The constants are core/nbd-protocol.ts's, shared with the server; the client-only ones are here.
 */

export {
  ClientFlags,
  Cmd,
  CmdFlags,
  EXTENDED_REPLY_HEADER_LENGTH,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_HEADER_LENGTH,
  GREETING_LENGTH,
  HandshakeFlags,
  IHAVEOPT,
  Info,
  NBDMAGIC,
  NbdErrno,
  OFFSET_DATA_PREFIX,
  Opt,
  OPTION_REPLY_HEADER_LENGTH,
  OPTION_REPLY_MAGIC,
  ReplyFlags,
  ReplyType,
  Rep,
  REQUEST_HEADER_LENGTH,
  REQUEST_MAGIC,
  SIMPLE_REPLY_LENGTH,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_LENGTH,
  STRUCTURED_REPLY_MAGIC,
  TransmissionFlags,
} from "../../nbd-protocol.js";
import {
  Cmd,
  CmdFlags,
  EXTENDED_REQUEST_HEADER_LENGTH,
  EXTENDED_REQUEST_MAGIC,
  IHAVEOPT,
  MAX_PAYLOAD,
  Rep,
  REQUEST_HEADER_LENGTH,
  REQUEST_MAGIC,
} from "../../nbd-protocol.js";

export type CmdType = (typeof Cmd)[keyof typeof Cmd];
/** The oldstyle greeting's second magic (proto.md, "Oldstyle negotiation"), refused with a message. */
export const OLDSTYLE_MAGIC = 0x00420281861253n;
/** Bit 15 of a chunk type marks an error chunk, even a type this client does not know. */
export const REPLY_TYPE_ERROR_BIT = 0x8000;
/**
 * When the server states no maximum block size, a client SHOULD NOT send more than 32 MiB in one
 * request (proto.md, "Block size constraints"): the same 32 MiB the server allows.
 */
export const DEFAULT_MAX_PAYLOAD = MAX_PAYLOAD;

/** An option request: IHAVEOPT, option, length, data. */
export function optionRequest(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(16 + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

/** NBD_OPT_GO's data: the export name and the NBD_INFO_* items asked for. */
export function goData(exportName: string, infos: readonly number[]): Buffer {
  const name = Buffer.from(exportName, "utf8");
  const b = Buffer.allocUnsafe(4 + name.length + 2 + 2 * infos.length);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + name.length);
  infos.forEach((info, i) => b.writeUInt16BE(info, 6 + name.length + 2 * i));
  return b;
}

/**
 * A transmission request header (proto.md, "Request message"). The 64-bit cookie is a number below
 * 2^53, written as two 32-bit halves.
 */
export function requestHeader(type: number, flags: number, cookie: number, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_HEADER_LENGTH);
  writeRequestHeader(b, 0, type, flags, cookie, offset, length);
  return b;
}

/** requestHeader's bytes written into `b` at `at` (request-batch.ts puts a turn's headers in one buffer). */
export function writeRequestHeader(
  b: Buffer,
  at: number,
  type: number,
  flags: number,
  cookie: number,
  offset: number,
  length: number,
): void {
  b.writeUInt32BE(REQUEST_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  writeUint64(b, at + 8, cookie);
  writeUint64(b, at + 16, offset);
  b.writeUInt32BE(length, at + 24);
}

/**
 * An extended request header (NBD_OPT_EXTENDED_HEADERS): the same fields with a 64-bit length. A
 * WRITE's length is its payload's and carries NBD_CMD_FLAG_PAYLOAD_LEN, as the extension requires;
 * for every other command it is the effect length, which may pass 4 GiB (TRIM, WRITE_ZEROES).
 */
export function extendedRequestHeader(
  type: number,
  flags: number,
  cookie: number,
  offset: number,
  length: number,
): Buffer {
  const b = Buffer.allocUnsafe(EXTENDED_REQUEST_HEADER_LENGTH);
  writeExtendedRequestHeader(b, 0, type, flags, cookie, offset, length);
  return b;
}

/** extendedRequestHeader's bytes written into `b` at `at`. */
export function writeExtendedRequestHeader(
  b: Buffer,
  at: number,
  type: number,
  flags: number,
  cookie: number,
  offset: number,
  length: number,
): void {
  b.writeUInt32BE(EXTENDED_REQUEST_MAGIC, at);
  b.writeUInt16BE(type === Cmd.WRITE ? flags | CmdFlags.PAYLOAD_LEN : flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  writeUint64(b, at + 8, cookie);
  writeUint64(b, at + 16, offset);
  writeUint64(b, at + 24, length);
}

/** A number below 2^53 as a 64-bit big-endian field. */
function writeUint64(b: Buffer, at: number, n: number): void {
  b.writeUInt32BE(Math.floor(n / 0x1_0000_0000), at);
  b.writeUInt32BE(n >>> 0, at + 4);
}

/** The cookie at `at` (the inverse of requestHeader's encoding; larger values are never ours). */
export function readCookie(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 0x1_0000_0000 + b.readUInt32BE(at + 4);
}

/** A name for log lines. */
export function cmdName(type: number): string {
  for (const [name, value] of Object.entries(Cmd)) if (value === type) return `NBD_CMD_${name}`;
  return `command ${type}`;
}

/** The message for an option error reply type. */
export function repErrorName(type: number): string {
  for (const [name, value] of Object.entries(Rep)) if (value === type) return `NBD_REP_${name}`;
  return `reply type 0x${type.toString(16)}`;
}
