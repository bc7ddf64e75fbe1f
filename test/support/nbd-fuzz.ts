/**
 * An NBD fuzzer with an oracle, for test/integration/fuzz-nbd.test.ts.
 *
 * A session is one connection. Its packets (client flags, option requests, transmission requests,
 * mutations of those, random bytes) are generated up front from a seeded Rng, written all at once
 * (fully pipelined, handshake included), then the client half-closes (unless the session ends by
 * itself) and waits for the server to close. Meanwhile the server's bytes are parsed and checked against what each packet must get:
 *
 * - The server's output is always well framed: greeting, option replies with the right magic, and
 *   in transmission simple or structured replies (whatever the client sent).
 * - Until the first mutated packet of a session, every answer is predicted: each option gets its
 *   replies in order, ending in ACK or the right NBD_REP_ERR_*; each request gets exactly one
 *   final reply whose error is one the server's rules allow (unsupported command or flags,
 *   unaligned, too long, past the end, read-only), and 0 when none applies; successful reads of a
 *   zero export are zeros of the requested length; nothing is answered after NBD_CMD_DISC.
 * - After a mutation the session is lenient: replies to unmutated requests are still checked,
 *   anything else is only required to be well framed (structured replies) or is not parsed
 *   (simple replies carry no length).
 * - Whatever was sent, the server closes the connection once the client has half-closed (or after
 *   a fatal option, ABORT or NBD_CMD_DISC).
 */
import net from "node:net";
import {
  Cmd,
  CmdFlags,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  NbdErrno,
  Opt,
  Rep,
  TransmissionFlags,
} from "../../nbd/protocol.js";
import { ByteQueue } from "./byte-queue.js";
import { optionRequest, u16, u32 } from "./nbd-client.js";
import { Rng } from "../../testing/rng.js";

export interface FuzzExport {
  name: string;
  sizeBytes: bigint;
  readOnly: boolean;
  /** Successful reads must return zeros. */
  zeroes: boolean;
  /** Requests that pass the checks may still fail with EIO (the error target). */
  failsIo: boolean;
}

export interface FuzzConfig {
  exports: FuzzExport[];
  /** How to reach the server (unix socket path or TCP port on 127.0.0.1). */
  connect: () => net.Socket;
  /** Seconds the server gets to close a connection after the client's EOF. */
  closeTimeoutMs?: number;
}

type OptionExpect =
  | { kind: "ack" }
  | { kind: "list" }
  | { kind: "error"; types: number[] }
  | { kind: "info"; exp: FuzzExport; go: boolean }
  /** A mutated NBD_OPT_INFO: described if the name still resolves, else ERR_UNKNOWN/ERR_INVALID. */
  | { kind: "infoMaybe" }
  | { kind: "abort" };

interface RequestStep {
  t: "req";
  handle: bigint;
  type: number;
  flags: number;
  offset: bigint;
  length: number;
  /** Errors the reply may carry (0 = success); the reply must be one of them. */
  allowed: Set<number>;
  zeroes: boolean;
}

type Step =
  | { t: "flags" }
  | { t: "flagsBad" }
  | { t: "opt"; option: number; expect: OptionExpect }
  | { t: "exportName"; exp: FuzzExport; noZeroes: boolean }
  | { t: "closeNow"; why: string }
  | RequestStep
  | { t: "disc" }
  | { t: "truncated" }
  | { t: "corrupt"; what: string };

interface Packet {
  bytes: Buffer;
  step: Step;
  /** Made by mutating a well-formed packet (counted; the step says whether it is predictable). */
  mutated?: boolean;
}

export class FuzzStats {
  sessions = 0;
  handshakeSessions = 0;
  transmissionSessions = 0;
  tcpSessions = 0;
  packets = 0;
  mutatedPackets = 0;
  /** Mutations that break the framing (the server is expected to drop the connection). */
  framingMutations = 0;
  bytesSent = 0;
  optionReplies = 0;
  requestReplies = 0;
  /** Replies checked against a prediction. */
  predicted = 0;
  closedByServer = 0;
  failureCount = 0;
  readonly failures: string[] = [];

  fail(what: string): void {
    if (this.failureCount++ < 25) this.failures.push(what);
  }
}

const KNOWN_OPTIONS = new Set<number>([
  Opt.EXPORT_NAME,
  Opt.ABORT,
  Opt.LIST,
  Opt.STARTTLS,
  Opt.INFO,
  Opt.GO,
  Opt.STRUCTURED_REPLY,
]);
const MISSING_NAMES = ["nosuch", "", "fz", "FZ-ZERO", "fz-zero ", "../fz-zero", "é"];

// ---------------------------------------------------------------------------------------------
// Generation

class SessionPlan {
  readonly packets: Packet[] = [];
  structured = false;
  noZeroes = true;
  /** In transmission on this export. */
  exp: FuzzExport | null = null;
  /** A packet after which the server answers nothing more (close, abort, disc, bad flags). */
  ended = false;

  constructor(
    readonly rng: Rng,
    readonly exports: FuzzExport[],
  ) {}

  /** Chance that a packet gets a field mutation that keeps the framing (so it stays predictable). */
  fieldMutations = 0;

  push(bytes: Buffer, step: Step, mutated = false): void {
    this.packets.push({ bytes, step, mutated });
  }
}

