/**
 * The kernel NBD client, for machines with the nbd module (/dev/nbd0 exists): connect an nbd
 * device to the daemon's own NBD socket through the nbd module's generic netlink interface, as
 * `nbd-client` does by default.
 *
 * The kernel takes a socket that is already past the handshake. We connect to the daemon's unix
 * socket and do the client side of the fixed-newstyle handshake (NBD_OPT_EXPORT_NAME, no
 * structured replies: the kernel understands simple replies only); the server end of that
 * connection lives on this thread's event loop, so the reads wait on koffi's worker threads.
 * Then NBD_CMD_CONNECT hands the socket, the size, the block size and the server's transmission
 * flags to the kernel, which picks a free /dev/nbdN, starts it and answers with its index. The
 * kernel holds the socket from then on; we close our descriptor.
 *
 * Netlink rather than the ioctls (NBD_SET_SOCK ... NBD_DO_IT): NBD_DO_IT blocks a thread for as
 * long as the device is connected, in an ioctl on a descriptor of the device, so udmd itself
 * would keep /dev/nbdN open. The device must behave like /dev/dm-N, whose page cache the kernel
 * drops when its last user closes it; with udmd's descriptor open that never happens, and after
 * a table swap a buffered read returned what the old table held (seen in test/vm/). Through
 * netlink udmd holds no descriptor of the device.
 *
 * Flush and FUA: the flags udm's server offers include NBD_FLAG_SEND_FLUSH and NBD_FLAG_SEND_FUA,
 * and they are passed on (NBD_ATTR_SERVER_FLAGS), so the kernel turns the device's write cache on
 * with FUA support (queue/write_cache "write back", queue/fua 1). A flush (REQ_PREFLUSH, fsync)
 * reaches udm as NBD_CMD_FLUSH, a flush bio; a FUA write (REQ_FUA: an O_DIRECT|O_DSYNC write, a
 * journal commit block) as NBD_CMD_WRITE with NBD_CMD_FLAG_FUA, a write bio with FUA: FUA is not
 * turned into write + flush on this path. (An O_DSYNC write to the block device is followed by a
 * separate flush, the kernel's own fsync of the range; test/vm/kernel-nbd.test.ts shows both.)
 *
 * Each device gets a backend identifier naming the socket and the export (/sys/block/nbdN/backend),
 * so that the next daemon on the same run directory disconnects what a killed one left connected
 * (a dead socket the kernel would otherwise keep until someone disconnects it).
 */
import fs from "node:fs";
import { DmError } from "../../core/errors.js";
import { SyscallError } from "../../core/sys/errors.js";
import { callAsync, check, lastErrno, libc } from "../../core/sys/libc.js";

const NBDMAGIC = Buffer.from("NBDMAGIC");
const IHAVEOPT = Buffer.from("IHAVEOPT");
const NBD_FLAG_FIXED_NEWSTYLE = 1;
const NBD_FLAG_NO_ZEROES = 2;
const NBD_OPT_EXPORT_NAME = 1;
const DEFAULT_BLOCK_SIZE = 512;

// linux/netlink.h, linux/genetlink.h
const AF_NETLINK = 16;
const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_RAW = 3;
const SOCK_CLOEXEC = 0o2000000;
const NETLINK_GENERIC = 16;
const NLMSG_HDRLEN = 16;
const NLMSG_ERROR = 2;
const NLM_F_REQUEST = 1;
const NLM_F_ACK = 4;
const GENL_ID_CTRL = 0x10;
const CTRL_CMD_GETFAMILY = 3;
const CTRL_ATTR_FAMILY_ID = 1;
const CTRL_ATTR_FAMILY_NAME = 2;
const SOL_SOCKET = 1;
const SO_RCVTIMEO = 20;

// linux/nbd-netlink.h
const NBD_GENL_FAMILY_NAME = "nbd";
const NBD_GENL_VERSION = 1;
const NBD_CMD_CONNECT = 1;
const NBD_CMD_DISCONNECT = 2;
const NBD_ATTR_INDEX = 1;
const NBD_ATTR_SIZE_BYTES = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES = 3;
const NBD_ATTR_SERVER_FLAGS = 5;
const NBD_ATTR_SOCKETS = 7;
const NBD_ATTR_BACKEND_IDENTIFIER = 10;
const NBD_SOCK_ITEM = 1;
const NBD_SOCK_FD = 1;
const NLA_F_NESTED = 0x8000;

const EINTR = 4;
const EAGAIN = 11;

export function kernelNbdAvailable(): boolean {
  return fs.existsSync("/dev/nbd0");
}

export interface KernelNbd {
  /** `/dev/nbdN`. */
  path: string;
  /** Flush, disconnect (the kernel sends NBD_CMD_DISC and lets the socket go). */
  disconnect(): Promise<void>;
}

