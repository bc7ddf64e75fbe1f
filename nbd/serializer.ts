/**
 * Builders for what the server sends: the greeting, option replies, the NBD_OPT_EXPORT_NAME
 * reply, simple replies and structured reply chunks. Each returns one Buffer ready for
 * `socket.write`, except the READ reply helpers, which write a header in place at the front of a
 * buffer the device reads straight into (so a read's data is never copied).
 */
import {
  Info,
  IHAVEOPT,
  NBDMAGIC,
  OFFSET_DATA_PREFIX,
  OPTION_REPLY_HEADER_LENGTH,
  OPTION_REPLY_MAGIC,
  Rep,
  ReplyFlags,
  ReplyType,
  SIMPLE_REPLY_LENGTH,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_LENGTH,
  STRUCTURED_REPLY_MAGIC,
} from "./protocol.js";

/** NBDMAGIC, IHAVEOPT, handshake flags. */
export function greeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

// ---- option replies ----

/** Generic option reply: magic, option, reply type, length, payload. */
export function optionReply(option: number, type: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_LENGTH + payload.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(payload.length, 16);
  payload.copy(b, OPTION_REPLY_HEADER_LENGTH);
  return b;
}

export function repAck(option: number): Buffer {
  return optionReply(option, Rep.ACK);
}

/** NBD_REP_SERVER for NBD_OPT_LIST: name length, name, optional human-readable details. */
export function repServer(option: number, name: string, description = ""): Buffer {
  const nameBytes = Buffer.from(name, "utf8");
  const desc = Buffer.from(description, "utf8");
  const payload = Buffer.allocUnsafe(4 + nameBytes.length + desc.length);
  payload.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(payload, 4);
  desc.copy(payload, 4 + nameBytes.length);
  return optionReply(option, Rep.SERVER, payload);
}

/** NBD_REP_INFO / NBD_INFO_EXPORT: size in bytes and transmission flags. */
export function repInfoExport(option: number, sizeBytes: number, transmissionFlags: number): Buffer {
  const payload = Buffer.allocUnsafe(12);
  payload.writeUInt16BE(Info.EXPORT, 0);
  payload.writeBigUInt64BE(BigInt(sizeBytes), 2);
  payload.writeUInt16BE(transmissionFlags, 10);
  return optionReply(option, Rep.INFO, payload);
}

/** NBD_REP_INFO / NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum block size. */
export function repInfoBlockSize(option: number, minimum: number, preferred: number, maximum: number): Buffer {
  const payload = Buffer.allocUnsafe(14);
  payload.writeUInt16BE(Info.BLOCK_SIZE, 0);
  payload.writeUInt32BE(minimum, 2);
  payload.writeUInt32BE(preferred, 6);
  payload.writeUInt32BE(maximum, 10);
  return optionReply(option, Rep.INFO, payload);
}

/** NBD_REP_INFO / NBD_INFO_NAME (or DESCRIPTION): a 16-bit type and a string. */
export function repInfoString(
  option: number,
  infoType: typeof Info.NAME | typeof Info.DESCRIPTION,
  text: string,
): Buffer {
  const bytes = Buffer.from(text, "utf8");
  const payload = Buffer.allocUnsafe(2 + bytes.length);
  payload.writeUInt16BE(infoType, 0);
  bytes.copy(payload, 2);
  return optionReply(option, Rep.INFO, payload);
}

/** An error reply (ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ...) with a message for humans. */
export function repError(option: number, type: number, message = ""): Buffer {
  return optionReply(option, type, Buffer.from(message, "utf8"));
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeroes unless NO_ZEROES. */
export function exportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(sizeBytes), 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

// ---- transmission replies ----

/** A simple reply with no payload (any command without data, or an error). */
export function simpleReply(handle: bigint, error: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_LENGTH);
  writeSimpleReplyHeader(b, handle, error);
  return b;
}

/** Write a simple reply header at the start of `target` (the READ data follows it). */
export function writeSimpleReplyHeader(target: Buffer, handle: bigint, error: number): void {
  target.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  target.writeUInt32BE(error, 4);
  target.writeBigUInt64BE(handle, 8);
}

/** Bytes in front of a READ's data: simple reply header, or structured header plus offset. */
export function readReplyPrefix(structured: boolean): number {
  return structured ? STRUCTURED_REPLY_HEADER_LENGTH + OFFSET_DATA_PREFIX : SIMPLE_REPLY_LENGTH;
}

/**
 * Write, at the start of `target`, a final NBD_REPLY_TYPE_OFFSET_DATA chunk header for
 * `dataLength` bytes at `offset`. The chunk carries the DONE flag: the data is complete before
 * anything is sent, so no error can follow it and a separate NONE chunk would be wasted bytes.
 */
export function writeOffsetDataHeader(target: Buffer, handle: bigint, offset: number, dataLength: number): void {
  writeChunkHeader(target, ReplyFlags.DONE, ReplyType.OFFSET_DATA, handle, OFFSET_DATA_PREFIX + dataLength);
  target.writeBigUInt64BE(BigInt(offset), STRUCTURED_REPLY_HEADER_LENGTH);
}

/** NBD_REPLY_TYPE_NONE with DONE: success with nothing to say (e.g. a zero-length READ). */
export function structuredNone(handle: bigint): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH);
  writeChunkHeader(b, ReplyFlags.DONE, ReplyType.NONE, handle, 0);
  return b;
}

/** Final NBD_REPLY_TYPE_ERROR chunk: error value and a message for humans (≤ 4096 bytes). */
export function structuredError(handle: bigint, error: number, message = ""): Buffer {
  const text = Buffer.from(message, "utf8").subarray(0, 4096);
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH + 6 + text.length);
  writeChunkHeader(b, ReplyFlags.DONE, ReplyType.ERROR, handle, 6 + text.length);
  b.writeUInt32BE(error, STRUCTURED_REPLY_HEADER_LENGTH);
  b.writeUInt16BE(text.length, STRUCTURED_REPLY_HEADER_LENGTH + 4);
  text.copy(b, STRUCTURED_REPLY_HEADER_LENGTH + 6);
  return b;
}

function writeChunkHeader(b: Buffer, flags: number, type: number, handle: bigint, length: number): void {
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeUInt32BE(length, 16);
}