function str(s: string): Buffer {
  return Buffer.from(s, "utf8");
}

function infoPayload(name: Buffer, requests: number[]): Buffer {
  return Buffer.concat([u32(name.length), name, u16(requests.length), ...requests.map(u16)]);
}

/** One handshake option with its expected answer; may enter transmission or end the session. */
function genOption(p: SessionPlan): void {
  const r = p.rng;
  const roll = r.int(100);
  const existing = r.pick(p.exports);
  if (roll < 10) {
    const withData = r.chance(0.2);
    p.push(optionRequest(Opt.LIST, withData ? r.bytes(r.range(1, 40)) : Buffer.alloc(0)), {
      t: "opt",
      option: Opt.LIST,
      expect: withData ? { kind: "error", types: [Rep.ERR_INVALID] } : { kind: "list" },
    });
  } else if (roll < 20) {
    const withData = r.chance(0.2);
    const expect: OptionExpect =
      withData || p.structured ? { kind: "error", types: [Rep.ERR_INVALID] } : { kind: "ack" };
    if (!withData && !p.structured) p.structured = true;
    p.push(optionRequest(Opt.STRUCTURED_REPLY, withData ? r.bytes(r.range(1, 16)) : Buffer.alloc(0)), {
      t: "opt",
      option: Opt.STRUCTURED_REPLY,
      expect,
    });
  } else if (roll < 40) {
    // NBD_OPT_INFO, well formed: an export (described) or a missing name (ERR_UNKNOWN).
    const found = r.chance(0.6);
    const name = found ? str(existing.name) : str(r.pick(MISSING_NAMES));
    const requests = Array.from({ length: r.int(4) }, () => (r.chance(0.7) ? r.int(4) : r.int(0x10000)));
    const payload = infoPayload(name, requests);
    if (r.chance(p.fieldMutations)) {
      // Flip bits anywhere in the payload (the option's length stays right).
      for (let i = r.range(1, 4); i > 0; i--) payload[r.int(payload.length)]! ^= 1 << r.int(8);
      p.push(optionRequest(Opt.INFO, payload), { t: "opt", option: Opt.INFO, expect: { kind: "infoMaybe" } }, true);
      return;
    }
    p.push(optionRequest(Opt.INFO, payload), {
      t: "opt",
      option: Opt.INFO,
      expect: found ? { kind: "info", exp: existing, go: false } : { kind: "error", types: [Rep.ERR_UNKNOWN] },
    });
  } else if (roll < 55) {
    // INFO or GO with a malformed payload: ERR_INVALID, and the haggling goes on.
    const option = r.chance(0.5) ? Opt.INFO : Opt.GO;
    const name = str(existing.name);
    let data: Buffer;
    switch (r.int(6)) {
      case 0:
        data = r.bytes(r.int(6)); // shorter than 6
        break;
      case 1:
        data = Buffer.concat([u32(name.length + r.range(1, 5000)), name, u16(0)]); // name overruns
        break;
      case 2:
        data = Buffer.concat([u32(name.length), name, u16(r.range(1, 9)), u16(1).subarray(0, r.int(2))]); // count mismatch
        break;
      case 3:
        data = infoPayload(Buffer.from([0x66, 0xff, 0xfe, 0x80]), []); // not UTF-8
        break;
      case 4:
        data = infoPayload(Buffer.concat([name, Buffer.from([0]), str("x")]), []); // NUL
        break;
      default:
        data = infoPayload(Buffer.alloc(r.range(4097, 8000), 0x61), []); // name longer than 4096
    }
    p.push(optionRequest(option, data), { t: "opt", option, expect: { kind: "error", types: [Rep.ERR_INVALID] } });
  } else if (roll < 63) {
    // Over the 8 KiB option limit, payload sent in full and skipped by the server.
    const option = r.pick([Opt.INFO, Opt.GO, Opt.LIST, Opt.STRUCTURED_REPLY, Opt.STARTTLS, 0x42, r.u32()]);
    if (option === Opt.EXPORT_NAME) return genOption(p);
    const big = option === Opt.INFO || option === Opt.GO || option === Opt.LIST || option === Opt.STRUCTURED_REPLY;
    p.push(optionRequest(option, Buffer.alloc(r.range(MAX_OPTION_LENGTH + 1, MAX_OPTION_LENGTH + 12000), r.int(256))), {
      t: "opt",
      option,
      expect: { kind: "error", types: [big ? Rep.ERR_TOO_BIG : Rep.ERR_UNSUP] },
    });
  } else if (roll < 78) {
    // Unknown, unsupported or TLS options.
    let option = r.chance(0.5)
      ? r.pick([Opt.STARTTLS, Opt.PEEK_EXPORT, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT, Opt.EXTENDED_HEADERS])
      : r.u32();
    while (KNOWN_OPTIONS.has(option) && option !== Opt.STARTTLS) option = r.u32();
    let mutated = false;
    if (r.chance(p.fieldMutations * 3)) {
      // A known option with a high bit flipped in its code: unknown to the server.
      option =
        (r.pick([Opt.GO, Opt.INFO, Opt.LIST, Opt.EXPORT_NAME, Opt.ABORT, Opt.STRUCTURED_REPLY]) ^
          (1 << r.range(4, 31))) >>>
        0;
      mutated = true;
    }
    p.push(
      optionRequest(option, r.bytes(r.int(64))),
      { t: "opt", option, expect: { kind: "error", types: [Rep.ERR_UNSUP] } },
      mutated,
    );
  } else if (roll < 88) {
    // GO to a missing export: ERR_UNKNOWN, the haggling goes on.
    p.push(optionRequest(Opt.GO, infoPayload(str(r.pick(MISSING_NAMES)), [])), {
      t: "opt",
      option: Opt.GO,
      expect: { kind: "error", types: [Rep.ERR_UNKNOWN] },
    });
  } else {
    genEnding(p);
  }
}

