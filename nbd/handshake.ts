/**
 * Option haggling of the fixed newstyle handshake: answers each parsed option and says when the
 * connection should enter transmission (NBD_OPT_GO / NBD_OPT_EXPORT_NAME) or end (NBD_OPT_ABORT).
 * Everything here is synchronous, so the connection can switch parsers before reading on.
 *
 * Errors a client can be told about become NBD_REP_ERR_* replies and the haggling goes on; only
 * what cannot be answered (bad client flags, EXPORT_NAME of an unknown export) throws
 * NbdProtocolError, which closes the connection.
 *
 * TLS follows proto.md's modes: "off" is NOTLS (STARTTLS → ERR_UNSUP), "on" is SELECTIVETLS with
 * no TLS-only export (STARTTLS → ACK, plaintext still served), "require" is FORCEDTLS: before TLS
 * every option but STARTTLS and ABORT gets ERR_TLS_REQD, and EXPORT_NAME (which cannot be
 * answered with an error) or a client without fixed newstyle ends the connection, as nbdkit and
 * qemu-nbd do.
 */
import {
  type ExportProvider,
  type FoundExport,
  MIN_BLOCK_SIZE,
  PREFERRED_BLOCK_SIZE,
  exportSizeBytes,
  resolveExport,
  transmissionFlags,
} from "./exports.js";
import {
  ClientFlags,
  type HandshakeMessage,
  Info,
  KNOWN_CLIENT_FLAGS,
  NbdProtocolError,
  Opt,
  Rep,
  optionName,
} from "./protocol.js";
import {
  exportNameReply,
  repAck,
  repError,
  repInfoBlockSize,
  repInfoExport,
  repInfoString,
  repServer,
} from "./serializer.js";
import type { NbdTlsMode } from "./tls.js";

export type HandshakeOutcome =
  | { next: "options" }
  /** STARTTLS was acknowledged: the next bytes are the client's TLS handshake. */
  | { next: "starttls" }
  | { next: "transmission"; found: FoundExport }
  | { next: "abort" };

const CONTINUE: HandshakeOutcome = { next: "options" };
const EXPORT_NAME_BEFORE_TLS = "NBD_OPT_EXPORT_NAME before TLS, which this server requires";

export class Handshake {
  /** NBD_OPT_STRUCTURED_REPLY was acknowledged. */
  structured = false;
  /** TLS is up (set by the connection once the TLS handshake succeeded). */
  tlsActive = false;
  private noZeroes = false;
  private fixedNewstyle = false;

  constructor(
    private readonly exports: ExportProvider,
    private readonly maxPayload: number,
    private readonly send: (reply: Buffer) => void,
    private readonly tlsMode: NbdTlsMode = "off",
  ) {}

  handle(m: HandshakeMessage): HandshakeOutcome {
    if (this.tlsMode === "require" && !this.tlsActive) return this.beforeRequiredTls(m);
    return this.dispatch(m);
  }

  private dispatch(m: HandshakeMessage): HandshakeOutcome {
    switch (m.kind) {
      case "clientFlags":
        if ((m.flags & ~KNOWN_CLIENT_FLAGS) !== 0)
          throw new NbdProtocolError(`unknown client flags 0x${m.flags.toString(16)}`);
        this.noZeroes = (m.flags & ClientFlags.NO_ZEROES) !== 0;
        this.fixedNewstyle = (m.flags & ClientFlags.FIXED_NEWSTYLE) !== 0;
        return CONTINUE;
      case "exportName": {
        const found = resolveExport(this.exports, m.name);
        // EXPORT_NAME cannot be answered with an error: the spec says to drop the connection.
        if (!found) throw new NbdProtocolError(`NBD_OPT_EXPORT_NAME: no export "${m.name}"`);
        const { device } = found;
        this.send(exportNameReply(exportSizeBytes(device), transmissionFlags(device, this.structured), this.noZeroes));
        return { next: "transmission", found };
      }
      case "info":
        return this.info(m.option, m.name, m.requests);
      case "option":
        return this.option(m.option, m.data);
      case "invalidOption":
        if (m.option === Opt.EXPORT_NAME) throw new NbdProtocolError(m.reason);
        this.send(repError(m.option, Rep.ERR_INVALID, m.reason));
        return CONTINUE;
      case "oversizeOption": {
        if (m.option === Opt.EXPORT_NAME) throw new NbdProtocolError(`NBD_OPT_EXPORT_NAME of ${m.length} bytes`);
        const known =
          m.option === Opt.INFO || m.option === Opt.GO || m.option === Opt.LIST || m.option === Opt.STRUCTURED_REPLY;
        this.send(
          repError(
            m.option,
            known ? Rep.ERR_TOO_BIG : Rep.ERR_UNSUP,
            `${optionName(m.option)}: ${m.length}-byte option ignored`,
          ),
        );
        return CONTINUE;
      }
    }
  }

