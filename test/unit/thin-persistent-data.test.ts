/**
 * The persistent-data layer under the thin pool (targets/thin/persistent-data): checksums and the
 * bitmap bit order byte for byte as the kernel has them, the block manager's validators and commit
 * ordering (dirty blocks, flush, superblock with FUA) as the device sees them, what an I/O error
 * does, and the transaction manager's copy-on-write rules.
 */
import { describe, expect, it } from "vitest";
import { BioFlags } from "../../core/bio.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { type BlockValidator, BlockManager } from "../../targets/thin/persistent-data/block-manager.js";
import { btreeNodeValidator, calcMaxEntries } from "../../targets/thin/persistent-data/btree-node.js";
import {
  BITMAP_CSUM_XOR,
  BTREE_CSUM_XOR,
  INDEX_CSUM_XOR,
  SUPERBLOCK_CSUM_XOR,
  crc32c,
  dmChecksum,
} from "../../targets/thin/persistent-data/checksum.js";
import { PersistentDataError } from "../../targets/thin/persistent-data/errors.js";
import {
  BITMAP_HEADER_SIZE,
  bitmapFindFree,
  bitmapLookup,
  bitmapSet,
} from "../../targets/thin/persistent-data/space-map-bitmap.js";
import { MetadataSpaceMap } from "../../targets/thin/persistent-data/space-map-metadata.js";
import { TransactionManager } from "../../targets/thin/persistent-data/transaction-manager.js";
import { packBlockTime, unpackBlockTime } from "../../targets/thin/metadata/mapping.js";
import { ControlledDevice } from "../../testing/controlled-device.js";

/** Bit-at-a-time CRC32C, independent of the table-driven one under test. */
function slowCrc32cRaw(data: Uint8Array): number {
  let c = 0xffffffff;
  for (const byte of data) {
    c ^= byte;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  }
  return c >>> 0;
}

const plainValidator = (name: string): BlockValidator => ({ name, prepareForWrite() {}, check() {} });

async function expectErrno(p: Promise<unknown>, errno: string): Promise<void> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(PersistentDataError);
  expect((err as PersistentDataError).errno).toBe(errno);
}

describe("checksums", () => {
  it("crc32c of the standard check string is 0xe3069283", () => {
    expect(crc32c(Buffer.from("123456789"))).toBe(0xe3069283);
  });

  it("dm_bm_checksum is the raw CRC (seed ~0, no final inversion) xored with the block type's salt", () => {
    const block = Buffer.alloc(4092);
    for (let i = 0; i < block.length; i++) block[i] = (i * 7 + 3) & 0xff;
    for (const xor of [SUPERBLOCK_CSUM_XOR, BTREE_CSUM_XOR, INDEX_CSUM_XOR, BITMAP_CSUM_XOR]) {
      expect(dmChecksum(block, xor)).toBe((slowCrc32cRaw(block) ^ xor) >>> 0);
    }
    // Lengths that are not a multiple of the 8-byte stride.
    for (const len of [0, 1, 7, 9, 15]) {
      expect(dmChecksum(block.subarray(0, len), 0)).toBe(slowCrc32cRaw(block.subarray(0, len)));
    }
  });

  it("the salts are the kernel's", () => {
    expect([SUPERBLOCK_CSUM_XOR, BTREE_CSUM_XOR, INDEX_CSUM_XOR, BITMAP_CSUM_XOR]).toEqual([
      160774, 121107, 160478, 240779,
    ]);
  });
});

