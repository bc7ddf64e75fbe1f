/**
 * The outgoing side of one NBD connection: replies in the order they are completed, corked per
 * event-loop turn, and READ replies whose data lies in files sent with sendfile(2) (zero-copy,
 * core/file-ranges.ts) instead of through a buffer.
 *
 * While a reply with file ranges goes out (header through the socket, then each range by
 * sendfile on a duplicate of the socket's descriptor), later replies are held back in order.
 * sendfile never waits for the client on a worker thread: when the socket is full or sendfile
 * cannot go on, the rest of the range is read into the reply buffer and written through the
 * socket. The duplicate descriptor is closed once the connection is closed and no call uses it.
 * docs/nbd-internals.md ("Large reads without a copy") describes the design.
 */
import type { Socket } from "node:net";
import fs from "node:fs";
import type { FileRangeRead, FileRange } from "../core/file-ranges.js";
import { readFully } from "../core/devices/fd-device.js";
import { dupFd, sendFileAsync } from "../core/sys/file.js";
import type { BufferPool } from "./buffer-pool.js";
import { socketFd } from "../core/sys/socket.js";

interface HeldBuffer {
  buf: Buffer;
  pooled: boolean;
}
interface HeldRanges {
  reply: Buffer;
  prefix: number;
  ranges: FileRangeRead;
}
type Held = HeldBuffer | HeldRanges;

const EMPTY = Buffer.alloc(0);

export interface ReplyWriterEvents {
  /** Sending file data failed: the reply is cut short, so the connection must close. */
  failed(err: Error): void;
  /** A reply with file ranges has gone out and the held replies after it are written. */
  drained(): void;
}

/** The default of NbdServerOptions.zeroCopy: where the sendfile binding exists (Linux x86_64). */
export function zeroCopySupported(): boolean {
  return process.platform === "linux" && process.arch === "x64";
}

export class ReplyWriter {
  /** File ranges can be sent on this socket (it exposes its descriptor and zero-copy is on). */
  readonly zeroCopy: boolean;
  private corked = false;
  /** The reply with file ranges going out now: everything else waits in `held`. */
  private sending: HeldRanges | null = null;
  private held: Held[] = [];
  private heldBytes = 0;
  private sendFd = -1;
  private closed = false;
  private endWanted: (() => void) | null = null;
  /** Bytes sent by sendfile, for the connection's statistics. */
  zeroCopyBytes = 0;

  constructor(
    private readonly socket: Socket,
    private readonly buffers: BufferPool,
    private readonly events: ReplyWriterEvents,
    /** Send file ranges with sendfile when the socket allows (NbdServerOptions.zeroCopy). */
    zeroCopy = zeroCopySupported(),
  ) {
    this.zeroCopy = zeroCopy && socketFd(socket) !== undefined;
  }

  /** Reply bytes not yet handed to the kernel (the flow-control measure). */
  get queuedBytes(): number {
    // The reply being sent counts until it is out.
    return this.socket.writableLength + this.heldBytes + (this.sending?.reply.length ?? 0);
  }

  /** Queue a message; `pooled`: `buf` goes back to the buffer pool once the socket is done with it. */
  write(buf: Buffer, pooled = false): void {
    this.enqueue({ buf, pooled });
  }

  /**
   * A READ reply: `reply` (pooled) holds the header in its first `prefix` bytes and, after it, the
   * data the file devices did not give as ranges.
   */
  writeRanges(reply: Buffer, prefix: number, ranges: FileRangeRead): void {
    this.enqueue({ reply, prefix, ranges });
  }

  private enqueue(item: Held): void {
    // Completions after the client left: only their buffers and descriptors to give back.
    if (this.closed || this.socket.destroyed || this.socket.writableEnded) return this.drop(item);
    if (this.sending) {
      this.held.push(item);
      this.heldBytes += heldSize(item);
      return;
    }
    this.dispatch(item);
  }

  private dispatch(item: Held): void {
    if ("ranges" in item) this.start(item);
    else this.writeNow(item.buf, item.pooled);
  }

  /**
   * Call `cb` once everything written so far has been handed to the kernel (the STARTTLS ACK,
   * before the socket changes hands). Only for the handshake, where no file ranges are sent.
   */
  flushed(cb: () => void): void {
    this.uncork();
    this.socket.write(EMPTY, () => cb());
  }

  /** End the socket once everything queued is out. */
  end(cb: () => void): void {
    if (this.sending) this.endWanted = cb;
    else this.socket.end(cb);
  }

  /** The socket closed: drop what is held; the duplicate descriptor goes when no call uses it. */
  close(): void {
    this.closed = true;
    for (const h of this.held.splice(0)) this.drop(h);
    this.heldBytes = 0;
    if (!this.sending) this.closeSendFd();
  }