/** Something after which the handshake is over: transmission, abort, or a dropped connection. */
function genEnding(p: SessionPlan): void {
  const r = p.rng;
  const existing = r.pick(p.exports);
  const roll = r.int(100);
  if (roll < 45) {
    p.push(optionRequest(Opt.GO, infoPayload(str(existing.name), r.chance(0.5) ? [3] : [])), {
      t: "opt",
      option: Opt.GO,
      expect: { kind: "info", exp: existing, go: true },
    });
    p.exp = existing;
  } else if (roll < 65) {
    p.push(optionRequest(Opt.EXPORT_NAME, str(existing.name)), {
      t: "exportName",
      exp: existing,
      noZeroes: p.noZeroes,
    });
    p.exp = existing;
  } else if (roll < 75) {
    p.push(optionRequest(Opt.EXPORT_NAME, str(r.pick(MISSING_NAMES))), {
      t: "closeNow",
      why: "EXPORT_NAME of a missing export",
    });
    p.ended = true;
  } else if (roll < 82) {
    p.push(optionRequest(Opt.EXPORT_NAME, Buffer.alloc(r.range(MAX_OPTION_LENGTH + 1, 10000), 0x61)), {
      t: "closeNow",
      why: "oversize EXPORT_NAME",
    });
    p.ended = true;
  } else {
    p.push(optionRequest(Opt.ABORT, r.chance(0.8) ? Buffer.alloc(0) : r.bytes(8)), {
      t: "opt",
      option: Opt.ABORT,
      expect: { kind: "abort" },
    });
    p.ended = true;
  }
}

const CMD_FLAGS_ALL = CmdFlags.FUA | CmdFlags.NO_HOLE | CmdFlags.DF | CmdFlags.REQ_ONE | CmdFlags.FAST_ZERO;

function randomBelow(r: Rng, n: bigint): bigint {
  return n <= 0n ? 0n : r.u64() % n;
}

function genOffset(r: Rng, size: bigint): bigint {
  const sectors = size / 512n;
  switch (r.int(8)) {
    case 0:
      return 0n;
    case 1:
    case 2:
    case 3:
      return randomBelow(r, sectors) * 512n; // aligned, inside
    case 4: {
      const near = size + BigInt(r.range(-8, 8)) * 512n;
      return near < 0n ? 0n : near; // around the end
    }
    case 5:
      return randomBelow(r, sectors) * 512n + BigInt(r.range(1, 511)); // unaligned
    case 6:
      return r.u64(); // anything
    default:
      return (1n << BigInt(r.range(40, 63))) + BigInt(r.int(2) ? 0 : r.range(1, 4095)); // large powers of two, +/- alignment
  }
}

function genLength(r: Rng, type: number): number {
  const roll = r.int(100);
  if (roll < 6) return 0;
  if (roll < 70) return r.range(1, 16) * 512;
  if (roll < 82) return r.range(1, 512) * 512; // up to 256 KiB
  if (roll < 90) return r.range(1, 70000); // probably unaligned
  if (type === Cmd.WRITE) return r.range(1, 16) * 512; // the payload has to be sent: keep it small
  return r.chance(0.5) ? MAX_PAYLOAD + r.range(1, 64) * 512 : r.u32(); // too long for READ; fine (but big) for TRIM etc.
}

/** The server's rules (connection.ts) as a set of acceptable replies. */
function allowedErrors(
  exp: FuzzExport,
  structured: boolean,
  type: number,
  flags: number,
  offset: bigint,
  length: number,
): Set<number> {
  const E = NbdErrno;
  const F = CmdFlags;
  const errs = new Set<number>();
  const allowedFlags: Record<number, number> = {
    [Cmd.READ]: F.FUA | (structured ? F.DF : 0),
    [Cmd.WRITE]: F.FUA,
    [Cmd.TRIM]: F.FUA,
    [Cmd.WRITE_ZEROES]: F.FUA | F.NO_HOLE | F.FAST_ZERO,
    [Cmd.FLUSH]: F.FUA,
    [Cmd.CACHE]: F.FUA,
  };
  const mask = allowedFlags[type];
  if (mask === undefined) return new Set([E.EINVAL]);
  if ((flags & ~mask) !== 0) errs.add(E.EINVAL);
  if (type !== Cmd.FLUSH) {
    const carriesPayload = type === Cmd.READ || type === Cmd.WRITE;
    if (carriesPayload && length > MAX_PAYLOAD) errs.add(E.EINVAL);
    if (offset % 512n !== 0n || length % 512 !== 0) errs.add(E.EINVAL);
    if (offset + BigInt(length) > exp.sizeBytes)
      errs.add(type === Cmd.WRITE || type === Cmd.WRITE_ZEROES ? E.ENOSPC : E.EINVAL);
    if (exp.readOnly && (type === Cmd.WRITE || type === Cmd.TRIM || type === Cmd.WRITE_ZEROES)) errs.add(E.EPERM);
  }
  if (errs.size > 0) return errs;
  const ok = new Set<number>([0]);
  if (exp.failsIo) ok.add(E.EIO);
  // FAST_ZERO may be refused (the device cannot promise it); the checker widens this further for
  // an export that does not advertise WRITE_ZEROES at all.
  if (type === Cmd.WRITE_ZEROES && flags & F.FAST_ZERO) ok.add(E.ENOTSUP);
  return ok;
}

