/**
 * Reusable large buffers for READ replies and WRITE payloads.
 *
 * A 1 MiB request used to allocate a fresh 1 MiB buffer (and throw it away when answered); at
 * gigabytes per second that is thousands of external allocations a second, and V8's garbage
 * collector spent a quarter of the event loop's time on them (bench/results.md). Buffers of
 * `minSize` bytes and more are kept here after use and handed out again for a request of the
 * same size; smaller ones come from Node's slab allocator, which is already cheap.
 *
 * Ownership is strict: `take` hands a buffer to exactly one user, who `give`s it back exactly
 * once, after nothing refers to it any more (the socket wrote it, the bio completed). Buffers
 * not given back are simply collected.
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private retained = 0;

  constructor(
    /** Smallest size worth pooling. */
    readonly minSize = 64 * 1024,
    /** Bytes kept at most; beyond it, returned buffers are left to the collector. */
    readonly maxRetained = 64 * 1024 * 1024,
  ) {}

  /** A buffer of exactly `size` bytes (contents undefined). */
  take(size: number): Buffer {
    if (size < this.minSize) return Buffer.allocUnsafe(size);
    const buf = this.free.get(size)?.pop();
    if (buf) {
      this.retained -= size;
      return buf;
    }
    // Slow: its own ArrayBuffer, so pooling it never pins a shared slab.
    return Buffer.allocUnsafeSlow(size);
  }

  /** Return a buffer obtained from `take` (smaller ones are ignored). */
  give(buf: Buffer): void {
    const size = buf.length;
    if (size < this.minSize || size > this.maxRetained) return;
    if (buf.byteOffset !== 0 || buf.buffer.byteLength !== size) return; // not one of ours
    if (this.retained + size > this.maxRetained) {
      // Full, probably of sizes nobody asks for any more (buffers are kept by exact size): start
      // over with this one, the size in use now.
      this.free.clear();
      this.retained = 0;
    }
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    list.push(buf);
    this.retained += size;
  }

  /** Bytes currently kept for reuse. */
  get retainedBytes(): number {
    return this.retained;
  }
}