  private writeNow(buf: Buffer, pooled: boolean): void {
    const s = this.socket;
    if (!this.corked) {
      // Everything sent in this turn of the event loop leaves in one writev at its end (the check
      // phase, after every completion the poll phase delivered): not per tick, because the pool
      // delivers completions one callback at a time and a nextTick runs after each of them.
      this.corked = true;
      s.cork();
      setImmediate(this.uncork);
    }
    if (pooled) s.write(buf, () => this.buffers.give(buf));
    else s.write(buf);
  }

  private readonly uncork = (): void => {
    if (!this.corked) return;
    this.corked = false;
    this.socket.uncork();
  };

  private start(item: HeldRanges): void {
    this.sending = item;
    this.send(item).then(
      () => this.finish(item, null),
      (err: Error) => this.finish(item, err),
    );
  }

  private async send(item: HeldRanges): Promise<void> {
    if (this.sendFd < 0) this.sendFd = dupFd(socketFd(this.socket)!);
    let pending: Buffer[] = [item.reply.subarray(0, item.prefix)];
    for (const segment of item.ranges.segments()) {
      if (Buffer.isBuffer(segment)) {
        pending.push(segment);
        continue;
      }
      await this.flush(pending);
      pending = [];
      const sent = await this.sendRange(segment);
      // The rest of the range, if sendfile stopped short, through the buffer.
      if (sent < segment.length) pending.push(await this.readRest(item, segment, sent));
    }
    // Waited for too: these are slices of the reply, which goes back to the pool after.
    if (pending.some((buf) => buf.length > 0)) await this.flush(pending);
  }

  /** Write `bufs` and wait until the socket has handed them (and everything before) to the kernel. */
  private flush(bufs: Buffer[]): Promise<void> {
    if (bufs.length === 0) return Promise.resolve(); // two ranges in a row: the first is out already
    return new Promise((resolve, reject) => {
      const s = this.socket;
      const last = bufs.length - 1;
      bufs.forEach((buf, i) => {
        if (i < last) s.write(buf);
        else s.write(buf, (err) => (err ? reject(err) : resolve()));
      });
      this.uncork();
    });
  }

  /** sendfile as much of `range` as goes without waiting; returns the bytes sent. */
  private async sendRange(range: FileRange): Promise<number> {
    let sent = 0;
    while (sent < range.length) {
      if (this.gone) throw new ConnectionGone();
      let n: number;
      try {
        n = await sendFileAsync(this.sendFd, range.fd, range.position + sent, range.length - sent);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "EPIPE" || code === "ECONNRESET") throw new ConnectionGone();
        // EAGAIN: the socket is full. EINVAL/ENOSYS/EOPNOTSUPP: this file cannot be spliced.
        if (code === "EAGAIN" || code === "EINVAL" || code === "ENOSYS" || code === "EOPNOTSUPP") return sent;
        throw err;
      }
      if (n === 0) return sent; // end of file: the copy reads zeros from here
      sent += n;
      this.zeroCopyBytes += n;
    }
    return sent;
  }

  /** Read the part of `range` from `sent` on into its place in the reply buffer. */
  private readRest(item: HeldRanges, range: FileRange, sent: number): Promise<Buffer> {
    const at = item.prefix + range.offset + sent;
    const target = item.reply.subarray(at, item.prefix + range.offset + range.length);
    return new Promise((resolve, reject) =>
      readFully(range.fd, target, range.position + sent, (err) => (err ? reject(err) : resolve(target))),
    );
  }

  /** The client left or the socket was destroyed: nothing more can be sent. */
  private get gone(): boolean {
    return this.closed || this.socket.destroyed;
  }

  private finish(item: HeldRanges, err: Error | null): void {
    this.sending = null;
    this.drop(item);
    if (this.closed) return this.closeSendFd();
    if (err || this.socket.destroyed) {
      if (err && !(err instanceof ConnectionGone)) this.events.failed(err);
      else this.socket.destroy();
      return;
    }
    while (!this.sending && this.held.length > 0) {
      const next = this.held.shift()!;
      this.heldBytes -= heldSize(next);
      this.dispatch(next);
    }
    if (!this.sending && this.endWanted) {
      const cb = this.endWanted;
      this.endWanted = null;
      this.socket.end(cb);
    }
    this.events.drained();
  }

  private drop(h: Held): void {
    if ("ranges" in h) {
      h.ranges.release();
      this.buffers.give(h.reply);
    } else if (h.pooled) {
      this.buffers.give(h.buf);
    }
  }

  private closeSendFd(): void {
    if (this.sendFd < 0) return;
    fs.close(this.sendFd, () => {});
    this.sendFd = -1;
  }
}

function heldSize(h: Held): number {
  return "ranges" in h ? h.reply.length : h.buf.length;
}

class ConnectionGone extends Error {
  constructor() {
    super("the connection closed during a reply");
  }
}
