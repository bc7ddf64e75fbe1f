/**
 * The kernel NBD client, for machines with the nbd module (/dev/nbd0 exists): connect a free
 * /dev/nbdN to the daemon's own NBD socket through the ioctl interface, as nbd-client does.
 *
 * The kernel takes a socket that is already past the handshake. A worker thread connects to the
 * daemon's unix socket, does the client side of the fixed-newstyle handshake (NBD_OPT_EXPORT_NAME,
 * no structured replies: the kernel understands simple replies only), hands the socket to the
 * device (NBD_SET_BLKSIZE, NBD_SET_SIZE, NBD_SET_FLAGS, NBD_SET_SOCK) and then blocks in
 * NBD_DO_IT until the device is disconnected. The worker does all of this with plain blocking
 * calls: the server end lives on the main thread's event loop, which must keep running, and a
 * worker thread (rather than koffi's async calls, which run on libuv's small thread pool) is
 * held for as long as the device is connected without starving file I/O.
 *
 * NOT EXERCISED on the development machine (no nbd module there); see the attach test for the
 * path that is (nbdfuse + loop).
 */
import fs from "node:fs";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { DmError } from "../../core/errors.js";
import { SyscallError } from "../../core/sys/errors.js";
import { callAsync, check, lastErrno, libc } from "../../core/sys/libc.js";

// linux/nbd.h: _IO(0xab, n)
const NBD_SET_SOCK = 0xab00;
const NBD_SET_BLKSIZE = 0xab01;
const NBD_SET_SIZE = 0xab02;
const NBD_DO_IT = 0xab03;
const NBD_CLEAR_SOCK = 0xab04;
const NBD_CLEAR_QUE = 0xab05;
const NBD_DISCONNECT = 0xab08;
const NBD_SET_FLAGS = 0xab0a;

const NBDMAGIC = Buffer.from("NBDMAGIC");
const IHAVEOPT = Buffer.from("IHAVEOPT");
const NBD_FLAG_FIXED_NEWSTYLE = 1;
const NBD_FLAG_NO_ZEROES = 2;
const NBD_OPT_EXPORT_NAME = 1;
const BLOCK_SIZE = 512;

export function kernelNbdAvailable(): boolean {
  return fs.existsSync("/dev/nbd0");
}

export interface KernelNbd {
  /** `/dev/nbdN`. */
  path: string;
  /** Flush, NBD_DISCONNECT, and wait for NBD_DO_IT to return. */
  disconnect(): Promise<void>;
}

interface WorkerArgs {
  socketPath: string;
  exportName: string;
  device: string;
}

type WorkerMessage = { type: "connected" } | { type: "error"; code?: string; message: string };

// ---- libc calls (core/sys/libc.ts binds libc once per thread, the worker's included) ----

const EINTR = 4;

function ioctl(fd: number, request: number, arg: number, name: string): number {
  return check(libc().ioctlInt(fd, request, arg) as number, "ioctl", name);
}

// ---- the worker: connect, handshake, configure, NBD_DO_IT ----

function connectUnix(socketPath: string): number {
  const c = libc();
  const addr = Buffer.alloc(110); // struct sockaddr_un
  addr.writeUInt16LE(1, 0); // AF_UNIX
  if (Buffer.byteLength(socketPath) > 107) throw new Error(`${socketPath}: socket path too long`);
  addr.write(socketPath, 2);
  const fd = c.socket(1, 1 | 0o2000000, 0) as number; // AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC
  check(fd, "socket");
  if ((c.connect(fd, addr, addr.length) as number) < 0) {
    const err = new SyscallError("connect", lastErrno(), socketPath);
    c.close(fd);
    throw err;
  }
  return fd;
}

function readExact(fd: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  for (let done = 0; done < length;) {
    const n = Number(libc().read(fd, buf.subarray(done), length - done));
    if (n < 0 && lastErrno() === EINTR) continue;
    check(n, "read");
    if (n === 0) throw new Error("the NBD server closed the connection during the handshake (unknown export?)");
    done += n;
  }
  return buf;
}

function writeAll(fd: number, buf: Buffer): void {
  for (let done = 0; done < buf.length;) {
    const n = Number(libc().write(fd, buf.subarray(done), buf.length - done));
    if (n < 0 && lastErrno() === EINTR) continue;
    check(n, "write");
    done += n;
  }
}

/** The client side of the fixed-newstyle handshake with NBD_OPT_EXPORT_NAME. */
function handshake(fd: number, exportName: string): { size: bigint; flags: number } {
  const greeting = readExact(fd, 18); // "NBDMAGIC" "IHAVEOPT" u16 handshake flags
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
  const reply = readExact(fd, 10 + (noZeroes ? 0 : 124)); // u64 size, u16 transmission flags
  return { size: reply.readBigUInt64BE(0), flags: reply.readUInt16BE(8) };
}

