/**
 * The thin pool metadata (targets/thin/metadata): the superblock format writes, the kernel's
 * refusals and their errnos, how snapshots share data blocks (counts move only when a leaf is
 * copied), what a commit writes and in which order, the non-blocking lookup, running out of data
 * and of metadata space, abort, needs_check, resizing.
 */
import { describe, expect, it } from "vitest";
import { BioFlags, readBio, submitAndWait, writeBio } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { checkPoolMetadata } from "../../targets/thin/metadata/check.js";
import { SB, THIN_SUPERBLOCK_MAGIC } from "../../targets/thin/metadata/superblock.js";
import { ThinPoolMetadata, WOULD_BLOCK } from "../../targets/thin/metadata/thin-metadata.js";
import { PersistentDataError } from "../../targets/thin/persistent-data/errors.js";
import { ControlledDevice } from "../../testing/controlled-device.js";

const MiB = 2048; // sectors

async function errnoOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return "ok";
  } catch (err) {
    if (err instanceof PersistentDataError) return err.errno;
    throw err;
  }
}

async function readBlock0(dev: BlockDevice): Promise<Buffer> {
  const buf = Buffer.alloc(4096);
  await submitAndWait(dev, readBio(0, buf));
  return buf;
}

async function pool(sectors = 8 * MiB, dataBlocks = 1000) {
  const dev = new ControlledDevice(sectors, { volatileCache: true });
  const pmd = await ThinPoolMetadata.open(dev, { dataBlockSize: 128, format: true });
  await pmd.resizeDataDev(dataBlocks);
  await pmd.commit();
  return { dev, pmd };
}

/** Map `count` blocks from `first` on device `id`, each to a newly allocated data block. */
async function mapBlocks(pmd: ThinPoolMetadata, id: number, first: number, count: number): Promise<number[]> {
  const td = await pmd.openThin(id);
  const blocks: number[] = [];
  try {
    for (let v = first; v < first + count; v++) {
      const b = await pmd.allocDataBlock();
      await td.insertBlock(v, b);
      blocks.push(b);
    }
  } finally {
    td.close();
  }
  return blocks;
}

async function counts(pmd: ThinPoolMetadata, blocks: number[]): Promise<number[]> {
  const out: number[] = [];
  for (const b of blocks) out.push(await pmd.dataBlockCount(b));
  return out;
}

describe("format and open", () => {
  it("writes the kernel's superblock: magic, version 2, block sizes, the metadata device's size", async () => {
    const dev = new MemoryDevice(4 * MiB + 5);
    const pmd = await ThinPoolMetadata.open(dev, { dataBlockSize: 256, format: true });
    const raw = await readBlock0(dev);
    expect(raw.readUInt32LE(SB.magic)).toBe(THIN_SUPERBLOCK_MAGIC);
    expect(raw.readUInt32LE(SB.version)).toBe(2);
    expect(raw.readUInt32LE(SB.dataBlockSize)).toBe(256);
    expect(raw.readUInt32LE(SB.metadataBlockSize)).toBe(8);
    expect(raw.readUInt32LE(SB.metadataNrBlocks)).toBe(1024);
    expect([raw.readUInt32LE(SB.time), raw.readBigUInt64LE(SB.transId), raw.readBigUInt64LE(SB.heldRoot)]).toEqual([
      0,
      0n,
      0n,
    ]);
    expect([pmd.dataDevSize(), pmd.metadataDevSize(), pmd.dataBlockSize]).toEqual([0, 1024, 256]);
    expect((await checkPoolMetadata(dev)).errors).toEqual([]);
  });

  it("refuses an unformatted device unless asked to format, another data block size, unknown incompatible features", async () => {
    const dev = new MemoryDevice(4 * MiB);
    expect(await errnoOf(ThinPoolMetadata.open(dev, { dataBlockSize: 128 }))).toBe("EPERM");
    await (await ThinPoolMetadata.open(dev, { dataBlockSize: 128, format: true })).close();
    const err = await ThinPoolMetadata.open(dev, { dataBlockSize: 64 }).catch((e: unknown) => e);
    expect((err as Error).message).toBe("changing the data block size (from 128 to 64) is not supported");
    expect((await ThinPoolMetadata.open(dev)).dataBlockSize).toBe(128);

    const raw = await readBlock0(dev);
    raw.writeUInt32LE(4, SB.incompatFlags);
    // Re-seal the checksum the way the superblock validator would.
    const { superblockValidator } = await import("../../targets/thin/metadata/superblock.js");
    superblockValidator.prepareForWrite(raw, 0);
    await submitAndWait(dev, writeBio(0, raw));
    expect(await errnoOf(ThinPoolMetadata.open(dev, { dataBlockSize: 128 }))).toBe("EINVAL");
  });
});