export interface KernelNbdOptions {
  /** The device's logical block size: 512 (default) to the page size, a power of two. */
  blockSize?: number;
  /** How long the server may take to answer the handshake (default 10 s). */
  timeoutMs?: number;
}

// ---- the handshake, on a blocking unix socket ----

function connectUnix(socketPath: string, timeoutMs: number): number {
  const c = libc();
  const addr = Buffer.alloc(110); // struct sockaddr_un
  addr.writeUInt16LE(AF_UNIX, 0);
  if (Buffer.byteLength(socketPath) > 107) throw new Error(`${socketPath}: socket path too long`);
  addr.write(socketPath, 2);
  const fd = check(c.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0) as number, "socket");
  try {
    // Connecting to a listening unix socket does not wait for the server to accept.
    if ((c.connect(fd, addr, addr.length) as number) < 0) throw new SyscallError("connect", lastErrno(), socketPath);
    setReceiveTimeout(fd, timeoutMs);
    return fd;
  } catch (err) {
    c.close(fd);
    throw err;
  }
}

/**
 * SO_RCVTIMEO: a server that never answers fails the handshake with EAGAIN. Reset to 0 before the
 * kernel takes the socket, whose receive side would otherwise time out between requests.
 */
function setReceiveTimeout(fd: number, ms: number): void {
  const tv = Buffer.alloc(16); // struct timeval
  tv.writeBigInt64LE(BigInt(Math.floor(ms / 1000)), 0);
  tv.writeBigInt64LE(BigInt((ms % 1000) * 1000), 8);
  check(libc().setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, tv, tv.length) as number, "setsockopt", "SO_RCVTIMEO");
}

/** Read exactly `length` bytes on a worker thread: the server answering is on this thread. */
async function readExact(fd: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  for (let done = 0; done < length;) {
    let n: number;
    try {
      n = await callAsync(libc().read, [fd, buf.subarray(done), length - done], "read", "NBD handshake");
    } catch (err) {
      if ((err as SyscallError).code === "EINTR") continue;
      if ((err as SyscallError).code === "EAGAIN") throw new Error("the NBD server did not answer the handshake");
      throw err;
    }
    if (n === 0) throw new Error("the NBD server closed the connection during the handshake (unknown export?)");
    done += n;
  }
  return buf;
}

/** Small writes to a unix socket with an empty buffer: they do not wait for the reader. */
function writeAll(fd: number, buf: Buffer): void {
  for (let done = 0; done < buf.length;) {
    const n = Number(libc().write(fd, buf.subarray(done), buf.length - done));
    if (n < 0 && lastErrno() === EINTR) continue;
    check(n, "write", "NBD handshake");
    done += n;
  }
}

/** The client side of the fixed-newstyle handshake with NBD_OPT_EXPORT_NAME. */
async function handshake(fd: number, exportName: string): Promise<{ size: bigint; flags: number }> {
  const greeting = await readExact(fd, 18); // "NBDMAGIC" "IHAVEOPT" u16 handshake flags
  if (!greeting.subarray(0, 8).equals(NBDMAGIC) || !greeting.subarray(8, 16).equals(IHAVEOPT)) {
    throw new Error("not a newstyle NBD server");
  }
  const serverFlags = greeting.readUInt16BE(16);
  if (!(serverFlags & NBD_FLAG_FIXED_NEWSTYLE)) throw new Error("the NBD server is not fixed-newstyle");
  const noZeroes = serverFlags & NBD_FLAG_NO_ZEROES;
  const name = Buffer.from(exportName);
  const msg = Buffer.alloc(4 + 16 + name.length);
  msg.writeUInt32BE(NBD_FLAG_FIXED_NEWSTYLE | noZeroes, 0); // client flags
  IHAVEOPT.copy(msg, 4);
  msg.writeUInt32BE(NBD_OPT_EXPORT_NAME, 12);
  msg.writeUInt32BE(name.length, 16);
  name.copy(msg, 20);
  writeAll(fd, msg);
  const reply = await readExact(fd, 10 + (noZeroes ? 0 : 124)); // u64 size, u16 transmission flags
  return { size: reply.readBigUInt64BE(0), flags: reply.readUInt16BE(8) };
}

// ---- generic netlink ----

function nlattr(type: number, payload: Buffer): Buffer {
  const header = Buffer.alloc(4);
  header.writeUInt16LE(4 + payload.length, 0);
  header.writeUInt16LE(type, 2);
  return Buffer.concat([header, payload, Buffer.alloc((4 - (payload.length % 4)) % 4)]);
}

const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
};
const u64 = (n: bigint | number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
};

