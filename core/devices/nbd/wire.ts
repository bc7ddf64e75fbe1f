/**
 * The client's side of the NBD wire format (NetworkBlockDevice/nbd doc/proto.md): the constants it
 * sends and reads, and the two messages it builds, option requests and transmission requests.
 * Everything on the wire is big-endian.
 *
 * The values are the server's (nbd/protocol.ts) again: core/ may not import nbd/ (the layering in
 * docs/architecture.md), so the client keeps its own copy, and test/unit/nbd-client-wire.test.ts
 * checks that the two agree.
 */

/** "NBDMAGIC", the first 8 bytes of every greeting (proto.md, "Newstyle negotiation"). */
export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": the newstyle greeting's second magic and the start of every option request. */
export const IHAVEOPT = 0x49484156454f5054n;
/** The oldstyle greeting's second magic (proto.md, "Oldstyle negotiation"), refused with a message. */
export const OLDSTYLE_MAGIC = 0x00420281861253n;
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (proto.md, "Handshake flags"). */
export const HandshakeFlags = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;
/** Client flags (proto.md, "Client flags"). */
export const ClientFlags = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;

/** Option types (proto.md, "Option types"). */
export const Opt = { EXPORT_NAME: 1, ABORT: 2, STARTTLS: 5, GO: 7, STRUCTURED_REPLY: 8 } as const;

/** Option reply types (proto.md, "Option reply types"); errors have bit 31 set. */
export const Rep = {
  ACK: 1,
  INFO: 3,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const;

/** NBD_INFO_* items of NBD_OPT_GO (proto.md, "NBD_OPT_INFO and NBD_OPT_GO"). */
export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags (proto.md, "Transmission flags"). */
export const TransmissionFlags = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

/** Request types (proto.md, "Request types"). */
export const Cmd = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6 } as const;
export type CmdType = (typeof Cmd)[keyof typeof Cmd];

/** Command flags (proto.md, "Command flags"). */
export const CmdFlags = { FUA: 1 << 0, NO_HOLE: 1 << 1 } as const;

/** Structured reply flags and chunk types (proto.md, "Structured reply flags", "Structured reply types"). */
export const ReplyFlags = { DONE: 1 << 0 } as const;
export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;
/** Bit 15 of a chunk type marks an error chunk, even a type this client does not know. */
export const REPLY_TYPE_ERROR_BIT = 0x8000;

/** The error values the protocol allows (proto.md, "Error values"). */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export const GREETING_LENGTH = 18;
export const OPTION_REPLY_HEADER_LENGTH = 20;
export const REQUEST_HEADER_LENGTH = 28;
export const SIMPLE_REPLY_LENGTH = 16;
export const STRUCTURED_REPLY_HEADER_LENGTH = 20;
/** An OFFSET_DATA chunk's payload starts with the 64-bit offset. */
export const OFFSET_DATA_PREFIX = 8;
/**
 * When the server states no maximum block size, a client SHOULD NOT send more than 32 MiB in one
 * request (proto.md, "Block size constraints").
 */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

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
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(Math.floor(cookie / 0x1_0000_0000), 8);
  b.writeUInt32BE(cookie >>> 0, 12);
  b.writeUInt32BE(Math.floor(offset / 0x1_0000_0000), 16);
  b.writeUInt32BE(offset >>> 0, 20);
  b.writeUInt32BE(length, 24);
  return b;
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