describe("refusals", () => {
  it("returns the kernel's errnos", async () => {
    const { pmd } = await pool();
    await pmd.createThin(1);
    expect(await errnoOf(pmd.createThin(1))).toBe("EEXIST"); // not committed yet
    await pmd.commit();
    expect(await errnoOf(pmd.createThin(1))).toBe("EEXIST");
    expect(await errnoOf(pmd.createThin(1 << 24))).toBe("EINVAL");
    expect(await errnoOf(pmd.createSnap(2, 9))).toBe("ENODATA");
    expect(await errnoOf(pmd.createSnap(1, 1))).toBe("EEXIST");
    expect(await errnoOf(pmd.deleteThin(9))).toBe("ENODATA");
    expect(await errnoOf(pmd.openThin(9))).toBe("ENODATA");
    const td = await pmd.openThin(1);
    expect(await errnoOf(pmd.deleteThin(1))).toBe("EBUSY");
    expect(await errnoOf(td.removeBlock(5))).toBe("ENODATA");
    expect(await errnoOf(pmd.close())).toBe("EBUSY");
    td.close();
    expect(await errnoOf(pmd.setTransactionId(3n, 4n))).toBe("EINVAL");
    await pmd.setTransactionId(0n, 2n ** 64n - 1n);
    expect(pmd.transactionId).toBe(2n ** 64n - 1n);
    expect(await errnoOf(pmd.releaseMetadataSnap())).toBe("EINVAL");
    await pmd.reserveMetadataSnap();
    expect(await errnoOf(pmd.reserveMetadataSnap())).toBe("EBUSY");
    await pmd.deleteThin(1);
    await pmd.close();
  });

  it("a device created and deleted in one transaction leaves nothing behind", async () => {
    const { dev, pmd } = await pool();
    await pmd.createThin(4);
    await mapBlocks(pmd, 4, 0, 10);
    await pmd.deleteThin(4);
    await pmd.commit();
    expect(await pmd.deviceIds()).toEqual([]);
    expect(pmd.freeDataBlocks()).toBe(1000);
    expect((await checkPoolMetadata(dev)).errors).toEqual([]);
  });
});

describe("snapshots", () => {
  it("share the origin's tree; a data block's count rises only when a leaf holding it is copied", async () => {
    const { dev, pmd } = await pool();
    await pmd.createThin(1);
    const blocks = await mapBlocks(pmd, 1, 0, 300); // two leaves
    await pmd.createSnap(2, 1);
    expect(await counts(pmd, [blocks[0]!, blocks[299]!])).toEqual([1, 1]);
    const origin = await pmd.openThin(1);
    const snap = await pmd.openThin(2);
    expect(await origin.findBlock(0)).toEqual({ block: blocks[0], shared: true });
    expect(await snap.findBlock(299)).toEqual({ block: blocks[299], shared: true });

    // A write to the origin's first leaf copies that leaf: its blocks are now held twice.
    const fresh = await pmd.allocDataBlock();
    await origin.insertBlock(0, fresh);
    expect(await origin.findBlock(0)).toEqual({ block: fresh, shared: false });
    expect(await snap.findBlock(0)).toEqual({ block: blocks[0], shared: true });
    expect(await counts(pmd, [blocks[0]!, blocks[1]!, fresh])).toEqual([1, 2, 1]);
    expect([origin.mappedBlocks, snap.mappedBlocks]).toEqual([300, 300]);
    origin.close();
    snap.close();

    await pmd.deleteThin(1);
    expect(await counts(pmd, [blocks[0]!, blocks[1]!, blocks[299]!, fresh])).toEqual([1, 1, 1, 0]);
    await pmd.deleteThin(2);
    await pmd.commit();
    expect(pmd.freeDataBlocks()).toBe(1000);
    expect((await checkPoolMetadata(dev)).errors).toEqual([]);
  });
});

