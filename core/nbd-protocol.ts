/**
 * The NBD wire constants (NetworkBlockDevice/nbd doc/proto.md), one copy for both ends: udm's
 * server (nbd/, which re-exports them from nbd/protocol.ts) and its client (core/devices/nbd/).
 * They live in core/ because core/ may not import nbd/ (docs/architecture.md, layering).
 * Everything on the wire is big-endian.
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
/** Requests and replies once NBD_OPT_EXTENDED_HEADERS is negotiated (proto.md's extension-ext-header branch). */
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

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
  ERR_EXT_HEADER_REQD: 0x8000000a,
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
  /** Extended headers only: the header's length is a payload that follows (WRITE MUST set it). */
  PAYLOAD_LEN: 1 << 5,
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
/** Extended request and reply headers: magic, flags, type, cookie, offset, 64-bit length. */
export const EXTENDED_REQUEST_HEADER_LENGTH = 32;
export const EXTENDED_REPLY_HEADER_LENGTH = 32;
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