const VALID_FLAGS: Record<number, number> = {
  [Cmd.READ]: CmdFlags.FUA | CmdFlags.DF,
  [Cmd.WRITE]: CmdFlags.FUA,
  [Cmd.TRIM]: CmdFlags.FUA,
  [Cmd.WRITE_ZEROES]: CmdFlags.FUA | CmdFlags.NO_HOLE | CmdFlags.FAST_ZERO,
  [Cmd.FLUSH]: CmdFlags.FUA,
  [Cmd.CACHE]: CmdFlags.FUA,
};

function genRequest(p: SessionPlan): void {
  const r = p.rng;
  const exp = p.exp!;
  const roll = r.int(100);
  let type: number =
    roll < 30
      ? Cmd.READ
      : roll < 55
        ? Cmd.WRITE
        : roll < 62
          ? Cmd.FLUSH
          : roll < 72
            ? Cmd.TRIM
            : roll < 82
              ? Cmd.WRITE_ZEROES
              : roll < 88
                ? Cmd.CACHE
                : roll < 92
                  ? Cmd.BLOCK_STATUS
                  : r.chance(0.5)
                    ? r.range(8, 40)
                    : r.int(0x10000);
  if (type === Cmd.DISC) return genRequest(p);
  const flagRoll = r.int(100);
  let flags =
    flagRoll < 70
      ? r.u32() & (VALID_FLAGS[type] ?? 0)
      : flagRoll < 85
        ? r.u32() & CMD_FLAGS_ALL
        : flagRoll < 95
          ? 1 << r.int(16)
          : r.u32() & 0xffff;
  let offset = type === Cmd.FLUSH && r.chance(0.8) ? 0n : genOffset(r, exp.sizeBytes);
  const length = type === Cmd.FLUSH && r.chance(0.8) ? 0 : genLength(r, type);
  const handle = r.u64();
  let mutated = false;
  if (r.chance(p.fieldMutations)) {
    // Flip bits in the flags, type or offset of a well-formed request. The framing stays intact
    // (magic, handle and length untouched; a WRITE stays a WRITE and nothing becomes one), so the
    // answer is still predictable from the mutated fields.
    mutated = true;
    for (let i = r.range(1, 3); i > 0; i--) {
      const field = r.int(3);
      if (field === 0) flags ^= 1 << r.int(16);
      else if (field === 1 && type !== Cmd.WRITE) {
        const t = type ^ (1 << r.int(16));
        if (t !== Cmd.WRITE && t !== Cmd.DISC) type = t;
      } else offset ^= 1n << BigInt(r.int(64));
    }
  }
  const header = Buffer.alloc(28);
  header.writeUInt32BE(0x25609513, 0);
  header.writeUInt16BE(flags, 4);
  header.writeUInt16BE(type, 6);
  header.writeBigUInt64BE(handle, 8);
  header.writeBigUInt64BE(offset, 16);
  header.writeUInt32BE(length >>> 0, 24);
  const bytes = type === Cmd.WRITE && length > 0 ? Buffer.concat([header, r.bytes(length)]) : header;
  p.push(
    bytes,
    {
      t: "req",
      handle,
      type,
      flags,
      offset,
      length,
      allowed: allowedErrors(exp, p.structured, type, flags, offset, length),
      zeroes: exp.zeroes && type === Cmd.READ,
    },
    mutated,
  );
}

/** A mutated copy of `bytes`: bit flips, overwrites, truncation, insertion or plain noise. */
export function mutate(r: Rng, bytes: Buffer): { bytes: Buffer; what: string } {
  const b = Buffer.from(bytes);
  switch (r.int(6)) {
    case 0: {
      const n = r.range(1, 8);
      for (let i = 0; i < n; i++) {
        const at = r.int(Math.min(b.length, 40));
        b[at]! ^= 1 << r.int(8);
      }
      return { bytes: b, what: `${n} bit flips` };
    }
    case 1: {
      const at = r.int(Math.min(b.length, 40));
      b[at] = r.int(256);
      return { bytes: b, what: `byte ${at} overwritten` };
    }
    case 2:
      return { bytes: b.subarray(0, r.int(b.length)), what: "truncated" };
    case 3: {
      const at = r.int(b.length + 1);
      return {
        bytes: Buffer.concat([b.subarray(0, at), r.bytes(r.range(1, 32)), b.subarray(at)]),
        what: `bytes inserted at ${at}`,
      };
    }
    case 4:
      return { bytes: Buffer.concat([b, b.subarray(0, r.int(b.length))]), what: "partly repeated" };
    default:
      return { bytes: r.bytes(r.range(1, 96)), what: "random bytes" };
  }
}

