/**
 * The transient exception store ("N", dm-snap-transient.c): no metadata, chunks from 0, usage in
 * sectors, immediate commit callbacks, chunk size 0 kept as 0 (B5).
 */
import { describe, expect, it } from "vitest";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { createExceptionStore } from "../../targets/snapshot/store.js";
import { ControlledDevice } from "../../testing/controlled-device.js";

const transient = (cow: MemoryDevice | ControlledDevice, type = "N", chunk = "8") =>
  createExceptionStore([type, chunk], cow).store;

describe("transient exception store", () => {
  it("is chosen by N (any case, extra letters ignored) and prints ' N <cs>'", () => {
    for (const type of ["N", "n", "Nonpersistent", "NO"]) {
      const store = transient(new MemoryDevice(64), type, "16");
      expect([store.kind, store.statusTable(), store.userspaceSupportsOverflow]).toEqual(["transient", " N 16", false]);
    }
  });

  it("loads nothing and does no I/O, not even to invalidate", async () => {
    const cow = new ControlledDevice(1024);
    const store = transient(cow);
    const found: number[] = [];
    expect(await store.readMetadata((o) => found.push(o))).toBe("valid");
    await store.dropSnapshot();
    await store.drain();
    expect([found, cow.log]).toEqual([[], []]);
    expect(store.prepareMerge).toBeUndefined();
    expect(store.commitMerge).toBeUndefined();
  });

  it("allocates chunks from 0 until the next whole chunk no longer fits", async () => {
    const cow = new MemoryDevice(3 * 8 + 5);
    const store = transient(cow);
    await store.readMetadata(() => {});
    expect(store.usage()).toEqual({ total: 29, allocated: 0, metadata: 0 });
    expect([store.prepareException(), store.prepareException(), store.prepareException()]).toEqual([0, 1, 2]);
    expect(store.prepareException()).toBeNull();
    expect(store.usage()).toEqual({ total: 29, allocated: 24, metadata: 0 });
  });

  it("reports status numbers next_free/total 0", async () => {
    const store = transient(new MemoryDevice(2097152));
    for (let i = 0; i < 5; i++) store.prepareException();
    const u = store.usage();
    expect(`${u.allocated}/${u.total} ${u.metadata}`).toBe("40/2097152 0");
  });

  it("calls back at once with the valid flag", () => {
    const store = transient(new MemoryDevice(64));
    const n = store.prepareException()!;
    const calls: boolean[] = [];
    store.commitException(7, n, true, (ok) => calls.push(ok));
    store.commitException(8, store.prepareException()!, false, (ok) => calls.push(ok));
    expect(calls).toEqual([true, false]);
  });

  it("B5: a chunk size of 0 stays 0 after readMetadata (the snapshot ctr fails 'Chunk size not set')", async () => {
    const store = transient(new MemoryDevice(64), "N", "0");
    expect(await store.readMetadata(() => {})).toBe("valid");
    expect(store.chunkSize).toBe(0);
    expect(store.prepareException()).toBeNull();
  });
});