/** Attributes of a netlink payload, by type (nested flag masked off). */
function parseAttrs(buf: Buffer): Map<number, Buffer> {
  const attrs = new Map<number, Buffer>();
  for (let off = 0; off + 4 <= buf.length;) {
    const len = buf.readUInt16LE(off);
    if (len < 4) break;
    attrs.set(buf.readUInt16LE(off + 2) & ~NLA_F_NESTED, buf.subarray(off + 4, off + len));
    off += (len + 3) & ~3;
  }
  return attrs;
}

let sequence = 0;

function genlMessage(family: number, cmd: number, version: number, attrs: Buffer[]): { msg: Buffer; seq: number } {
  const seq = ++sequence;
  const payload = Buffer.concat([Buffer.from([cmd, version, 0, 0]), ...attrs]);
  const msg = Buffer.alloc(NLMSG_HDRLEN + payload.length);
  msg.writeUInt32LE(msg.length, 0);
  msg.writeUInt16LE(family, 4);
  msg.writeUInt16LE(NLM_F_REQUEST | NLM_F_ACK, 6);
  msg.writeUInt32LE(seq, 8);
  payload.copy(msg, NLMSG_HDRLEN);
  return { msg, seq };
}

/**
 * One datagram of answers to request `seq`: the reply's attributes (if it carried one) and,
 * once the acknowledgement came, `done` (a negative errno in it is thrown).
 */
function takeAnswers(datagram: Buffer, seq: number, what: string, into: { attrs?: Map<number, Buffer> }): boolean {
  let done = false;
  for (let off = 0; off + NLMSG_HDRLEN <= datagram.length;) {
    const len = datagram.readUInt32LE(off);
    if (len < NLMSG_HDRLEN) break;
    const type = datagram.readUInt16LE(off + 4);
    if (datagram.readUInt32LE(off + 8) === seq) {
      if (type === NLMSG_ERROR) {
        const errno = -datagram.readInt32LE(off + NLMSG_HDRLEN);
        if (errno !== 0) throw new SyscallError("netlink", errno, what);
        done = true;
      } else {
        // A copy: the next read reuses the buffer. Past the genlmsghdr.
        into.attrs = parseAttrs(Buffer.from(datagram.subarray(off + NLMSG_HDRLEN + 4, off + len)));
      }
    }
    off += (len + 3) & ~3;
  }
  return done;
}

/** A generic netlink socket for one exchange (closed by the caller). */
function netlinkSocket(): number {
  return check(libc().socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC) as number, "socket", "netlink");
}

/** Send a request and wait for its acknowledgement, in this thread (the kernel answers at once). */
function requestSync(family: number, cmd: number, version: number, attrs: Buffer[], what: string) {
  const fd = netlinkSocket();
  try {
    const { msg, seq } = genlMessage(family, cmd, version, attrs);
    check(Number(libc().write(fd, msg, msg.length)), "write", what);
    const answer: { attrs?: Map<number, Buffer> } = {};
    const buf = Buffer.alloc(16384);
    for (;;) {
      const n = Number(libc().read(fd, buf, buf.length));
      if (n < 0 && (lastErrno() === EINTR || lastErrno() === EAGAIN)) continue;
      check(n, "read", what);
      if (takeAnswers(buf.subarray(0, n), seq, what, answer)) return answer.attrs;
    }
  } finally {
    libc().close(fd);
  }
}

/**
 * The same on a worker thread, for requests the kernel answers only after talking to the NBD
 * server (disconnect sends NBD_CMD_DISC), which is served on this thread.
 */
async function requestAsync(family: number, cmd: number, version: number, attrs: Buffer[], what: string) {
  const fd = netlinkSocket();
  try {
    const { msg, seq } = genlMessage(family, cmd, version, attrs);
    await callAsync(libc().write, [fd, msg, msg.length], "write", what);
    const answer: { attrs?: Map<number, Buffer> } = {};
    const buf = Buffer.alloc(16384);
    for (;;) {
      const n = await callAsync(libc().read, [fd, buf, buf.length], "read", what);
      if (takeAnswers(buf.subarray(0, n), seq, what, answer)) return answer.attrs;
    }
  } finally {
    libc().close(fd);
  }
}

let nbdFamily: number | undefined;

/** The nbd module's generic netlink family id (registered when the module is loaded). */
function nbdFamilyId(): number {
  if (nbdFamily !== undefined) return nbdFamily;
  const name = Buffer.from(`${NBD_GENL_FAMILY_NAME}\0`);
  let attrs;
  try {
    attrs = requestSync(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, [nlattr(CTRL_ATTR_FAMILY_NAME, name)], "nbd family");
  } catch (err) {
    if ((err as SyscallError).code === "ENOENT") throw new DmError("ENODEV", "the nbd module has no netlink interface");
    throw err;
  }
  const id = attrs?.get(CTRL_ATTR_FAMILY_ID);
  if (!id) throw new DmError("ENODEV", "the nbd netlink family has no id");
  nbdFamily = id.readUInt16LE(0);
  return nbdFamily;
}

