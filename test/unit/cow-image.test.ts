/**
 * The COW image reader: hand-built images laid out as docs/snapshot.md ("On-disk format")
 * describes, images written by the persistent store, and damaged images.
 */
import { describe, expect, it } from "vitest";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { describeCowImage, readCowImage } from "../../targets/snapshot/cow-image.js";
import { createExceptionStore } from "../../targets/snapshot/store.js";
import { ControlledDevice } from "../../testing/controlled-device.js";

/** A cs=1 image (512-byte chunks, E=32, area k at chunk 1 + 33k) of `sectors` sectors. */
function image(sectors: number, header: [number, number, number, number], areas: [number, number][][]): Buffer {
  const buf = Buffer.alloc(sectors * 512);
  header.forEach((v, i) => buf.writeUInt32LE(v, 4 * i));
  areas.forEach((records, k) => {
    records.forEach(([o, n], j) => {
      const at = (1 + 33 * k) * 512 + 16 * j;
      buf.writeBigUInt64LE(BigInt(o), at);
      buf.writeBigUInt64LE(BigInt(n), at + 8);
    });
  });
  return buf;
}

const SNAP = 0x70416e53;

describe("readCowImage / describeCowImage", () => {
  it("parses a hand-built image and dumps it", async () => {
    const buf = image(
      64,
      [SNAP, 1, 1, 1],
      [
        [
          [5, 2],
          [9, 3],
        ],
      ],
    );
    const img = await readCowImage(buf);
    expect(img).toMatchObject({
      state: "valid",
      chunkSize: 1,
      exceptionsPerArea: 32,
      areas: [{ index: 0, chunk: 1, records: 2, full: false }],
      records: [
        { area: 0, slot: 0, oldChunk: 5, newChunk: 2 },
        { area: 0, slot: 1, oldChunk: 9, newChunk: 3 },
      ],
      nextFree: 4,
      usage: { total: 64, allocated: 4, metadata: 2 },
      problems: [],
    });
    expect(describeCowImage(img)).toBe(
      [
        "COW image: 64 sectors (32768 bytes)",
        'header: magic 0x70416e53 "SnAp", valid 1, version 1, chunk size 1 sectors',
        "state: valid",
        "layout: 512-byte chunks, 32 exceptions per area, area k at chunk 1 + 33·k",
        "area 0 at chunk 1: 2 record(s)",
        "exceptions: 2",
        "    area   slot        old_chunk        new_chunk",
        "       0      0                5                2",
        "       0      1                9                3",
        "next free chunk 4; current area 0 with 2 record(s)",
        "usage: 4/64 2",
        "problems: none",
        "",
      ].join("\n"),
    );
    const dev = new ControlledDevice(64);
    dev.writeSync(0, buf);
    expect(await readCowImage(dev)).toEqual(img);
  });

  it("recognises a new (zeroed) device", async () => {
    const img = await readCowImage(Buffer.alloc(4096));
    expect([img.state, img.records, img.problems]).toEqual(["new", [], []]);
    expect(describeCowImage(img)).toContain("(none: new store)");
  });

  it("lists what the persistent store wrote, area by area, with the store's own numbers", async () => {
    const dev = new MemoryDevice(256);
    const { store } = createExceptionStore(["P", "1"], dev);
    await store.readMetadata(() => {});
    const news = Array.from({ length: 40 }, () => store.prepareException()!);
    await Promise.all(news.map((n, i) => new Promise((resolve) => store.commitException(100 + i, n, true, resolve))));
    const img = await readCowImage(dev);
    expect(img.areas).toEqual([
      { index: 0, chunk: 1, records: 32, full: true },
      { index: 1, chunk: 34, records: 8, full: false },
    ]);
    expect(img.records.map((r) => [r.area, r.slot, r.oldChunk, r.newChunk])).toEqual(
      news.map((n, i) => [i < 32 ? 0 : 1, i % 32, 100 + i, n]),
    );
    expect(img.usage).toEqual(store.usage());
    expect(img.nextFree).toBe(store.prepareException());
    expect(img.problems).toEqual([]);
    const text = describeCowImage(img, { maxRecords: 2 });
    expect(text).toContain("area 0 at chunk 1: 32 record(s), full\narea 1 at chunk 34: 8 record(s)\n");
    expect(text).toContain("  ... 38 more\n");
  });

  it("reports headers the kernel refuses", async () => {
    const problems = async (h: [number, number, number, number]) => (await readCowImage(image(64, h, []))).problems;
    expect(await problems([0xdeadbeef, 1, 1, 8])).toEqual(["bad magic 0xdeadbeef: Invalid or corrupt snapshot"]);
    expect(await problems([SNAP, 1, 2, 8])).toEqual(["unable to handle snapshot disk version 2"]);
    expect(await problems([SNAP, 1, 1, 12])).toEqual([
      "invalid on-disk chunk size 12: Chunk size is not a power of 2.",
    ]);
    expect(await problems([SNAP, 1, 1, 0])).toEqual(["invalid on-disk chunk size 0: Chunk size is not a power of 2."]);
  });

  it("still lists the records of an invalidated snapshot", async () => {
    const img = await readCowImage(image(64, [SNAP, 0, 1, 1], [[[1, 2]]]));
    expect(img.state).toBe("invalid");
    expect(img.records).toHaveLength(1);
    expect(img.problems).toEqual(["snapshot is marked invalid (the kernel does not load its exceptions)"]);
  });

  it("flags suspicious records and a missing next area", async () => {
    const full = Array.from({ length: 32 }, (_, j): [number, number] => [j, j + 2]);
    full[3] = [1, 5]; // old chunk 1 twice
    full[4] = [50, 34]; // 34 is area 1's chunk
    full[5] = [51, 3]; // new chunk 3 twice
    full[6] = [52, 99]; // beyond the 34-chunk device
    const img = await readCowImage(image(34, [SNAP, 1, 1, 1], [full]));
    expect(img.problems).toEqual([
      "area 0 slot 3: old chunk 1 has two exceptions",
      "area 0 slot 4: new chunk 34 is a metadata chunk",
      "area 0 slot 4: new chunk 34 is beyond the end of the device (34 chunks)",
      "area 0 slot 5: new chunk 3 is used twice",
      "area 0 slot 6: new chunk 99 is beyond the end of the device (34 chunks)",
      "area 1 (chunk 34) lies beyond the end of the image: the kernel's load would fail",
    ]);
    expect(describeCowImage(img)).toContain("problems (6):\n  area 0 slot 3");
  });
});
