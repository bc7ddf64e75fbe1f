/**
 * Option haggling of the fixed newstyle handshake: answers each parsed option and says when the
 * connection should enter transmission (NBD_OPT_GO / NBD_OPT_EXPORT_NAME) or end (NBD_OPT_ABORT).
 * Everything here is synchronous, so the connection can switch parsers before reading on.
 *
 * Errors a client can be told about become NBD_REP_ERR_* replies and the haggling goes on; only
 * what cannot be answered (bad client flags, EXPORT_NAME of an unknown export) throws
 * NbdProtocolError, which closes the connection.
 */
import { type ExportProvider, type FoundExport, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, exportSizeBytes, resolveExport, transmissionFlags } from "./exports.js";
import { ClientFlags, type HandshakeMessage, Info, KNOWN_CLIENT_FLAGS, NbdProtocolError, Opt, Rep, optionName } from "./protocol.js";
import { exportNameReply, repAck, repError, repInfoBlockSize, repInfoExport, repInfoString, repServer } from "./serializer.js";

export type HandshakeOutcome =
  | { next: "options" }
  | { next: "transmission"; found: FoundExport }
  | { next: "abort" };

const CONTINUE: HandshakeOutcome = { next: "options" };

export class Handshake {
  /** NBD_OPT_STRUCTURED_REPLY was acknowledged. */
  structured = false;
  private noZeroes = false;

  constructor(
    private readonly exports: ExportProvider,
    private readonly maxPayload: number,
    private readonly send: (reply: Buffer) => void,
  ) {}

  handle(m: HandshakeMessage): HandshakeOutcome {
    switch (m.kind) {
      case "clientFlags":
        if ((m.flags & ~KNOWN_CLIENT_FLAGS) !== 0) throw new NbdProtocolError(`unknown client flags 0x${m.flags.toString(16)}`);
        this.noZeroes = (m.flags & ClientFlags.NO_ZEROES) !== 0;
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
        const known = m.option === Opt.INFO || m.option === Opt.GO || m.option === Opt.LIST || m.option === Opt.STRUCTURED_REPLY;
        this.send(repError(m.option, known ? Rep.ERR_TOO_BIG : Rep.ERR_UNSUP, `${optionName(m.option)}: ${m.length}-byte option ignored`));
        return CONTINUE;
      }
    }
  }

  /** NBD_OPT_INFO / NBD_OPT_GO: describe the export; GO then enters transmission. */
  private info(option: number, name: string, requests: number[]): HandshakeOutcome {
    const found = resolveExport(this.exports, name);
    if (!found) {
      const count = this.exports.list().length;
      this.send(repError(option, Rep.ERR_UNKNOWN, name === "" ? `no default export (there are ${count} exports)` : `no export named "${name}"`));
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
        return this.refuse(option, Rep.ERR_UNSUP, "TLS is not supported by this server");
      default:
        // Block status, extended headers, anything newer: the client falls back without them.
        return this.refuse(option, Rep.ERR_UNSUP, `${optionName(option)} is not supported`);
    }
  }

  private refuse(option: number, type: number, message: string): HandshakeOutcome {
    this.send(repError(option, type, message));
    return CONTINUE;
  }
}
