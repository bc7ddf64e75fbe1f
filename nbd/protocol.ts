/**
 * NBD wire constants and the typed messages the parser produces (NetworkBlockDevice/nbd
 * doc/proto.md). Everything on the wire is big-endian. Only what udm's server speaks is here:
 * fixed newstyle handshake, NBD_OPT_GO/INFO, STARTTLS, structured replies; no block status, no
 * extended headers (those options are answered with NBD_REP_ERR_UNSUP).
 */

// ---- magics ----

/** "NBDMAGIC": first 8 bytes the server sends. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": second 8 bytes of the greeting and the first 8 bytes of every option request. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Prefix of every option reply. */
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ---- handshake ----

/** Handshake flags (server, 16 bits). */
export const HandshakeFlags = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags (32 bits); any other bit set means the connection must be dropped. */
export const ClientFlags = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;
export const KNOWN_CLIENT_FLAGS = ClientFlags.FIXED_NEWSTYLE | ClientFlags.NO_ZEROES;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

/** Option reply types; errors have bit 31 set. */
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
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

export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

// ---- transmission ----

/** Transmission flags (16 bits), sent with the export size. */
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

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CmdFlags = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

export const ReplyFlags = {
  DONE: 1 << 0,
} as const;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

/** The only error values the protocol allows on the wire (not the host's errno numbering). */
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

// ---- sizes and limits ----

/** Server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export const GREETING_LENGTH = 18;
/** Option request header: IHAVEOPT, option, length. */
export const OPTION_HEADER_LENGTH = 16;
export const OPTION_REPLY_HEADER_LENGTH = 20;
export const REQUEST_HEADER_LENGTH = 28;
export const SIMPLE_REPLY_LENGTH = 16;
export const STRUCTURED_REPLY_HEADER_LENGTH = 20;
/** OFFSET_DATA payload starts with the 64-bit offset. */
export const OFFSET_DATA_PREFIX = 8;

/** Strings (export names, messages) MUST be no longer than this (proto.md, Conventions). */
export const MAX_STRING_LENGTH = 4096;
/**
 * Largest option payload read into memory. The biggest legal option we understand is GO/INFO:
 * 4 + a 4096-byte name + 2 + 2 per information request; 8 KiB leaves room for ~2000 requests.
 * Longer options are skipped unread and answered with NBD_REP_ERR_TOO_BIG.
 */
export const MAX_OPTION_LENGTH = 8192;
/**
 * Largest READ/WRITE payload: 32 MiB, the size proto.md says clients may always use and servers
 * SHOULD NOT treat as a denial of service. It is also our advertised maximum block size.
 */
export const MAX_PAYLOAD = 32 * 1024 * 1024;

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