function disconnectSync(index: number): void {
  requestSync(nbdFamilyId(), NBD_CMD_DISCONNECT, NBD_GENL_VERSION, [nlattr(NBD_ATTR_INDEX, u32(index))], `nbd${index}`);
}

// ---- devices ----

/** Devices connected by this process, by index. */
const connected = new Set<number>();
let exitHookInstalled = false;

/** Safety net for a daemon exiting without detaching: disconnect (no flush: nobody would serve it). */
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const index of connected) {
      try {
        disconnectSync(index);
      } catch {
        // Best effort.
      }
    }
  });
}

/** What /sys/block/nbdN/backend says for devices of `socketPath` (one daemon's run directory). */
function backendPrefix(socketPath: string): string {
  return `udm ${socketPath} `;
}

/**
 * Disconnect devices a previous daemon on this socket left connected (killed before it could
 * detach): their socket's other end is gone, so all they can do is fail I/O. Only one daemon
 * runs on a run directory at a time, so a device of ours that this process did not connect is
 * such a leftover.
 */
function disconnectLeftovers(socketPath: string): void {
  let names: string[];
  try {
    names = fs.readdirSync("/sys/block").filter((d) => /^nbd\d+$/.test(d));
  } catch {
    return;
  }
  for (const name of names) {
    const index = Number(name.slice(3));
    if (connected.has(index)) continue;
    let backend: string;
    try {
      backend = fs.readFileSync(`/sys/block/${name}/backend`, "utf8");
    } catch {
      continue; // not connected, or a kernel without backend identifiers
    }
    if (backend.startsWith(backendPrefix(socketPath))) {
      try {
        disconnectSync(index);
      } catch {
        // Already gone.
      }
    }
  }
}

/** Connect a free /dev/nbdN to export `exportName` on the NBD unix socket `socketPath`. */
export async function connectKernelNbd(
  socketPath: string,
  exportName: string,
  opts: KernelNbdOptions = {},
): Promise<KernelNbd> {
  const family = nbdFamilyId();
  disconnectLeftovers(socketPath);
  const sock = connectUnix(socketPath, opts.timeoutMs ?? 10_000);
  let index: number;
  try {
    const { size, flags } = await handshake(sock, exportName);
    setReceiveTimeout(sock, 0);
    const attrs = [
      nlattr(NBD_ATTR_SIZE_BYTES, u64(size)),
      nlattr(NBD_ATTR_BLOCK_SIZE_BYTES, u64(opts.blockSize ?? DEFAULT_BLOCK_SIZE)),
      nlattr(NBD_ATTR_SERVER_FLAGS, u64(flags)),
      nlattr(NBD_ATTR_SOCKETS | NLA_F_NESTED, nlattr(NBD_SOCK_ITEM | NLA_F_NESTED, nlattr(NBD_SOCK_FD, u32(sock)))),
      nlattr(NBD_ATTR_BACKEND_IDENTIFIER, Buffer.from(`${backendPrefix(socketPath)}${exportName}\0`)),
    ];
    // The kernel starts the device without talking to the server: no request waits on this thread.
    const reply = requestSync(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, attrs, `connect ${exportName}`);
    const indexAttr = reply?.get(NBD_ATTR_INDEX);
    if (!indexAttr) throw new Error("NBD_CMD_CONNECT answered without a device index");
    index = indexAttr.readUInt32LE(0);
  } catch (err) {
    const e = err as SyscallError;
    throw new DmError(e.code === "EBUSY" ? "EBUSY" : "EIO", `kernel nbd: ${e.message}`);
  } finally {
    libc().close(sock); // the kernel holds its own reference once connected
  }
  installExitHook();
  connected.add(index);
  const device = `/dev/nbd${index}`;
  return { path: device, disconnect: () => disconnect(index, device) };
}

async function disconnect(index: number, device: string): Promise<void> {
  // Flush on the thread pool first (the main thread must keep serving the writes), then ask the
  // kernel to disconnect; it sends NBD_CMD_DISC and shuts the socket down.
  try {
    const fh = await fs.promises.open(device, fs.constants.O_RDWR);
    try {
      await fh.sync().catch(() => undefined);
    } finally {
      await fh.close();
    }
  } catch {
    // Not openable (already disconnected): nothing to flush.
  }
  try {
    const attrs = [nlattr(NBD_ATTR_INDEX, u32(index))];
    await requestAsync(nbdFamilyId(), NBD_CMD_DISCONNECT, NBD_GENL_VERSION, attrs, `disconnect ${device}`);
  } finally {
    connected.delete(index);
  }
}
