/**
 * Saved device state (dmsetup/daemon/device-state.ts): what a restarted udmd re-creates. Captured
 * from one device mapper, restored into a fresh one over the same files: same names, minors,
 * tables, suspended state and data; a device that cannot come back is reported with everything
 * stacked on it, and the rest come up.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { MemoryLogger } from "../../core/logger.js";
import { captureState, restoreDevices, StateFile } from "../../dmsetup/daemon/device-state.js";
import { createDeviceMapper } from "../../index.js";
import { pattern } from "../../testing/memory-backing.js";

const dirs: string[] = [];
const mappers: DeviceMapper[] = [];
afterEach(async () => {
  for (const dm of mappers.splice(0)) await dm.close();
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function files(...names: string[]): string[] {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-state-"));
  dirs.push(dir);
  return names.map((n) => {
    const f = path.join(dir, n);
    fs.writeFileSync(f, Buffer.alloc(0));
    fs.truncateSync(f, 4 << 20);
    return f;
  });
}

function mapper(): DeviceMapper {
  const dm = createDeviceMapper({ logger: new MemoryLogger(false) });
  mappers.push(dm);
  return dm;
}

const tables = (dm: DeviceMapper) => Object.fromEntries(dm.list().map((n) => [n, dm.tableText(n)]));
const infos = (dm: DeviceMapper) =>
  dm.list().map((n) => {
    const i = dm.info(n);
    return {
      name: i.name,
      uuid: i.uuid,
      minor: i.minor,
      suspended: i.suspended,
      live: i.livePresent,
      inactive: i.inactivePresent,
    };
  });

describe("device state", () => {
  it("restores a stack (linear over striped, an origin and two snapshots) with its data, minors and states", async () => {
    const [d0, d1, base, cow1, cow2, other] = files("d0", "d1", "base", "cow1", "cow2", "other");
    const first = mapper();
    await first.create("stripe", { table: `0 16384 striped 2 64 ${d0} 0 ${d1} 0`, uuid: "UDM-stripe" });
    await first.create("lin", { table: "0 8192 linear /dev/mapper/stripe 0" });
    await first.create("base", { table: `0 8192 linear ${base} 0` });
    await first.create("origin", { table: "0 8192 snapshot-origin /dev/mapper/base" });
    // Taking a snapshot (docs/snapshot.md): origin suspended meanwhile, so its resume sees it.
    const snapshot = async (dm: DeviceMapper, name: string, table: string) => {
      await dm.suspend("origin");
      await dm.create(name, { table });
      await dm.resume("origin");
    };
    await snapshot(first, "snap1", `0 8192 snapshot /dev/mapper/base ${cow1} P 8`);
    const o = first.open("origin");
    await o.write(0, pattern(1, 8192));
    await snapshot(first, "snap2", `0 8192 snapshot /dev/mapper/base ${cow2} P 16`);
    await o.write(0, pattern(2, 8192));
    await o.flush();
    await o.close();
    const l = first.open("lin");
    await l.write(100, pattern(3, 65536), { fua: true });
    await l.close();
    await first.create("idle", { table: `0 64 linear ${other} 0` });
    await first.suspend("idle");
    await first.load("idle", "0 32 zero");
    await first.create("empty");

    const file = new StateFile(path.join(dirs[0]!, "devices.json"));
    file.save(captureState(first, () => false));
    const second = mapper();
    const result = await restoreDevices(second, file.load()!, new MemoryLogger(false), async () => {});
    expect(result.failed).toEqual([]);
    expect(infos(second)).toEqual(infos(first));
    expect(tables(second)).toEqual(tables(first));
    expect(second.tableText("idle", { inactive: true })).toBe("0 32 zero \n");
    const read = async (dm: DeviceMapper, name: string, sector: number, sectors: number) => {
      const h = dm.open(name);
      try {
        return await h.read(sector, sectors);
      } finally {
        await h.close();
      }
    };
    expect((await read(second, "snap1", 0, 16)).equals(Buffer.alloc(8192))).toBe(true);
    expect((await read(second, "snap2", 0, 16)).equals(pattern(1, 8192))).toBe(true);
    expect((await read(second, "origin", 0, 16)).equals(pattern(2, 8192))).toBe(true);
    expect((await read(second, "lin", 100, 128)).equals(pattern(3, 65536))).toBe(true);
    // The restored origin preserves chunks for both restored snapshots: a write to chunks not
    // copied yet, across two of snap1's chunks, leaves both snapshots as they were.
    const o2 = second.open("origin");
    await o2.write(64, pattern(4, 8192));
    await o2.close();
    expect((await read(second, "snap1", 64, 16)).equals(Buffer.alloc(8192))).toBe(true);
    expect((await read(second, "snap2", 64, 16)).equals(Buffer.alloc(8192))).toBe(true);
  });

  it("reports a device that cannot come back, and those stacked on it; the others come up", async () => {
    const [a, b] = files("a", "b");
    const first = mapper();
    await first.create("gone", { table: `0 64 linear ${a} 0` });
    await first.create("above", { table: "0 64 linear /dev/mapper/gone 0" });
    await first.create("fine", { table: `0 64 linear ${b} 0` });
    const state = captureState(first, () => false);
    fs.rmSync(a!);
    const second = mapper();
    const result = await restoreDevices(second, state, new MemoryLogger(false), async () => {});
    expect(result.restored).toEqual(["fine"]);
    expect(result.failed).toEqual([
      { name: "gone", reason: expect.stringContaining("linear: Device lookup failed") },
      { name: "above", reason: "it is stacked on gone, which was not restored" },
    ]);
    expect(second.list()).toEqual(["fine"]);
  });

  it("restores a merging origin after the other snapshots of that origin, whatever the minors", async () => {
    const [base, cow1, cow2] = files("base", "cow1", "cow2");
    const first = mapper();
    await first.create("origin", { table: `0 8192 snapshot-origin ${base}` });
    for (const [name, cow] of [
      ["snap1", cow1],
      ["snap2", cow2],
    ] as const) {
      await first.suspend("origin");
      await first.create(name, { table: `0 8192 snapshot ${base} ${cow} P 8` });
      await first.resume("origin");
    }
    const o = first.open("origin");
    await o.write(0, pattern(7, 65536));
    await o.close();
    // Merge snap1: origin (minor 0) now has a table loaded after snap2's (minor 2).
    await first.load("origin", `0 8192 snapshot-merge ${base} ${cow1} P 8`);
    await first.suspend("snap1");
    await first.resume("origin");
    await first.remove("snap1");
    const state = captureState(first, () => false);
    const second = mapper();
    const result = await restoreDevices(second, state, new MemoryLogger(false), async () => {});
    expect(result.restored).toEqual(["snap2", "origin"]);
  });
});