describe("commit", () => {
  it("writes the new blocks, flushes, then the superblock alone with FUA; without a change only the superblock", async () => {
    const { dev, pmd } = await pool();
    await pmd.createThin(1);
    await mapBlocks(pmd, 1, 0, 50);
    const start = dev.log.length;
    await pmd.commit();
    const writes = dev.log.slice(start).filter((r) => r.op !== "read");
    const last = writes.at(-1)!;
    expect([last.op, last.sector, last.sectors, last.flags]).toEqual(["write", 0, 8, BioFlags.FUA]);
    expect(writes.at(-2)!.op).toBe("flush");
    expect(writes.slice(0, -2).every((r) => r.op === "write" && r.sector > 0 && r.flags === 0)).toBe(true);
    expect(dev.unflushed()).toEqual([]);

    const quiet = dev.log.length;
    await pmd.commit();
    expect(dev.log.slice(quiet).map((r) => [r.op, r.sector, r.flags])).toEqual([
      ["flush", 0, BioFlags.PREFLUSH],
      ["write", 0, BioFlags.FUA],
    ]);
  });

  it("after a commit the data blocks freed by it can be allocated again, not before", async () => {
    const { pmd } = await pool(8 * MiB, 10);
    await pmd.createThin(1);
    const blocks = await mapBlocks(pmd, 1, 0, 10);
    expect(await errnoOf(pmd.allocDataBlock())).toBe("ENOSPC");
    await pmd.commit();
    const td = await pmd.openThin(1);
    await td.removeBlock(3);
    expect(pmd.freeDataBlocks()).toBe(1);
    expect(await errnoOf(pmd.allocDataBlock())).toBe("ENOSPC");
    await pmd.commit();
    expect(await pmd.allocDataBlock()).toBe(blocks[3]);
    td.close();
  });
});

describe("lookups", () => {
  it("the non-blocking lookup answers from memory only, and never while a change is running", async () => {
    const { dev, pmd } = await pool();
    await pmd.createThin(1);
    const [b0] = await mapBlocks(pmd, 1, 0, 1);
    await pmd.close();

    const reopened = await ThinPoolMetadata.open(dev, { dataBlockSize: 128 });
    const td = await reopened.openThin(1);
    // Only the superblock and the details are in memory: the mapping tree would need reads.
    expect(td.tryFindBlock(0)).toBe(WOULD_BLOCK);
    expect(await td.findBlock(0)).toEqual({ block: b0, shared: false });
    expect(td.tryFindBlock(0)).toEqual({ block: b0, shared: false });
    expect(td.tryFindBlock(1)).toBeUndefined();

    await td.insertBlock(1, await reopened.allocDataBlock());
    dev.hold((bio) => bio.op === "write" && bio.sector === 0);
    const committing = reopened.commit();
    await dev.waitForHeld(1);
    expect(td.tryFindBlock(0)).toBe(WOULD_BLOCK);
    dev.releaseAll();
    await committing;
    expect(td.tryFindBlock(0)).toEqual({ block: b0, shared: false });
    td.close();
  });

  it("ranges, the highest mapped block, range removal", async () => {
    const { dev, pmd } = await pool();
    await pmd.createThin(1);
    const blocks = await mapBlocks(pmd, 1, 100, 400);
    const td = await pmd.openThin(1);
    expect(await td.findMappedRange(0, 1000)).toEqual({
      thinBegin: 100,
      thinEnd: 500,
      poolBegin: blocks[0],
      maybeShared: false,
    });
    expect(await td.findMappedRange(0, 100)).toBeUndefined();
    expect(await td.highestMappedBlock()).toBe(499);
    await td.removeRange(150, 480);
    expect(td.mappedBlocks).toBe(70);
    expect(await td.findMappedRange(140, 1000)).toEqual({
      thinBegin: 140,
      thinEnd: 150,
      poolBegin: blocks[40],
      maybeShared: false,
    });
    expect(await td.findMappedRange(150, 1000)).toMatchObject({ thinBegin: 480, thinEnd: 500 });
    await td.removeRange(480, 1000);
    expect(await td.highestMappedBlock()).toBe(149);
    td.close();
    await pmd.commit();
    expect((await checkPoolMetadata(dev)).errors).toEqual([]);
  });
});