  /** NBD_OPT_INFO / NBD_OPT_GO: describe the export; GO then enters transmission. */
  private info(option: number, name: string, requests: number[]): HandshakeOutcome {
    const found = resolveExport(this.exports, name);
    if (!found) {
      const count = this.exports.list().length;
      this.send(
        repError(
          option,
          Rep.ERR_UNKNOWN,
          name === "" ? `no default export (there are ${count} exports)` : `no export named "${name}"`,
        ),
      );
      return CONTINUE;
    }
    const { device } = found;
    this.send(repInfoExport(option, exportSizeBytes(device), transmissionFlags(device, this.structured)));
    // Sent even when not asked for (allowed): clients that understand it will then align.
    this.send(repInfoBlockSize(option, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, this.maxPayload));
    if (requests.includes(Info.NAME)) this.send(repInfoString(option, Info.NAME, found.name));
    this.send(repAck(option));
    return option === Opt.GO ? { next: "transmission", found } : CONTINUE;
  }

  private option(option: number, data: Buffer): HandshakeOutcome {
    switch (option) {
      case Opt.ABORT:
        this.send(repAck(option));
        return { next: "abort" };
      case Opt.LIST:
        if (data.length !== 0) return this.refuse(option, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data");
        for (const name of this.exports.list()) this.send(repServer(option, name));
        this.send(repAck(option));
        return CONTINUE;
      case Opt.STRUCTURED_REPLY:
        if (data.length !== 0) return this.refuse(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
        if (this.structured) return this.refuse(option, Rep.ERR_INVALID, "structured replies already negotiated");
        this.structured = true;
        this.send(repAck(option));
        return CONTINUE;
      case Opt.STARTTLS:
        return this.startTls(data);
      default:
        // Block status, extended headers, anything newer: the client falls back without them.
        return this.refuse(option, Rep.ERR_UNSUP, `${optionName(option)} is not supported`);
    }
  }

  private startTls(data: Buffer): HandshakeOutcome {
    const option = Opt.STARTTLS;
    if (this.tlsMode === "off") return this.refuse(option, Rep.ERR_UNSUP, "TLS is not enabled on this server");
    if (data.length !== 0) return this.refuse(option, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
    if (this.tlsActive) return this.refuse(option, Rep.ERR_INVALID, "TLS is already active");
    // proto.md: TLS needs fixed newstyle on both sides.
    if (!this.fixedNewstyle) return this.refuse(option, Rep.ERR_INVALID, "TLS needs fixed newstyle negotiation");
    // proto.md: a client that sends STARTTLS after STRUCTURED_REPLY must negotiate it again.
    this.structured = false;
    this.send(repAck(option));
    return { next: "starttls" };
  }

  /** FORCEDTLS before the upgrade: only STARTTLS and ABORT get anywhere. */
  private beforeRequiredTls(m: HandshakeMessage): HandshakeOutcome {
    const refusal = "TLS is required: send NBD_OPT_STARTTLS first";
    switch (m.kind) {
      case "clientFlags":
        // proto.md: TLS needs fixed newstyle; a server that requires TLS cannot serve this client.
        if ((m.flags & ClientFlags.FIXED_NEWSTYLE) === 0) {
          throw new NbdProtocolError("TLS is required but the client does not speak fixed newstyle");
        }
        return this.dispatch(m);
      case "exportName":
        throw new NbdProtocolError(EXPORT_NAME_BEFORE_TLS);
      case "option":
        if (m.option === Opt.STARTTLS || m.option === Opt.ABORT) return this.option(m.option, m.data);
        return this.refuse(m.option, Rep.ERR_TLS_REQD, refusal);
      case "invalidOption":
      case "oversizeOption":
        if (m.option === Opt.EXPORT_NAME) throw new NbdProtocolError(EXPORT_NAME_BEFORE_TLS);
        return this.refuse(m.option, Rep.ERR_TLS_REQD, refusal);
      case "info":
        return this.refuse(m.option, Rep.ERR_TLS_REQD, refusal);
    }
  }

  private refuse(option: number, type: number, message: string): HandshakeOutcome {
    this.send(repError(option, type, message));
    return CONTINUE;
  }
}
