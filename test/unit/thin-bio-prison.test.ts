/**
 * The thin pool's bio prison and deferred set (dm-bio-prison-v1.c): which bio holds a cell and
 * which wait in it, range keys, release order, promotion; work that waits only for the I/O in
 * flight when it was added.
 */
import { describe, expect, it } from "vitest";
import { Bio, type BioStatus } from "../../core/bio.js";
import { BioPrison, dataKey, virtualKey } from "../../targets/thin/bio-prison.js";
import { DeferredSet } from "../../targets/thin/deferred-set.js";

const bio = (sector: number) => new Bio("write", sector, 8, Buffer.alloc(4096), 0, null);

describe("bio prison", () => {
  it("the first bio holds a block's cell; later ones to any overlapping range wait in it, released holder first", () => {
    const prison = new BioPrison();
    const [a, b, c, d] = [bio(0), bio(8), bio(16), bio(24)];
    const held = prison.detain(virtualKey(1, 5), a);
    expect(held.existed).toBe(false);
    expect(prison.detain(virtualKey(1, 5), b)).toEqual({ cell: held.cell, existed: true });
    // A discard's range over blocks 0..9 lands in the same cell.
    expect(prison.detain(virtualKey(1, 0, 10), c).cell).toBe(held.cell);
    // Other devices, other blocks, the data device: separate cells.
    expect(prison.detain(virtualKey(2, 5), d).existed).toBe(false);
    expect(prison.detain(virtualKey(1, 6), null).existed).toBe(false);
    expect(prison.detain(dataKey(5), null).existed).toBe(false);
    expect(prison.size).toBe(4);
    expect(prison.release(held.cell)).toEqual([a, b, c]);
    expect(prison.detain(virtualKey(1, 5), null).existed).toBe(false);
  });

  it("ranges that do not overlap are separate cells, whatever the order they come in", () => {
    const prison = new BioPrison();
    const cells = [
      prison.detain(virtualKey(1, 20, 30), null),
      prison.detain(virtualKey(1, 0, 10), null),
      prison.detain(virtualKey(1, 10, 20), null),
    ];
    expect(cells.map((c) => c.existed)).toEqual([false, false, false]);
    expect(prison.detain(virtualKey(1, 19), null).cell).toBe(cells[2]!.cell);
    expect(prison.detain(virtualKey(1, 29, 40), null).cell).toBe(cells[0]!.cell);
    expect(prison.detain(virtualKey(1, 30), null).existed).toBe(false);
  });

  it("release without the holder, promotion of the next waiter, errors for everyone", () => {
    const prison = new BioPrison();
    const [a, b, c] = [bio(0), bio(8), bio(16)];
    const { cell } = prison.detain(dataKey(3), a);
    prison.detain(dataKey(3), b);
    prison.detain(dataKey(3), c);
    expect(prison.promoteOrRelease(cell)).toBe(false);
    expect(cell.holder).toBe(b);
    expect(prison.releaseNoHolder(cell)).toEqual([c]);
    expect(prison.size).toBe(0);

    const done: BioStatus[] = [];
    const endIo = { bioDone: (x: Bio) => done.push(x.status) };
    const [x, y] = [bio(0), bio(8)];
    for (const v of [x, y]) {
      v.endIo = endIo;
      v.markInFlight();
    }
    const second = prison.detain(dataKey(3), x).cell;
    prison.detain(dataKey(3), y);
    prison.error(second, "EIO");
    expect(done).toEqual(["EIO", "EIO"]);
    expect(prison.promoteOrRelease(prison.detain(dataKey(4), null).cell)).toBe(true);
    expect(prison.size).toBe(0);
  });
});

describe("deferred set", () => {
  it("runs work at once when nothing is in flight", () => {
    const ds = new DeferredSet<string>();
    expect(ds.addWork("now")).toBe(false);
  });

  it("work waits for the I/O in flight when it was added, not for I/O started after", () => {
    const ds = new DeferredSet<string>();
    const r1 = ds.inc();
    const r2 = ds.inc();
    expect(ds.addWork("w1")).toBe(true);
    const later = ds.inc(); // started after w1: w1 does not wait for it
    expect(ds.addWork("w2")).toBe(true);
    expect(ds.dec(r1)).toEqual([]);
    expect(ds.dec(r2)).toEqual(["w1"]);
    expect(ds.dec(later)).toEqual(["w2"]);
    expect(ds.addWork("w3")).toBe(false);
  });

  it("keeps order across many generations", () => {
    const ds = new DeferredSet<number>();
    const entries = Array.from({ length: 100 }, (_, i) => {
      const e = ds.inc();
      expect(ds.addWork(i)).toBe(true);
      return e;
    });
    const ran: number[] = [];
    // Ending the I/O in reverse holds everything until the first one ends.
    for (const e of entries.slice(1).reverse()) ran.push(...ds.dec(e));
    expect(ran).toEqual([]);
    ran.push(...ds.dec(entries[0]!));
    expect(ran).toEqual(Array.from({ length: 100 }, (_, i) => i));
  });
});