describe("failures", () => {
  it("metadata exhaustion fails with ENOSPC; abort returns to the last commit, which stays consistent", async () => {
    const { dev, pmd } = await pool(64 * 8, 100_000); // 64 metadata blocks
    await pmd.createThin(1);
    await mapBlocks(pmd, 1, 0, 200);
    await pmd.commit();
    let failed = "ok";
    let v = 10_000;
    const td = await pmd.openThin(1);
    for (; failed === "ok" && v < 5_000_000; v += 37) {
      failed = await errnoOf(pmd.allocDataBlock().then((b) => td.insertBlock(v, b)));
    }
    expect(failed).toBe("ENOSPC");
    expect(pmd.freeMetadataBlocks()).toBe(0);
    await pmd.abort();
    expect(td.mappedBlocks).toBe(200);
    expect(td.abortedWithChanges).toBe(true);
    expect(await td.findBlock(10_000)).toBeUndefined();
    expect(await td.findBlock(199)).toMatchObject({ shared: false });
    td.close();
    expect((await checkPoolMetadata(dev)).errors).toEqual([]);
    // The pool goes on after the abort.
    await mapBlocks(pmd, 1, 200, 5);
    await pmd.commit();
    expect((await checkPoolMetadata(dev)).errors).toEqual([]);
  });

  it("a metadata write error fails the commit; abort brings back the previous transaction", async () => {
    const { dev, pmd } = await pool();
    await pmd.createThin(1);
    await pmd.commit();
    await mapBlocks(pmd, 1, 0, 20);
    dev.failNext((bio) => bio.op === "write" && bio.sector > 0);
    expect(await errnoOf(pmd.commit())).toBe("EIO");
    await pmd.abort();
    const td = await pmd.openThin(1);
    expect([td.mappedBlocks, await td.findBlock(0)]).toEqual([0, undefined]);
    td.close();
    expect((await checkPoolMetadata(dev.crash())).errors).toEqual([]);
  });

  it("needs_check is kept in the superblock's flags", async () => {
    const { dev, pmd } = await pool();
    expect(pmd.needsCheck).toBe(false);
    await pmd.setNeedsCheck();
    await pmd.commit();
    expect((await readBlock0(dev)).readUInt32LE(SB.flags)).toBe(1);
    expect((await ThinPoolMetadata.open(dev)).needsCheck).toBe(true);
  });
});

describe("resizing", () => {
  it("grows the data and metadata space maps, never shrinks them, and calls the metadata threshold once", async () => {
    const device = new MemoryDevice(4 * MiB);
    const pmd = await ThinPoolMetadata.open(device, { dataBlockSize: 128, format: true });
    await pmd.resizeDataDev(100);
    expect(await errnoOf(pmd.resizeDataDev(50))).toBe("EINVAL");
    await pmd.resizeDataDev(40_000); // three bitmaps
    expect(pmd.freeDataBlocks()).toBe(40_000);

    device.resize(80 * MiB); // past one metadata bitmap (16320 blocks)
    await pmd.resizeMetadataDev(device.sizeSectors / 8);
    await pmd.commit();
    expect(pmd.metadataDevSize()).toBe(20 * 1024);
    expect(await errnoOf(pmd.resizeMetadataDev(10))).toBe("EINVAL");
    expect((await checkPoolMetadata(device)).errors).toEqual([]);

    let calls = 0;
    pmd.registerMetadataThreshold(pmd.freeMetadataBlocks() + 2048 - 5, () => calls++);
    await pmd.createThin(1);
    await mapBlocks(pmd, 1, 0, 300);
    expect(calls).toBe(1);
    await pmd.commit();
    expect((await checkPoolMetadata(device)).errors).toEqual([]);
  });
});