/**
 * A session's packets. Handshake sessions haggle at length (and may end in transmission or a
 * dropped connection); transmission sessions get through the handshake in a few options and send
 * `size` requests. `mutations.fields` is the chance that a packet gets a field mutation that keeps
 * the framing (still checked strictly); `mutations.framing` the chance that one packet of the
 * session is mutated any which way (the session is lenient from there on).
 */
export function planSession(
  rng: Rng,
  exports: FuzzExport[],
  kind: "handshake" | "transmission",
  size: number,
  mutations: { framing: number; fields: number },
): Packet[] {
  const p = new SessionPlan(rng, exports);
  p.fieldMutations = mutations.fields;
  const r = rng;
  // Client flags: FIXED_NEWSTYLE and (usually) NO_ZEROES; now and then unknown bits (closed).
  if (r.chance(kind === "handshake" ? 0.04 : 0)) {
    p.push(u32((r.u32() | 0x100) >>> 0), { t: "flagsBad" });
    p.ended = true;
  } else {
    p.noZeroes = r.chance(0.8);
    p.push(u32((r.chance(0.9) ? 1 : 0) | (p.noZeroes ? 2 : 0)), { t: "flags" });
  }
  if (!p.ended) {
    if (kind === "handshake") {
      for (let i = 0; i < size && !p.ended && !p.exp; i++) genOption(p);
    } else {
      for (let i = r.int(3); i > 0 && !p.ended && !p.exp; i--) genOption(p);
      if (!p.ended && !p.exp && r.chance(0.85) && !p.structured) {
        p.structured = true;
        p.push(optionRequest(Opt.STRUCTURED_REPLY, Buffer.alloc(0)), {
          t: "opt",
          option: Opt.STRUCTURED_REPLY,
          expect: { kind: "ack" },
        });
      }
      // Into transmission (GO or EXPORT_NAME on some export), unless a noise option ended it.
      while (!p.ended && !p.exp) genEnding(p);
    }
  }
  if (p.exp) {
    const n = kind === "transmission" ? size : r.int(20);
    for (let i = 0; i < n; i++) genRequest(p);
    const end = r.int(100);
    if (end < 25) {
      p.push(requestHeaderRaw(Cmd.DISC, 0, r.u64(), 0n, 0), { t: "disc" });
      for (let i = r.int(5); i > 0; i--) genRequest(p); // never answered
    } else if (end < 32) {
      // A WRITE cut short (in its header or its payload), then EOF.
      const header = requestHeaderRaw(Cmd.WRITE, 0, r.u64(), 0n, 4096);
      p.push(Buffer.concat([header, Buffer.alloc(r.int(4096))]).subarray(0, r.range(1, header.length + 4095)), {
        t: "truncated",
      });
    }
  } else if (!p.ended && kind === "handshake" && r.chance(0.1)) {
    p.push(Buffer.from("IHAVEOPT").subarray(0, r.range(1, 7)), { t: "truncated" });
  }
  // At most one mutation per session (often none): it sits somewhere among the packets.
  if (r.chance(mutations.framing) && p.packets.length > 1) {
    const at = r.range(1, p.packets.length - 1);
    const m = mutate(r, p.packets[at]!.bytes);
    p.packets[at] = {
      bytes: m.bytes,
      step: { t: "corrupt", what: `${m.what} (packet ${at} was ${describeStep(p.packets[at]!.step)})` },
      mutated: true,
    };
  }
  return p.packets;
}

function requestHeaderRaw(type: number, flags: number, handle: bigint, offset: bigint, length: number): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(0x25609513, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(handle, 8);
  h.writeBigUInt64BE(offset, 16);
  h.writeUInt32BE(length, 24);
  return h;
}

function describeStep(s: Step): string {
  switch (s.t) {
    case "req":
      return `request type=${s.type} flags=0x${s.flags.toString(16)} offset=${s.offset} length=${s.length} handle=0x${s.handle.toString(16)}`;
    case "opt":
      return `option ${s.option} (${s.expect.kind})`;
    case "exportName":
      return `EXPORT_NAME ${JSON.stringify(s.exp.name)}`;
    case "closeNow":
      return s.why;
    case "corrupt":
      return `mutated packet: ${s.what}`;
    default:
      return s.t;
  }
}

// ---------------------------------------------------------------------------------------------
// Running a session and checking the answers

const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;

class SessionChecker {
  private readonly q = new ByteQueue();
  private phase: "greeting" | "options" | "exportName" | "transmission" | "closing" | "lenient" = "greeting";
  /** Index of the next packet whose handshake answer is due. */
  private next = 0;
  /** A mutated packet has been sent: unpredictable from there on. */
  private readonly corruptAt: number;
  /** Packet index after which the server answers nothing more (first disc/close/abort/truncation). */
  private readonly endAt: number;
  private readonly requests = new Map<bigint, { step: RequestStep; index: number }>();
  private readonly answered = new Set<bigint>();
  private exp: FuzzExport | null = null;
  private tflags = 0;
  private structured = false;
  private noZeroes = true;
  private seenInfoExport = false;
  /** Reply bytes of a structured READ so far, per handle. */
  private readonly readBytes = new Map<bigint, number>();
  private readonly readErrors = new Map<bigint, number>();
  private stopped = false;
  /** Called once the greeting has been read. */
  onGreeting: () => void = () => undefined;

