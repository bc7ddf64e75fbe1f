/**
 * snapshot-origin + snapshot over RAM disks: point-in-time reads, snapshot writes, status lines,
 * constructor errors, persistence across reactivation.
 */
import { describe, expect, it } from "vitest";
import { SECTOR_SIZE } from "../../index.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";

const CS = 8; // 4 KiB chunks

async function setup(store = "P", cowSectors = 4096) {
  const { dm, backing } = testMapper();
  const originDev = backing.memory("origin", 2048);
  backing.memory("cow", cowSectors);
  await dm.create("base", { table: "0 2048 snapshot-origin origin" });
  const base = dm.open("base");
  await base.write(0, pattern(1, 2048 * SECTOR_SIZE));
  await dm.suspend("base");
  await dm.create("snap", { table: `0 2048 snapshot origin cow ${store} ${CS}` });
  await dm.resume("base");
  return { dm, backing, base, snap: dm.open("snap"), originDev };
}

describe("snapshot basics", () => {
  it("the snapshot keeps the origin's data as it was when it was created", async () => {
    const { dm, base, snap } = await setup();
    const before = pattern(1, 2048 * SECTOR_SIZE);
    await base.write(16, pattern(2, 4 * CS * SECTOR_SIZE));
    await base.write(100, pattern(3, 512));
    expect((await snap.read(0, 2048)).equals(before)).toBe(true);
    const now = await base.read(16, 4 * CS);
    expect(now.equals(pattern(2, 4 * CS * SECTOR_SIZE))).toBe(true);
    // 5 chunks copied (2..5 and 12), after header + area 0.
    expect(dm.status("snap")[0]!.params).toBe(`${(2 + 5) * CS}/4096 ${2 * CS}`);
    expect(dm.tableText("snap")).toBe(`0 2048 snapshot origin cow P ${CS}\n`);
    expect(dm.tableText("base")).toBe("0 2048 snapshot-origin origin\n");
  });

  it("snapshot writes go to the COW device and leave the origin alone", async () => {
    const { base, snap } = await setup();
    await snap.write(8, pattern(4, CS * SECTOR_SIZE)); // whole chunk: no copy needed
    await snap.write(40, pattern(5, 512)); // partial chunk: copy, then write
    expect((await snap.read(8, CS)).equals(pattern(4, CS * SECTOR_SIZE))).toBe(true);
    const chunk5 = Buffer.from(pattern(1, 2048 * SECTOR_SIZE).subarray(40 * 512, 48 * 512));
    pattern(5, 512).copy(chunk5, 0);
    expect((await snap.read(40, CS)).equals(chunk5)).toBe(true);
    expect((await base.read(0, 2048)).equals(pattern(1, 2048 * SECTOR_SIZE))).toBe(true);
  });

  it("reactivation reloads every exception from the persistent store", async () => {
    const { dm, base, snap } = await setup();
    await base.write(0, pattern(6, 64 * SECTOR_SIZE));
    await snap.close();
    await dm.remove("snap");
    await dm.create("snap2", { table: `0 2048 snapshot origin cow P 0` }); // chunk size from the header
    const again = dm.open("snap2");
    expect((await again.read(0, 2048)).equals(pattern(1, 2048 * SECTOR_SIZE))).toBe(true);
    expect(dm.tableText("snap2")).toBe(`0 2048 snapshot origin cow P ${CS}\n`);
  });

  it("constructor errors use the kernel's strings", async () => {
    const { dm, backing } = testMapper();
    backing.memory("o", 100);
    backing.memory("c", 100);
    const err = (t: string) =>
      dm.create("x", { table: t }).then(
        () => "created",
        (e: Error) => e.message,
      );
    expect(await err("0 100 snapshot o c P")).toBe("snapshot: requires 4 or more arguments");
    expect(await err("0 100 snapshot o o P 8")).toBe("snapshot: COW device cannot be the same as origin device");
    expect(await err("0 100 snapshot o c N 0")).toBe("snapshot: Chunk size not set");
    expect(await err("0 100 snapshot o c P 6")).toBe("snapshot: Couldn't create exception store");
    expect(await err("0 100 snapshot o c X 8")).toBe("snapshot: Couldn't create exception store");
    expect(await err("0 100 snapshot o c P 8 1 bogus")).toBe("snapshot: Unrecognised feature requested");
    expect(await err("0 100 snapshot o c P 8 1 discard_passdown_origin")).toBe(
      "snapshot: discard_passdown_origin feature depends on discard_zeroes_cow",
    );
    expect(await err("0 100 snapshot-origin o c")).toBe("snapshot-origin: origin: incorrect number of arguments");
    expect(dm.list()).toEqual([]);
  });

  it("transient snapshots work the same without metadata", async () => {
    const { dm, base, snap } = await setup("N");
    await base.write(0, pattern(7, CS * SECTOR_SIZE));
    expect((await snap.read(0, CS)).equals(pattern(1, CS * SECTOR_SIZE))).toBe(true);
    expect(dm.status("snap")[0]!.params).toBe(`${CS}/4096 0`);
  });

  it("a full COW invalidates on an origin write; the origin keeps working", async () => {
    const { dm, base } = await setup("P", 4 * CS); // header + area + 2 data chunks
    await base.write(0, pattern(8, CS * SECTOR_SIZE));
    await base.write(CS, pattern(9, CS * SECTOR_SIZE));
    expect(dm.status("snap")[0]!.params).toBe(`${4 * CS}/${4 * CS} ${2 * CS}`);
    await base.write(2 * CS, pattern(10, CS * SECTOR_SIZE));
    expect(dm.status("snap")[0]!.params).toBe("Invalid");
    expect((await base.read(2 * CS, CS)).equals(pattern(10, CS * SECTOR_SIZE))).toBe(true);
    await expect(dm.open("snap").read(0, 1)).rejects.toMatchObject({ status: "EIO" });
  });
});