describe("on-disk encodings", () => {
  it("bitmap entries: four per byte from the low bits up, the high bit of each pair first", () => {
    const bm = Buffer.alloc(4096);
    for (let i = 0; i < 4; i++) bitmapSet(bm, i, 1);
    expect(bm[BITMAP_HEADER_SIZE]).toBe(0xaa); // what thin_restore writes for four blocks counted once
    for (let i = 4; i < 8; i++) bitmapSet(bm, i, 2);
    expect(bm[BITMAP_HEADER_SIZE + 1]).toBe(0x55);
    bitmapSet(bm, 9, 3);
    expect(bm[BITMAP_HEADER_SIZE + 2]).toBe(0x0c);
    expect([0, 3, 4, 7, 8, 9].map((i) => bitmapLookup(bm, i))).toEqual([1, 1, 2, 2, 0, 3]);
    bitmapSet(bm, 8, 1);
    bitmapSet(bm, 10, 2);
    bitmapSet(bm, 11, 1);
    expect(bitmapFindFree(bm, 0, 100)).toBe(12);
    expect(bitmapFindFree(bm, 0, 12)).toBe(-1);
    bitmapSet(bm, 5, 0);
    expect(bitmapFindFree(bm, 1, 100)).toBe(5);
    expect(bitmapFindFree(bm, 6, 100)).toBe(12);
  });

  it("a mapping packs its data block above a 24-bit time", () => {
    const v = packBlockTime(0x12_3456_789a, 0xabcdef);
    expect(v.readBigUInt64LE(0)).toBe((0x12_3456_789an << 24n) | 0xabcdefn);
    expect(unpackBlockTime(v)).toEqual({ block: 0x12_3456_789a, time: 0xabcdef });
    expect(unpackBlockTime(packBlockTime(2 ** 40 - 1, 0))).toEqual({ block: 2 ** 40 - 1, time: 0 });
  });

  it("node capacities are the kernel's: a multiple of 3 that fits a 4 KiB block", () => {
    expect([8, 4, 16, 24].map((size) => calcMaxEntries(size))).toEqual([252, 336, 168, 126]);
  });
});

describe("block manager", () => {
  it("commit writes the dirty blocks, flushes, and only then writes the superblock with FUA", async () => {
    const dev = new ControlledDevice(64 * 8, { volatileCache: true });
    const bm = new BlockManager(dev);
    const v = plainValidator("test");
    for (const b of [0, 3, 4, 9]) bm.writeLockZero(b, v).fill(b + 1);
    await bm.commit(0);
    const writes = dev.log.filter((r) => r.op !== "read").map((r) => [r.op, r.sector, r.sectors, r.flags]);
    expect(writes).toEqual([
      ["write", 3 * 8, 16, 0], // blocks 3 and 4 in one bio
      ["write", 9 * 8, 8, 0],
      ["flush", 0, 0, BioFlags.PREFLUSH],
      ["write", 0, 8, BioFlags.FUA],
    ]);
    expect(dev.unflushed()).toEqual([]);
    expect(bm.dirtyBlocks).toBe(0);
  });

  it("a crash while the superblock write is held keeps the old superblock and every old block", async () => {
    const dev = new ControlledDevice(64 * 8, { volatileCache: true });
    const bm = new BlockManager(dev);
    const v = plainValidator("test");
    bm.writeLockZero(0, v).fill(1);
    bm.writeLockZero(5, v).fill(1);
    await bm.commit(0);
    (await bm.writeLock(0, v)).fill(2);
    bm.writeLockZero(6, v).fill(2);
    dev.hold((bio) => bio.op === "write" && bio.sector === 0);
    const committing = bm.commit(0);
    await dev.waitForHeld(1);
    const crashed = dev.crash({ keep: () => true });
    expect(crashed.readSync(0, 8).every((x) => x === 1)).toBe(true);
    expect(crashed.readSync(5 * 8, 8).every((x) => x === 1)).toBe(true);
    dev.releaseAll();
    await committing;
    expect(
      dev
        .crash()
        .readSync(0, 8)
        .every((x) => x === 2),
    ).toBe(true);
  });

  it("validators: a block read as one type cannot be used as another; corruption and misplacement are caught", async () => {
    const dev = new MemoryDevice(64 * 8);
    const bm = new BlockManager(dev);
    bm.writeLockZero(2, btreeNodeValidator).writeUInt32LE(2, 4); // LEAF_NODE
    await bm.flush();

    const fresh = new BlockManager(dev);
    await fresh.read(2, btreeNodeValidator);
    await expectErrno(fresh.read(2, plainValidator("other")), "EINVAL");

    const raw = Buffer.from(await new BlockManager(dev).read(2, null));
    raw[100] = 0xff;
    const corrupt = new MemoryDevice(64 * 8);
    const cbm = new BlockManager(corrupt);
    cbm.writeLockZero(2, plainValidator("raw")).set(raw);
    cbm.writeLockZero(7, plainValidator("raw")).set(await new BlockManager(dev).read(2, null));
    await cbm.flush();
    await expectErrno(new BlockManager(corrupt).read(2, btreeNodeValidator), "EILSEQ");
    await expectErrno(new BlockManager(corrupt).read(7, btreeNodeValidator), "ENOTBLK");
  });

  it("reads beyond the device fail with EIO, writes with ENOSPC; read-only refuses writes with EPERM", async () => {
    const bm = new BlockManager(new MemoryDevice(4 * 8 + 7));
    expect(bm.nrBlocks).toBe(4);
    await expectErrno(bm.read(4, null), "EIO");
    expect(() => bm.writeLockZero(4, plainValidator("x"))).toThrow(PersistentDataError);
    bm.readOnly = true;
    await expectErrno(bm.writeLock(1, plainValidator("x")), "EPERM");
  });

  it("a write error fails the commit with EIO, writes no superblock, and a retry succeeds", async () => {
    const dev = new ControlledDevice(64 * 8, { volatileCache: true });
    const bm = new BlockManager(dev);
    const v = plainValidator("test");
    bm.writeLockZero(0, v).fill(7);
    bm.writeLockZero(3, v).fill(7);
    dev.failNext((bio) => bio.op === "write" && bio.sector === 3 * 8);
    await expectErrno(bm.commit(0), "EIO");
    expect(dev.log.some((r) => r.op === "write" && r.sector === 0)).toBe(false);
    expect(bm.dirtyBlocks).toBe(2);
    await bm.commit(0);
    expect(bm.dirtyBlocks).toBe(0);
    expect(dev.crash().readSync(3 * 8, 8)[0]).toBe(7);
  });

  it("clean blocks beyond the cache limit are dropped and read again; dirty ones stay", async () => {
    const dev = new MemoryDevice(64 * 8);
    const bm = new BlockManager(dev, { maxCleanBlocks: 2 });
    const v = plainValidator("test");
    for (let b = 1; b <= 5; b++) bm.writeLockZero(b, v).fill(b);
    await bm.flush();
    const reads = bm.stats.reads;
    for (let b = 1; b <= 5; b++) expect((await bm.read(b, v))[0]).toBe(b);
    expect(bm.stats.reads).toBeGreaterThan(reads);
    bm.writeLockZero(9, v).fill(9);
    for (let b = 1; b <= 5; b++) await bm.read(b, v);
    expect(bm.peek(9, v)?.[0]).toBe(9);
  });
});

