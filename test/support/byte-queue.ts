/** Bytes in arrival order with exact-length takes (synchronous). */
export class ByteQueue {
  private chunks: Buffer[] = [];
  length = 0;

  push(c: Buffer): void {
    this.chunks.push(c);
    this.length += c.length;
  }

  take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    this.length -= n;
    const first = this.chunks[0]!;
    if (first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const parts: Buffer[] = [];
    let need = n;
    while (need > 0) {
      const c = this.chunks[0]!;
      if (c.length <= need) {
        parts.push(c);
        this.chunks.shift();
        need -= c.length;
      } else {
        parts.push(c.subarray(0, need));
        this.chunks[0] = c.subarray(need);
        need = 0;
      }
    }
    return Buffer.concat(parts, n);
  }

  peek(n: number): Buffer {
    const b = this.take(n);
    this.chunks.unshift(b);
    this.length += n;
    return b;
  }
}
