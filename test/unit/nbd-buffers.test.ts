/**
 * The NBD server's memory for large messages: BufferPool (reused reply/payload buffers) and
 * ReceiveBuffer (where socket reads land). Both are about not allocating per request; what must
 * hold is ownership: a buffer is never handed to two users, and received bytes are never
 * overwritten while a message may still refer to them.
 */
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { setSendBuffer } from "../../core/sys/socket.js";
import { BufferPool } from "../../nbd/buffer-pool.js";
import { ReceiveBuffer } from "../../nbd/receive-buffer.js";

const KiB = 1024;

describe("BufferPool", () => {
  it("hands a returned buffer out again for the same size, and only once", () => {
    const pool = new BufferPool(64 * KiB, 1024 * KiB);
    const a = pool.take(128 * KiB);
    expect(a.length).toBe(128 * KiB);
    pool.give(a);
    expect(pool.retainedBytes).toBe(128 * KiB);
    expect(pool.take(256 * KiB)).not.toBe(a); // another size: a new buffer
    expect(pool.take(128 * KiB)).toBe(a);
    expect(pool.take(128 * KiB)).not.toBe(a); // taken already: never shared
    expect(pool.retainedBytes).toBe(0);
  });

  it("keeps neither small buffers, nor views, nor more than its limit (starting over when full)", () => {
    const pool = new BufferPool(64 * KiB, 256 * KiB);
    const small = pool.take(4 * KiB);
    pool.give(small);
    expect(pool.retainedBytes).toBe(0);
    const big = pool.take(128 * KiB);
    pool.give(big.subarray(0, 64 * KiB)); // a view of someone's buffer is not the pool's to keep
    expect(pool.retainedBytes).toBe(0);
    pool.give(pool.take(512 * KiB)); // larger than the whole limit
    expect(pool.retainedBytes).toBe(0);
    const bufs = [pool.take(128 * KiB), pool.take(128 * KiB), pool.take(192 * KiB)];
    pool.give(bufs[0]!);
    pool.give(bufs[1]!);
    expect(pool.retainedBytes).toBe(256 * KiB);
    // Full: the sizes kept so far are dropped for the one returned now (the size in use).
    pool.give(bufs[2]!);
    expect(pool.retainedBytes).toBe(192 * KiB);
    expect(pool.take(192 * KiB)).toBe(bufs[2]);
    expect([bufs[0], bufs[1]]).not.toContain(pool.take(128 * KiB));
  });
});

describe("ReceiveBuffer", () => {
  /** Simulate the socket: fill what nextBuffer offers with `n` bytes of `fill`, deliver them. */
  function read(rb: ReceiveBuffer, n: number, fill: number): Buffer {
    const target = rb.nextBuffer();
    expect(target.length).toBeGreaterThanOrEqual(n);
    target.fill(fill, 0, n);
    rb.onRead(n, target);
    return target;
  }

  it("reads one after another into an arena and never writes over bytes already delivered", () => {
    const rb = new ReceiveBuffer();
    const chunks: Buffer[] = [];
    rb.sink = { received: (c) => chunks.push(c), directSpace: () => null };
    for (let i = 0; i < 40; i++) read(rb, 20 * KiB + i, i + 1);
    expect(chunks).toHaveLength(40);
    chunks.forEach((c, i) => {
      expect(c.length).toBe(20 * KiB + i);
      expect(c.every((b) => b === i + 1)).toBe(true); // untouched by the 39 reads after it
    });
    // Consecutive reads share an arena until less than 64 KiB is left, then a new one starts.
    expect(chunks[1]!.buffer).toBe(chunks[0]!.buffer);
    expect(chunks[1]!.byteOffset).toBe(chunks[0]!.byteOffset + chunks[0]!.length);
    expect(new Set(chunks.map((c) => c.buffer)).size).toBeGreaterThan(1);
  });

  it("reads straight into the space the receiver offers, without using the arena", () => {
    const rb = new ReceiveBuffer();
    const payload = Buffer.alloc(100 * KiB);
    let offered: Buffer | null = null;
    const chunks: Buffer[] = [];
    rb.sink = { received: (c) => chunks.push(c), directSpace: () => offered };
    const first = read(rb, 1000, 7); // into the arena (nothing offered yet)
    offered = payload.subarray(1000);
    const second = read(rb, 50 * KiB, 8);
    expect(second.buffer).toBe(payload.buffer);
    expect(chunks[1]!.byteOffset).toBe(payload.byteOffset + 1000);
    expect(payload.subarray(1000, 1000 + 50 * KiB).every((b) => b === 8)).toBe(true);
    offered = null;
    const third = read(rb, 10, 9); // back to the arena, right after the first read
    expect(third.buffer).toBe(first.buffer);
    expect(chunks[2]!.byteOffset).toBe(chunks[0]!.byteOffset + 1000);
  });

  it("offers only a header's worth of arena when the receiver asks for it, then all of it again", () => {
    const rb = new ReceiveBuffer();
    let limit = 28;
    const chunks: Buffer[] = [];
    rb.sink = { received: (c) => chunks.push(c), directSpace: () => null, headerBytes: () => limit };
    const header = rb.nextBuffer();
    expect(header.length).toBe(28);
    header.fill(1);
    rb.onRead(28, header);
    limit = 0;
    const next = read(rb, 100, 2);
    expect(next.length).toBeGreaterThan(64 * KiB); // the rest of the arena
    expect(next.buffer).toBe(header.buffer);
    expect(chunks[1]!.byteOffset).toBe(chunks[0]!.byteOffset + 28); // after the header, not over it
    expect(chunks[0]!.every((b) => b === 1)).toBe(true);
  });
});

describe("setSendBuffer", () => {
  it("widens a socket's send buffer up to net.core.wmem_max, and names the error on a non-socket", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-sndbuf-"));
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(path.join(dir, "s"), r));
    const client = net.connect(path.join(dir, "s"));
    try {
      await new Promise((r) => client.once("connect", r));
      const fd = (client as unknown as { _handle: { fd: number } })._handle.fd;
      const wmemMax = Number(fs.readFileSync("/proc/sys/net/core/wmem_max", "utf8"));
      // The kernel stores twice the (capped) request: half of it is its own bookkeeping.
      expect(setSendBuffer(fd, 1 << 20)).toBe(2 * Math.min(1 << 20, wmemMax));
      const file = fs.openSync(path.join(dir, "plain"), "w");
      try {
        expect(() => setSendBuffer(file, 1 << 20)).toThrow(/setsockopt SO_SNDBUF: ENOTSOCK/);
      } finally {
        fs.closeSync(file);
      }
    } finally {
      client.destroy();
      await new Promise((r) => server.close(r));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