function runWorker({ socketPath, exportName, device }: WorkerArgs): void {
  const post = (m: WorkerMessage) => parentPort!.postMessage(m);
  let sock = -1;
  let nbd = -1;
  let claimed = false;
  try {
    sock = connectUnix(socketPath);
    const { size, flags } = handshake(sock, exportName);
    nbd = fs.openSync(device, fs.constants.O_RDWR);
    // First, as it claims the device for this thread: EBUSY if another client is setting it up.
    ioctl(nbd, NBD_SET_SOCK, sock, "NBD_SET_SOCK");
    claimed = true;
    ioctl(nbd, NBD_SET_BLKSIZE, BLOCK_SIZE, "NBD_SET_BLKSIZE");
    ioctl(nbd, NBD_SET_SIZE, Number(size), "NBD_SET_SIZE");
    ioctl(nbd, NBD_SET_FLAGS, flags, "NBD_SET_FLAGS");
    post({ type: "connected" });
    // Blocks until NBD_DISCONNECT (or the connection dies). An error after a requested disconnect
    // is normal, so it is not reported.
    libc().ioctlInt(nbd, NBD_DO_IT, 0);
  } catch (err) {
    post({ type: "error", code: (err as { code?: string }).code, message: (err as Error).message });
  } finally {
    if (claimed) {
      libc().ioctlInt(nbd, NBD_CLEAR_QUE, 0);
      libc().ioctlInt(nbd, NBD_CLEAR_SOCK, 0);
    }
    if (nbd >= 0) fs.closeSync(nbd);
    if (sock >= 0) libc().close(sock);
  }
}

if (!isMainThread && (workerData as { udmKernelNbd?: WorkerArgs } | null)?.udmKernelNbd) {
  runWorker((workerData as { udmKernelNbd: WorkerArgs }).udmKernelNbd);
}

// ---- the main thread ----

/** /dev/nbdN without a client (no /sys/block/nbdN/pid), lowest N first. */
function freeNbdDevices(): string[] {
  return fs
    .readdirSync("/sys/block")
    .filter((d) => /^nbd\d+$/.test(d) && !fs.existsSync(`/sys/block/${d}/pid`))
    .sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)))
    .map((d) => `/dev/${d}`);
}

const connected = new Set<string>();
let exitHookInstalled = false;

/** Safety net for a daemon exiting without detaching: disconnect (no flush: nobody would serve it). */
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const device of connected) {
      try {
        const fd = fs.openSync(device, fs.constants.O_RDWR);
        libc().ioctlInt(fd, NBD_DISCONNECT, 0);
        fs.closeSync(fd);
      } catch {
        // Best effort.
      }
    }
  });
}

/** Connect a free /dev/nbdN to export `exportName` on the NBD unix socket `socketPath`. */
export async function connectKernelNbd(socketPath: string, exportName: string, timeoutMs = 10_000): Promise<KernelNbd> {
  for (const device of freeNbdDevices()) {
    const worker = new Worker(new URL(import.meta.url), {
      workerData: { udmKernelNbd: { socketPath, exportName, device } },
    });
    const exited = new Promise<void>((resolve) => worker.once("exit", () => resolve()));
    const first = await new Promise<WorkerMessage>((resolve) => {
      worker.once("message", resolve);
      worker.once("error", (err) => resolve({ type: "error", message: err.message }));
      void exited.then(() => resolve({ type: "error", message: "worker exited" }));
    });
    if (first.type === "error") {
      await exited;
      if (first.code === "EBUSY") continue;
      throw new DmError("EIO", `${device}: ${first.message}`);
    }
    // NBD_DO_IT sizes the device and creates /sys/block/nbdN/pid once it is running.
    const sysPid = `/sys/block/${device.slice(5)}/pid`;
    const deadline = Date.now() + timeoutMs;
    let running = true;
    void exited.then(() => (running = false));
    while (!fs.existsSync(sysPid)) {
      if (!running || Date.now() > deadline) {
        await disconnect(device, exited);
        throw new DmError("EIO", `${device}: the kernel did not start the device`);
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    installExitHook();
    connected.add(device);
    void exited.then(() => connected.delete(device));
    return { path: device, disconnect: () => disconnect(device, exited) };
  }
  throw new DmError("ENODEV", "no free /dev/nbd* device");
}

async function disconnect(device: string, exited: Promise<void>): Promise<void> {
  // Flush on the thread pool first (the main thread must keep serving the writes), then ask the
  // kernel to disconnect; the worker's NBD_DO_IT returns and it clears the socket.
  const fh = await fs.promises.open(device, fs.constants.O_RDWR);
  try {
    await fh.sync().catch(() => undefined);
    await callAsync(libc().ioctlInt, [fh.fd, NBD_DISCONNECT, 0], "ioctl", "NBD_DISCONNECT").catch(() => undefined);
  } finally {
    await fh.close();
  }
  await exited;
}