  constructor(
    private readonly packets: Packet[],
    private readonly stats: FuzzStats,
    private readonly label: string,
  ) {
    this.corruptAt = packets.findIndex((p) => p.step.t === "corrupt");
    const end = packets.findIndex(
      (p) =>
        ["disc", "truncated", "closeNow", "flagsBad"].includes(p.step.t) ||
        (p.step.t === "opt" && p.step.expect.kind === "abort"),
    );
    this.endAt = end < 0 ? packets.length : end;
    packets.forEach((p, index) => {
      if (p.step.t === "req" && (this.corruptAt < 0 || index !== this.corruptAt))
        this.requests.set(p.step.handle, { step: p.step, index });
    });
  }

  private get strict(): boolean {
    return this.corruptAt < 0;
  }

  /** Bytes received from the server, and the socket error if there was one (for failure messages). */
  received = 0;
  socketError = "";
  sawEnd = false;

  private fail(what: string): void {
    this.stats.fail(
      `${this.label}: ${what} [${this.received} bytes received${this.socketError ? `, ${this.socketError}` : ""}; at ${new Date().toISOString()}]`,
    );
    this.stopped = true;
  }

  /** Feed server bytes. */
  push(chunk: Buffer): void {
    this.received += chunk.length;
    if (this.stopped) return;
    this.q.push(chunk);
    try {
      while (!this.stopped && this.step()) {
        /* consume */
      }
    } catch (err) {
      this.fail(`checker: ${(err as Error).stack}`);
    }
  }

  /** Handshake answers still due: skip packets that get none. Returns the packet now due, or null. */
  private due(): Packet | null {
    while (this.next < this.packets.length) {
      const p = this.packets[this.next]!;
      if (p.step.t === "flags") {
        this.next++;
        continue;
      }
      return p;
    }
    return null;
  }

  private step(): boolean {
    switch (this.phase) {
      case "greeting": {
        if (this.q.length < 18) return false;
        const g = this.q.take(18);
        if (g.subarray(0, 16).toString("latin1") !== "NBDMAGICIHAVEOPT" || g.readUInt16BE(16) !== 3)
          this.fail(`bad greeting ${g.toString("hex")}`);
        this.phase = "options";
        this.onGreeting();
        return true;
      }
      case "options":
        return this.optionStep();
      case "exportName": {
        const n = this.noZeroes ? 10 : 134;
        if (this.q.length < n) return false;
        const r = this.q.take(n);
        const size = r.readBigUInt64BE(0);
        if (size !== this.exp!.sizeBytes) this.fail(`EXPORT_NAME size ${size}, expected ${this.exp!.sizeBytes}`);
        this.tflags = r.readUInt16BE(8);
        this.checkFlags();
        this.phase = "transmission";
        this.next++;
        return true;
      }
      case "transmission":
        return this.replyStep();
      case "closing":
        if (this.q.length > 0)
          this.fail(
            `${this.q.length} bytes after the server should have stopped (${this.q.peek(Math.min(this.q.length, 32)).toString("hex")})`,
          );
        return false;
      case "lenient":
        this.q.take(this.q.length);
        return false;
    }
  }

