/**
 * ReplyWriter on a real unix socket pair, with the client side under the test's control: a reply
 * with file ranges meets a full socket (the client has not read), sends the rest through the
 * buffer instead of waiting on a worker thread, and keeps every later reply behind it.
 */
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { FileRangeRead } from "../../core/file-ranges.js";
import { dupFd } from "../../core/sys/file.js";
import { BufferPool } from "../../nbd/buffer-pool.js";
import { ReplyWriter } from "../../nbd/reply-writer.js";
import { pattern } from "../../testing/memory-backing.js";

const MiB = 1024 * 1024;
const linuxX64 = process.platform === "linux" && process.arch === "x64";

let dir: string;
let server: net.Server;
let client: net.Socket;
let serverSide: net.Socket;

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-reply-writer-"));
  const sock = path.join(dir, "s");
  const accepted = new Promise<net.Socket>((resolve) => {
    server = net.createServer((s) => resolve(s));
  });
  await new Promise<void>((resolve) => server.listen(sock, resolve));
  client = net.connect(sock);
  client.pause(); // nothing is read until the test says so
  serverSide = await accepted;
});

afterEach(async () => {
  client.destroy();
  serverSide.destroy();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Everything the client receives until `bytes` have arrived. */
function receive(bytes: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let got = 0;
    client.on("data", (c: Buffer) => {
      chunks.push(c);
      got += c.length;
      if (got >= bytes) resolve(Buffer.concat(chunks));
    });
  });
}

describe.skipIf(!linuxX64)("ReplyWriter", () => {
  it("a range larger than the socket can hold goes partly by sendfile and the rest through the buffer, before the replies queued after it", async () => {
    const content = pattern(21, 8 * MiB);
    const file = path.join(dir, "data");
    fs.writeFileSync(file, content);
    const fd = fs.openSync(file, "r");
    const pool = new BufferPool();
    const drained = vi.fn();
    const writer = new ReplyWriter(serverSide, pool, { failed: (err) => expect.fail(err.message), drained });
    expect(writer.zeroCopy).toBe(true);

    const prefix = 16;
    const reply = pool.take(prefix + 8 * MiB);
    reply.fill(0xaa, 0, prefix); // the "header"
    const ranges = new FileRangeRead(reply.subarray(prefix), 128 * 1024, dupFd);
    expect(ranges.take(reply.subarray(prefix, prefix + 7 * MiB), fd, 0)).toBe(true);
    reply.set(content.subarray(7 * MiB), prefix + 7 * MiB); // the last MiB came through the buffer
    fs.closeSync(fd);

    writer.writeRanges(reply, prefix, ranges);
    writer.write(Buffer.from("after-1"));
    writer.write(Buffer.from("after-2"));
    expect(writer.queuedBytes).toBeGreaterThanOrEqual(8 * MiB); // counted while it goes out
    // The socket fills up (the client reads nothing); the rest is then queued in the stream,
    // where the event loop waits for room, instead of in a sendfile or poll on a worker.
    await vi.waitFor(() => expect(serverSide.writableLength).toBeGreaterThan(0), { timeout: 5000 });
    const all = receive(prefix + 8 * MiB + 14);
    client.resume();
    const got = await all;
    expect(got.subarray(0, prefix).every((b) => b === 0xaa)).toBe(true);
    expect(got.subarray(prefix, prefix + 8 * MiB).equals(content)).toBe(true);
    expect(got.subarray(prefix + 8 * MiB).toString()).toBe("after-1after-2");
    await vi.waitFor(() => expect(drained).toHaveBeenCalled());
    expect(writer.zeroCopyBytes).toBeGreaterThan(0);
    expect(writer.zeroCopyBytes).toBeLessThan(7 * MiB);
    expect(ranges.ranges).toHaveLength(0); // released once sent
  });

  it("a file shorter than its range: the part past the end goes as zeros, as the copying path reads it", async () => {
    const file = path.join(dir, "short");
    fs.writeFileSync(file, pattern(3, 256 * 1024));
    const fd = fs.openSync(file, "r");
    const pool = new BufferPool();
    const writer = new ReplyWriter(serverSide, pool, { failed: (err) => expect.fail(err.message), drained: () => {} });
    const reply = pool.take(1 * MiB);
    const ranges = new FileRangeRead(reply, 128 * 1024, dupFd);
    expect(ranges.take(reply, fd, 0)).toBe(true);
    fs.closeSync(fd);
    reply.fill(0x55); // stale pool contents must not leak out
    const all = receive(MiB);
    client.resume();
    writer.writeRanges(reply, 0, ranges);
    const got = await all;
    expect(got.subarray(0, 256 * 1024).equals(pattern(3, 256 * 1024))).toBe(true);
    expect(got.subarray(256 * 1024).every((b) => b === 0)).toBe(true);
  });
});