describe("transaction manager", () => {
  async function fresh() {
    const dev = new MemoryDevice(256 * 8);
    const bm = new BlockManager(dev);
    const tm = new TransactionManager(bm);
    const sm = await MetadataSpaceMap.create(tm, bm.nrBlocks, 0);
    return { bm, tm, sm };
  }

  it("a block is copied once per transaction; the copy is written in place after that", async () => {
    const { tm, sm } = await fresh();
    const v = plainValidator("test");
    const { location: orig, data } = await tm.newBlock(v);
    data.fill(0x5a);
    // A new block counts as a shadow already.
    expect((await tm.shadow(orig, v)).location).toBe(orig);

    await sm.commit();
    tm.reset(); // a new transaction, as after tm.commit
    const s1 = await tm.shadow(orig, v);
    expect(s1.location).not.toBe(orig);
    expect(s1.incChildren).toBe(false);
    expect(s1.data[100]).toBe(0x5a);
    expect(await sm.getCount(orig)).toBe(0);
    expect(await sm.getCount(s1.location)).toBe(1);
    const s2 = await tm.shadow(s1.location, v);
    expect(s2.location).toBe(s1.location);
  });

  it("a shared block is copied even in its own transaction, and the caller is told to take references on its children", async () => {
    const { tm, sm } = await fresh();
    const v = plainValidator("test");
    const { location } = await tm.newBlock(v);
    await tm.inc(location);
    const s = await tm.shadow(location, v);
    expect(s.location).not.toBe(location);
    expect(s.incChildren).toBe(true);
    expect(await sm.getCount(location)).toBe(1);
  });

  it("a block freed in a transaction is not handed out again before the commit", async () => {
    const { tm, sm } = await fresh();
    const v = plainValidator("test");
    const { location } = await tm.newBlock(v);
    await sm.commit();
    tm.reset();
    await tm.dec(location);
    const again: number[] = [];
    for (let i = 0; i < 20; i++) again.push((await tm.newBlock(v)).location);
    expect(again).not.toContain(location);
    await sm.commit();
    tm.reset();
    const after: number[] = [];
    for (let i = 0; i < 20; i++) after.push((await tm.newBlock(v)).location);
    expect(after).toContain(location);
  });
});