  private optionStep(): boolean {
    const p = this.due();
    if (p === null) {
      // Nothing more is due: whatever arrives now is unexpected.
      if (this.q.length > 0 && this.strict)
        this.fail(`unexpected bytes in the handshake: ${this.q.peek(Math.min(this.q.length, 32)).toString("hex")}`);
      return false;
    }
    if (this.next === this.corruptAt) {
      this.phase = "lenient";
      return true;
    }
    const s = p.step;
    if (s.t === "exportName") {
      this.exp = s.exp;
      this.noZeroes = s.noZeroes;
      this.structured = this.negotiatedStructured();
      this.phase = "exportName";
      return true;
    }
    if (s.t === "flagsBad" || s.t === "closeNow" || s.t === "truncated") {
      this.phase = "closing";
      return true;
    }
    if (s.t !== "opt") {
      this.fail(`handshake reached ${describeStep(s)}`);
      return false;
    }
    if (this.q.length < 20) return false;
    const h = this.q.peek(20);
    if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) {
      this.fail(`bad option reply magic ${h.toString("hex")} for ${describeStep(s)}`);
      return false;
    }
    const length = h.readUInt32BE(16);
    if (this.q.length < 20 + length) return false;
    this.q.take(20);
    const data = this.q.take(length);
    const option = h.readUInt32BE(8);
    const type = h.readUInt32BE(12);
    this.stats.optionReplies++;
    if (option !== s.option) return this.failed(`reply for option ${option} while ${describeStep(s)} was due`);
    const e = s.expect;
    const done = () => {
      this.stats.predicted++;
      this.next++;
      return true;
    };
    switch (e.kind) {
      case "ack":
        return type === Rep.ACK
          ? done()
          : this.failed(`reply 0x${type.toString(16)} to ${describeStep(s)}, expected ACK (${data.toString()})`);
      case "list":
        if (type === Rep.SERVER) return true;
        return type === Rep.ACK ? done() : this.failed(`reply 0x${type.toString(16)} to LIST`);
      case "error":
        return e.types.includes(type)
          ? done()
          : this.failed(
              `reply 0x${type.toString(16)} to ${describeStep(s)}, expected ${e.types.map((t) => "0x" + t.toString(16)).join("/")} (${data.toString()})`,
            );
      case "infoMaybe":
        if (type === Rep.INFO) {
          this.seenInfoExport ||= data.readUInt16BE(0) === 0;
          return true;
        }
        if (type === Rep.ACK && this.seenInfoExport) {
          this.seenInfoExport = false;
          return done();
        }
        return type === Rep.ERR_UNKNOWN || type === Rep.ERR_INVALID
          ? done()
          : this.failed(`reply 0x${type.toString(16)} to a mutated INFO`);
      case "abort":
        if (type !== Rep.ACK) return this.failed(`reply 0x${type.toString(16)} to ABORT`);
        this.phase = "closing";
        return done();
      case "info":
        if (type === Rep.INFO) {
          if (data.readUInt16BE(0) === 0) {
            const size = data.readBigUInt64BE(2);
            if (size !== e.exp.sizeBytes)
              return this.failed(`INFO size ${size} for ${e.exp.name}, expected ${e.exp.sizeBytes}`);
            this.tflags = data.readUInt16BE(10);
            this.seenInfoExport = true;
          }
          return true;
        }
        if (type !== Rep.ACK)
          return this.failed(`reply 0x${type.toString(16)} to ${describeStep(s)} (${data.toString()})`);
        if (!this.seenInfoExport) return this.failed(`ACK to ${describeStep(s)} without NBD_INFO_EXPORT`);
        this.seenInfoExport = false;
        if (e.go) {
          this.exp = e.exp;
          this.structured = this.negotiatedStructured();
          this.checkFlags();
          this.phase = "transmission";
        }
        return done();
    }
  }

  private negotiatedStructured(): boolean {
    return this.packets
      .slice(0, this.next)
      .some((q) => q.step.t === "opt" && q.step.option === Opt.STRUCTURED_REPLY && q.step.expect.kind === "ack");
  }

  private failed(what: string): false {
    this.fail(what);
    return false;
  }

  private checkFlags(): void {
    const ro = (this.tflags & TransmissionFlags.READ_ONLY) !== 0;
    if (ro !== this.exp!.readOnly) this.fail(`export ${this.exp!.name}: READ_ONLY flag ${ro}`);
    if (!(this.tflags & TransmissionFlags.HAS_FLAGS)) this.fail(`export ${this.exp!.name}: no HAS_FLAGS`);
    // Re-derive the predictions that depend on what this export supports.
    for (const { step } of this.requests.values()) {
      if (
        step.type === Cmd.WRITE_ZEROES &&
        !(this.tflags & TransmissionFlags.SEND_WRITE_ZEROES) &&
        step.allowed.has(0)
      ) {
        [NbdErrno.ENOTSUP, NbdErrno.EIO, NbdErrno.EINVAL].forEach((e) => step.allowed.add(e));
      }
    }
  }

  private replyStep(): boolean {
    if (this.q.length < 4) return false;
    const magic = this.q.peek(4).readUInt32BE(0);
    if (magic === 0x67446698) {
      if (this.q.length < 16) return false;
      const h = this.q.peek(16);
      const handle = h.readBigUInt64BE(8);
      const error = h.readUInt32BE(4);
      const known = this.requests.get(handle);
      const withData = known && known.step.type === Cmd.READ && error === 0 ? known.step.length : 0;
      if (!known && !this.strict && !this.structured) {
        // Simple replies have no length: an unknown READ reply cannot be skipped safely.
        this.phase = "lenient";
        return true;
      }
      if (this.q.length < 16 + withData) return false;
      this.q.take(16);
      const data = withData ? this.q.take(withData) : null;
      this.finish(handle, error, data ? data.length : 0, data);
      return true;
    }
    if (magic === 0x668e33ef) {
      if (this.q.length < 20) return false;
      const h = this.q.peek(20);
      const length = h.readUInt32BE(16);
      if (this.q.length < 20 + length) return false;
      this.q.take(20);
      const payload = this.q.take(length);
      const flags = h.readUInt16BE(4);
      const type = h.readUInt16BE(6);
      const handle = h.readBigUInt64BE(8);
      const known = this.requests.get(handle);
      if (type === 1) {
        if (length < 8) return this.failed("OFFSET_DATA chunk shorter than 8 bytes");
        const off = payload.readBigUInt64BE(0);
        if (known) {
          const rel = off - known.step.offset;
          if (known.step.type !== Cmd.READ) return this.failed(`OFFSET_DATA for ${describeStep(known.step)}`);
          if (rel < 0n || rel + BigInt(length - 8) > BigInt(known.step.length))
            return this.failed(`OFFSET_DATA at ${off} outside ${describeStep(known.step)}`);
          if (known.step.zeroes && !isZero(payload.subarray(8)))
            return this.failed(`non-zero data from a zero export for ${describeStep(known.step)}`);
          this.readBytes.set(handle, (this.readBytes.get(handle) ?? 0) + length - 8);
        }
      } else if (type === 0x8001 || type === 0x8002) {
        if (length < 6 || payload.readUInt16BE(4) > length - 6)
          return this.failed(`malformed error chunk ${payload.toString("hex")}`);
        this.readErrors.set(handle, payload.readUInt32BE(0));
      } else if (type !== 0) {
        return this.failed(`unexpected structured chunk type ${type}`);
      }
      if (flags & 1) {
        const error = this.readErrors.get(handle) ?? 0;
        this.readErrors.delete(handle);
        const got = this.readBytes.get(handle) ?? 0;
        this.readBytes.delete(handle);
        this.finish(handle, error, got, null);
      }
      return true;
    }
    return this.failed(`bad reply magic 0x${magic.toString(16)} in transmission`);
  }

  private finish(handle: bigint, error: number, dataBytes: number, simpleData: Buffer | null): void {
    this.stats.requestReplies++;
    const known = this.requests.get(handle);
    if (!known) {
      if (this.strict) this.fail(`reply for unknown handle 0x${handle.toString(16)}`);
      return;
    }
    if (this.answered.has(handle)) {
      if (this.strict) this.fail(`second reply for ${describeStep(known.step)}`);
      return;
    }
    this.answered.add(handle);
    const s = known.step;
    if (known.index > this.endAt && this.strict)
      this.fail(`answered after the server should have stopped: ${describeStep(s)}`);
    if (!s.allowed.has(error)) {
      this.fail(`${describeStep(s)} got error ${error}, expected one of ${[...s.allowed].join("/")}`);
      return;
    }
    if (s.type === Cmd.READ && error === 0 && dataBytes !== s.length)
      this.fail(`${describeStep(s)} returned ${dataBytes} bytes`);
    if (simpleData && s.zeroes && !isZero(simpleData))
      this.fail(`non-zero data from a zero export for ${describeStep(s)}`);
    this.stats.predicted++;
  }

  /** The connection closed: was everything that had to be answered answered? */
  closed(): void {
    if (this.stopped) return;
    // Whatever the client sent, the greeting went out first.
    if (this.phase === "greeting") return this.fail("closed before the greeting");
    if (this.phase === "closing" || this.phase === "lenient") {
      if (this.phase === "closing" && this.q.length > 0) this.step();
      return;
    }
    if (!this.strict) return;
    // A client that goes on sending after NBD_CMD_DISC (which it must not) races the server's
    // close: its write fails (EPIPE, or a TCP reset that drops replies still in flight) and the
    // socket is destroyed before what the server sent is read. Nothing is then known to be missing.
    const sentAfterEnd = this.packets.slice(this.endAt + 1).some((p) => p.step.t === "req");
    if (sentAfterEnd && this.socketError) return;
    if (this.phase === "options" || this.phase === "exportName") {
      const p = this.due();
      if (p && this.next < this.endAt && (p.step.t === "opt" || p.step.t === "exportName"))
        this.fail(`closed with ${describeStep(p.step)} unanswered`);
      return;
    }
    let missing = 0;
    let first = "";
    for (const { step, index } of this.requests.values()) {
      if (index < this.endAt && !this.answered.has(step.handle)) {
        if (missing++ === 0) first = describeStep(step);
      }
    }
    if (missing > 0) this.fail(`closed with ${missing} requests unanswered, e.g. ${first}`);
  }
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** Run one planned session to the end. Resolves when the server has closed the connection. */
export async function runSession(
  config: FuzzConfig,
  packets: Packet[],
  stats: FuzzStats,
  label: string,
): Promise<void> {
  const checker = new SessionChecker(packets, stats, label);
  const socket = config.connect();
  socket.on("data", (c: Buffer) => checker.push(c));
  // EPIPE/ECONNRESET once the server has dropped us; the order of events goes into failure messages.
  socket.on("error", (err: NodeJS.ErrnoException) => {
    checker.socketError = `${err.code ?? err.message} (${err.syscall ?? "?"}) after ${socket.bytesWritten} bytes written${checker.sawEnd ? ", after the server's FIN" : ""}`;
  });
  socket.on("end", () => (checker.sawEnd = true));
  const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
  // Read the greeting before sending anything: if the server drops the connection while the
  // client is still writing, the failed write destroys the socket before it reads what is queued.
  await new Promise<void>((resolve) => {
    checker.onGreeting = resolve;
    socket.once("close", resolve);
  });
  for (const p of packets) {
    stats.packets++;
    stats.bytesSent += p.bytes.length;
    if (p.mutated) stats.mutatedPackets++;
    if (p.step.t === "corrupt") stats.framingMutations++;
    if (!socket.destroyed) socket.write(p.bytes);
  }
  // Half-close, so that the server sees the end of the input, unless the session ends by itself
  // (a fatal option, ABORT, bad flags, NBD_CMD_DISC): there the server may have closed already,
  // and a shutdown that fails with EPIPE would destroy the socket before its replies are read.
  // (A mutated packet may leave the server waiting for bytes that never come: always half-close then.)
  const endsItself =
    !packets.some((p) => p.step.t === "corrupt") &&
    packets.some(
      (p) =>
        ["closeNow", "flagsBad", "disc"].includes(p.step.t) || (p.step.t === "opt" && p.step.expect.kind === "abort"),
    );
  if (!socket.destroyed && !endsItself) socket.end();
  const timeout = config.closeTimeoutMs ?? 20_000;
  let timer: NodeJS.Timeout | undefined;
  const timedOut = await Promise.race([
    closed.then(() => false),
    new Promise<boolean>((r) => (timer = setTimeout(() => r(true), timeout))),
  ]);
  clearTimeout(timer);
  if (timedOut) {
    stats.fail(`${label}: the server did not close the connection within ${timeout} ms of the client's EOF`);
    socket.destroy();
    await closed;
  } else {
    stats.closedByServer++;
  }
  checker.closed();
}
