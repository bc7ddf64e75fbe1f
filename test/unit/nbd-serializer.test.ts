/** The NBD serializer against byte-exact fixtures, and the bio status → NBD error mapping. */
import { describe, expect, it } from "vitest";
import { nbdErrorFor } from "../../nbd/exports.js";
import { Info, NbdErrno, Rep } from "../../nbd/protocol.js";
import {
  exportNameReply,
  greeting,
  readReplyPrefix,
  repAck,
  repError,
  repInfoBlockSize,
  repInfoExport,
  repInfoString,
  repServer,
  simpleReply,
  structuredError,
  structuredNone,
  writeOffsetDataHeader,
  writeSimpleReplyHeader,
} from "../../nbd/serializer.js";

const hex = (b: Buffer) => b.toString("hex");
const bytes = (s: string) => s.replace(/\s+/g, "");
const OPT_REPLY = "0003e889045565a9";
const HANDLE = 0x0102030405060708n;

describe("handshake messages", () => {
  it("greeting: NBDMAGIC, IHAVEOPT, handshake flags", () => {
    expect(hex(greeting(3))).toBe(bytes("4e42444d41474943 49484156454f5054 0003"));
  });

  it("NBD_REP_ACK", () => {
    expect(hex(repAck(7))).toBe(bytes(`${OPT_REPLY} 00000007 00000001 00000000`));
  });

  it("NBD_REP_SERVER: name length, name", () => {
    expect(hex(repServer(3, "disk"))).toBe(bytes(`${OPT_REPLY} 00000003 00000002 00000008 00000004 6469736b`));
  });

  it("NBD_INFO_EXPORT: size and transmission flags", () => {
    expect(hex(repInfoExport(7, 1 << 20, 0x01ed))).toBe(
      bytes(`${OPT_REPLY} 00000007 00000003 0000000c 0000 0000000000100000 01ed`),
    );
  });

  it("NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum", () => {
    expect(hex(repInfoBlockSize(6, 512, 4096, 32 << 20))).toBe(
      bytes(`${OPT_REPLY} 00000006 00000003 0000000e 0003 00000200 00001000 02000000`),
    );
  });

  it("NBD_INFO_NAME", () => {
    expect(hex(repInfoString(7, Info.NAME, "disk"))).toBe(
      bytes(`${OPT_REPLY} 00000007 00000003 00000006 0001 6469736b`),
    );
  });

  it("error replies carry a message", () => {
    expect(hex(repError(9, Rep.ERR_UNSUP, "no"))).toBe(bytes(`${OPT_REPLY} 00000009 80000001 00000002 6e6f`));
    expect(hex(repError(7, Rep.ERR_UNKNOWN))).toBe(bytes(`${OPT_REPLY} 00000007 80000006 00000000`));
    expect(hex(repError(7, Rep.ERR_INVALID, "x"))).toBe(bytes(`${OPT_REPLY} 00000007 80000003 00000001 78`));
    expect(hex(repError(7, Rep.ERR_POLICY, "x"))).toBe(bytes(`${OPT_REPLY} 00000007 80000002 00000001 78`));
  });

  it("NBD_OPT_EXPORT_NAME reply, with and without the 124 zero bytes", () => {
    expect(hex(exportNameReply(1 << 20, 0x0003, true))).toBe(bytes("0000000000100000 0003"));
    expect(hex(exportNameReply(1 << 20, 0x0003, false))).toBe(bytes("0000000000100000 0003") + "00".repeat(124));
  });
});

describe("transmission replies", () => {
  it("simple reply: magic, error, handle", () => {
    expect(hex(simpleReply(HANDLE, NbdErrno.EINVAL))).toBe(bytes("67446698 00000016 0102030405060708"));
  });

  it("simple READ reply header in front of the data", () => {
    const b = Buffer.alloc(readReplyPrefix(false) + 2, 0xee);
    writeSimpleReplyHeader(b, HANDLE, 0);
    expect(hex(b)).toBe(bytes("67446698 00000000 0102030405060708 eeee"));
  });

  it("OFFSET_DATA chunk with DONE in front of the data", () => {
    const b = Buffer.alloc(readReplyPrefix(true) + 4, 0xee);
    writeOffsetDataHeader(b, HANDLE, 4096, 4);
    expect(hex(b)).toBe(bytes("668e33ef 0001 0001 0102030405060708 0000000c 0000000000001000 eeeeeeee"));
  });

  it("NONE chunk with DONE", () => {
    expect(hex(structuredNone(HANDLE))).toBe(bytes("668e33ef 0001 0000 0102030405060708 00000000"));
  });

  it("ERROR chunk: error, message length, message", () => {
    expect(hex(structuredError(HANDLE, NbdErrno.EIO, "bad"))).toBe(
      bytes("668e33ef 0001 8001 0102030405060708 00000009 00000005 0003 626164"),
    );
  });
});

describe("bio status → NBD error", () => {
  it.each([
    ["EIO", NbdErrno.EIO],
    ["EPERM", NbdErrno.EPERM],
    ["ENOSPC", NbdErrno.ENOSPC],
    ["EINVAL", NbdErrno.EINVAL],
    ["EOPNOTSUPP", NbdErrno.ENOTSUP],
    ["ENXIO", NbdErrno.ESHUTDOWN],
    ["EAGAIN", NbdErrno.EIO],
  ] as const)("%s → %i", (status, errno) => {
    expect(nbdErrorFor(status)).toBe(errno);
  });
});
