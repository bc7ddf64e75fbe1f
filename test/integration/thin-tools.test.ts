/**
 * The thin pool metadata udm writes is the kernel's format, as thin-provisioning-tools (written by
 * the kernel's dm-thin authors, no part of udm) read and write it:
 *
 * - udm → tools: a pool with several thin devices, snapshots sharing and then breaking sharing,
 *   tens of thousands of mappings, deletes and unmapped ranges passes `thin_check`, and
 *   `thin_dump`'s devices and mappings are the model's; the held metadata snapshot passes too and
 *   `thin_dump -m` shows the pool as it was when it was taken.
 * - the targets → tools: after writes, snapshots and discards through the thin-pool and thin
 *   targets, `thin_check` passes and every mapping `thin_dump` shows points at the data written
 *   to that block.
 * - tools → udm: metadata `thin_restore` builds from an XML file udm writes opens in udm with every
 *   device, detail and mapping of the XML; udm then changes it, and `thin_check` and `thin_dump`
 *   agree with the result.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { readBio, submitAndWait, writeBio } from "../../core/bio.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { checkPoolMetadata } from "../../targets/thin/metadata/check.js";
import { ThinPoolMetadata } from "../../targets/thin/metadata/thin-metadata.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";
import { missingToolsReason, skipOrFail } from "../support/requirements.js";
import { toolOk } from "../support/tools.js";

const TOOLS = ["thin_check", "thin_dump", "thin_restore"];
const missing = missingToolsReason(TOOLS);
const skipReason = missing && `${TOOLS.join(", ")} not installed (Debian: apt-get install thin-provisioning-tools)`;
const skip = skipOrFail("thin-provisioning-tools compatibility", skipReason);

const DATA_BLOCK_SIZE = 128;
const METADATA_BYTES = 32 * 1024 * 1024;

interface Mapping {
  block: number;
  time: number;
}

interface DeviceModel {
  details: { mappedBlocks: number; transactionId: bigint; creationTime: number; snapshottedTime: number };
  mappings: Map<number, Mapping>;
}

interface Dump {
  superblock: Record<string, string>;
  devices: Map<number, DeviceModel>;
}

function attributes(tag: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const m of tag.matchAll(/(\w+)="([^"]*)"/g)) out[m[1]!] = m[2]!;
  return out;
}

/** thin_dump's XML: the superblock's attributes, and every device with its details and mappings (ranges expanded). */
function parseDump(xml: string): Dump {
  let superblock: Record<string, string> = {};
  const devices = new Map<number, DeviceModel>();
  let current: DeviceModel | null = null;
  for (const tag of xml.match(/<[^>]+>/g) ?? []) {
    const a = attributes(tag);
    if (tag.startsWith("<superblock")) superblock = a;
    else if (tag.startsWith("<device")) {
      current = {
        details: {
          mappedBlocks: Number(a.mapped_blocks),
          transactionId: BigInt(a.transaction!),
          creationTime: Number(a.creation_time),
          snapshottedTime: Number(a.snap_time),
        },
        mappings: new Map(),
      };
      devices.set(Number(a.dev_id), current);
    } else if (tag.startsWith("<single_mapping")) {
      current!.mappings.set(Number(a.origin_block), { block: Number(a.data_block), time: Number(a.time) });
    } else if (tag.startsWith("<range_mapping")) {
      for (let i = 0; i < Number(a.length); i++) {
        current!.mappings.set(Number(a.origin_begin) + i, { block: Number(a.data_begin) + i, time: Number(a.time) });
      }
    }
  }
  return { superblock, devices };
}

/** The XML thin_restore reads, from a model (consecutive blocks of one time become range mappings). */
function toXml(
  sb: { time: number; transaction: bigint; nrDataBlocks: number },
  devices: Map<number, DeviceModel>,
): string {
  const lines = [
    `<superblock uuid="" time="${sb.time}" transaction="${sb.transaction}" flags="0" version="2" data_block_size="${DATA_BLOCK_SIZE}" nr_data_blocks="${sb.nrDataBlocks}">`,
  ];
  for (const [id, d] of devices) {
    const t = d.details;
    lines.push(
      `  <device dev_id="${id}" mapped_blocks="${t.mappedBlocks}" transaction="${t.transactionId}" creation_time="${t.creationTime}" snap_time="${t.snapshottedTime}">`,
    );
    const entries = [...d.mappings].sort((a, b) => a[0] - b[0]);
    for (let i = 0; i < entries.length;) {
      const [v, m] = entries[i]!;
      let n = 1;
      while (
        i + n < entries.length &&
        entries[i + n]![0] === v + n &&
        entries[i + n]![1].block === m.block + n &&
        entries[i + n]![1].time === m.time
      )
        n++;
      if (n === 1) lines.push(`    <single_mapping origin_block="${v}" data_block="${m.block}" time="${m.time}"/>`);
      else
        lines.push(`    <range_mapping origin_begin="${v}" data_begin="${m.block}" length="${n}" time="${m.time}"/>`);
      i += n;
    }
    lines.push("  </device>");
  }
  lines.push("</superblock>");
  return lines.join("\n") + "\n";
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "udm-thin-tools-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

async function saveImage(dev: MemoryDevice, file: string): Promise<void> {
  const buf = Buffer.alloc(dev.sizeSectors * 512);
  await submitAndWait(dev, readBio(0, buf));
  fs.writeFileSync(file, buf);
}

async function loadImage(file: string): Promise<MemoryDevice> {
  const buf = fs.readFileSync(file);
  const dev = new MemoryDevice(buf.length / 512);
  await submitAndWait(dev, writeBio(0, buf));
  return dev;
}

/** xorshift32: the same "random" mappings every run. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

/** A pool built through udm's metadata, with the model of what it should hold. */
class Builder {
  readonly devices = new Map<number, DeviceModel>();
  time = 0;

  constructor(readonly pmd: ThinPoolMetadata) {}

  async create(id: number): Promise<void> {
    await this.pmd.createThin(id);
    this.devices.set(id, {
      details: {
        mappedBlocks: 0,
        transactionId: this.pmd.transactionId,
        creationTime: this.time,
        snapshottedTime: this.time,
      },
      mappings: new Map(),
    });
  }

  async snap(id: number, origin: number): Promise<void> {
    await this.pmd.createSnap(id, origin);
    this.time++;
    const o = this.devices.get(origin)!;
    o.details.snapshottedTime = this.time;
    this.devices.set(id, {
      details: {
        mappedBlocks: o.mappings.size,
        transactionId: this.pmd.transactionId,
        creationTime: this.time,
        snapshottedTime: this.time,
      },
      mappings: new Map(o.mappings),
    });
  }

  async map(id: number, vblocks: Iterable<number>): Promise<void> {
    const td = await this.pmd.openThin(id);
    const d = this.devices.get(id)!;
    for (const v of vblocks) {
      const block = await this.pmd.allocDataBlock();
      await td.insertBlock(v, block);
      d.mappings.set(v, { block, time: this.time });
    }
    d.details.mappedBlocks = d.mappings.size;
    td.close();
  }

  async unmapRange(id: number, begin: number, end: number): Promise<void> {
    const td = await this.pmd.openThin(id);
    await td.removeRange(begin, end);
    td.close();
    const d = this.devices.get(id)!;
    for (let v = begin; v < end; v++) d.mappings.delete(v);
    d.details.mappedBlocks = d.mappings.size;
  }

  async delete(id: number): Promise<void> {
    await this.pmd.deleteThin(id);
    this.devices.delete(id);
  }

  snapshotModel(): Map<number, DeviceModel> {
    return new Map(
      [...this.devices].map(([id, d]) => [id, { details: { ...d.details }, mappings: new Map(d.mappings) }]),
    );
  }
}

function expectSameDevices(actual: Map<number, DeviceModel>, expected: Map<number, DeviceModel>): void {
  expect([...actual.keys()].sort((a, b) => a - b)).toEqual([...expected.keys()].sort((a, b) => a - b));
  for (const [id, d] of expected) {
    const a = actual.get(id)!;
    expect({ id, ...a.details }).toEqual({ id, ...d.details });
    // As text: a deep comparison of tens of thousands of entries is slow; toEqual shows any difference.
    const text = (m: Map<number, Mapping>) => JSON.stringify([...m].sort((x, y) => x[0] - y[0]));
    if (text(a.mappings) !== text(d.mappings)) expect([...a.mappings]).toEqual([...d.mappings]);
  }
}

/** Sector-sized content of virtual block `v` of device `dev` after write number `gen`. */
function blockContent(dev: number, v: number, gen: number): Buffer {
  return pattern(dev * 1_000_003 + v * 101 + gen, DATA_BLOCK_SIZE * 512);
}

describe.skipIf(skip)("thin pool metadata and thin-provisioning-tools", () => {
  it("a pool the thin targets wrote to passes thin_check, and each mapping thin_dump shows holds that block's data", async () => {
    const { dm, backing } = testMapper();
    const meta = backing.memory("meta", METADATA_BYTES / 512);
    const data = backing.memory("data", 2048 * DATA_BLOCK_SIZE);
    await dm.create("pool", { table: `0 ${2048 * DATA_BLOCK_SIZE} thin-pool meta data ${DATA_BLOCK_SIZE} 0` });
    const expected = new Map<number, Map<number, Buffer>>();
    const thin = async (id: number) => {
      await dm.create(`thin${id}`, { table: `0 ${4096 * DATA_BLOCK_SIZE} thin /dev/mapper/pool ${id}` });
      return dm.open(`thin${id}`);
    };
    const write = async (h: Awaited<ReturnType<typeof thin>>, id: number, v: number, gen: number) => {
      const content = blockContent(id, v, gen);
      await h.write(v * DATA_BLOCK_SIZE, content);
      expected.get(id)!.set(v, content);
    };
    const r = rng(3);
    await dm.message("pool", 0, "create_thin 1");
    expected.set(1, new Map());
    const t1 = await thin(1);
    for (let i = 0; i < 300; i++) await write(t1, 1, r(1000), 0);
    await dm.suspend("thin1");
    await dm.message("pool", 0, "create_snap 2 1");
    await dm.resume("thin1");
    expected.set(2, new Map(expected.get(1)));
    const t2 = await thin(2);
    for (let i = 0; i < 100; i++) await write(t1, 1, r(1000), 1);
    for (let i = 0; i < 100; i++) await write(t2, 2, r(1000), 2);
    // Half a block through the middle of a mapped block: read-modify-write of a shared block.
    const v = [...expected.get(2)!.keys()][0]!;
    const half = Buffer.from(expected.get(2)!.get(v)!);
    pattern(77, 4096).copy(half, 8192);
    await t2.write(v * DATA_BLOCK_SIZE + 16, pattern(77, 4096));
    expected.get(2)!.set(v, half);
    await t1.discard(0, 200 * DATA_BLOCK_SIZE);
    for (const k of [...expected.get(1)!.keys()]) if (k < 200) expected.get(1)!.delete(k);
    await t1.close();
    await t2.close();
    await dm.remove("thin1");
    await dm.remove("thin2");
    await dm.remove("pool"); // closing the pool commits

    const file = path.join(tmp, "targets.bin");
    await saveImage(meta, file);
    await toolOk("thin_check", [file]);
    const dump = parseDump((await toolOk("thin_dump", [file])).stdout);
    expect([...dump.devices.keys()]).toEqual([1, 2]);
    const wrong: string[] = [];
    for (const [id, d] of dump.devices) {
      const want = expected.get(id)!;
      expect([...d.mappings.keys()].sort((a, b) => a - b)).toEqual([...want.keys()].sort((a, b) => a - b));
      for (const [vb, m] of d.mappings) {
        const onData = Buffer.alloc(DATA_BLOCK_SIZE * 512);
        await submitAndWait(data, readBio(m.block * DATA_BLOCK_SIZE, onData));
        if (!onData.equals(want.get(vb)!)) wrong.push(`device ${id} block ${vb} (data block ${m.block})`);
      }
    }
    expect(wrong).toEqual([]);
    expect((await checkPoolMetadata(meta)).errors).toEqual([]);
  });

  it("a pool udm writes passes thin_check, and thin_dump (also of its metadata snapshot) shows the model", async () => {
    const dev = new MemoryDevice(METADATA_BYTES / 512);
    const pmd = await ThinPoolMetadata.open(dev, { dataBlockSize: DATA_BLOCK_SIZE, format: true });
    await pmd.resizeDataDev(200_000);
    const b = new Builder(pmd);
    const r = rng(19);

    await b.create(1);
    await b.map(
      1,
      Array.from({ length: 20_000 }, (_, i) => i),
    ); // sequential: runs of data blocks
    await b.map(
      1,
      Array.from({ length: 5_000 }, () => 20_000 + r(100_000)),
    );
    await pmd.commit();
    await b.snap(2, 1);
    await b.map(
      2,
      Array.from({ length: 3_000 }, () => r(25_000)),
    ); // breaks sharing in many leaves
    await b.map(
      1,
      Array.from({ length: 2_000 }, () => r(25_000)),
    );
    await b.snap(3, 2);
    await b.create(7);
    await b.map(
      7,
      Array.from({ length: 4_000 }, () => r(1_000_000)),
    );
    await pmd.setTransactionId(0n, 41n);
    await pmd.reserveMetadataSnap();
    const held = b.snapshotModel();
    const heldTime = b.time;

    await b.unmapRange(2, 1_000, 9_000);
    await b.delete(1);
    await b.snap(8, 7);
    await b.map(
      8,
      Array.from({ length: 500 }, () => r(1_000_000)),
    );
    await b.delete(7);
    await pmd.setTransactionId(41n, 42n);
    await pmd.commit();

    const file = path.join(tmp, "udm-made.bin");
    await saveImage(dev, file);
    const check = await toolOk("thin_check", [file]);
    expect(check.stderr).not.toMatch(/error|bad|leak/i);

    const dump = parseDump((await toolOk("thin_dump", [file])).stdout);
    expect(dump.superblock).toMatchObject({
      transaction: "42",
      time: String(b.time),
      version: "2",
      data_block_size: String(DATA_BLOCK_SIZE),
      nr_data_blocks: "200000",
    });
    expectSameDevices(dump.devices, b.devices);

    // The held snapshot: thin_check checks it too; thin_dump -m reads the pool as it was.
    await toolOk("thin_check", ["-m", file]);
    const heldDump = parseDump((await toolOk("thin_dump", ["-m", file])).stdout);
    expect(heldDump.superblock.time).toBe(String(heldTime));
    expectSameDevices(heldDump.devices, held);

    // Releasing it gives its blocks back; the tools still agree.
    await pmd.releaseMetadataSnap();
    await pmd.commit();
    await saveImage(dev, file);
    await toolOk("thin_check", [file]);
    expectSameDevices(parseDump((await toolOk("thin_dump", [file])).stdout).devices, b.devices);
    expect((await checkPoolMetadata(dev)).errors).toEqual([]);
  });

  it("metadata thin_restore builds opens in udm with the XML's devices and mappings, and stays valid as udm changes it", async () => {
    const r = rng(7);
    const devices = new Map<number, DeviceModel>();
    const shared = Array.from({ length: 3_000 }, (_, i) => [i * 2, { block: 10_000 + i, time: 0 }] as const);
    const withShared = (extra: [number, Mapping][]) => new Map<number, Mapping>([...shared, ...extra]);
    devices.set(0, {
      details: { mappedBlocks: 0, transactionId: 3n, creationTime: 0, snapshottedTime: 2 },
      mappings: withShared(Array.from({ length: 500 }, (_, i) => [1 + 2 * i, { block: 20_000 + i, time: 1 }])),
    });
    devices.set(5, {
      details: { mappedBlocks: 0, transactionId: 4n, creationTime: 2, snapshottedTime: 2 },
      mappings: withShared(
        Array.from({ length: 800 }, (_, i) => [100_000 + r(50_000), { block: 30_000 + i, time: 2 }]),
      ),
    });
    devices.set(9, {
      details: { mappedBlocks: 0, transactionId: 5n, creationTime: 2, snapshottedTime: 2 },
      mappings: new Map(),
    });
    for (const d of devices.values()) d.details.mappedBlocks = d.mappings.size;

    const xmlFile = path.join(tmp, "restore.xml");
    const file = path.join(tmp, "restored.bin");
    fs.writeFileSync(xmlFile, toXml({ time: 2, transaction: 17n, nrDataBlocks: 60_000 }, devices));
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, METADATA_BYTES);
    await toolOk("thin_restore", ["-i", xmlFile, "-o", file]);

    const dev = await loadImage(file);
    expect((await checkPoolMetadata(dev)).errors).toEqual([]);
    const pmd = await ThinPoolMetadata.open(dev, { dataBlockSize: DATA_BLOCK_SIZE });
    expect(pmd.transactionId).toBe(17n);
    expect(pmd.dataDevSize()).toBe(60_000);
    expect(await pmd.deviceIds()).toEqual([0, 5, 9]);
    for (const [id, d] of devices) {
      const td = await pmd.openThin(id);
      expect(td.details()).toEqual(d.details);
      const wrong: number[] = [];
      for (const [v, m] of d.mappings) {
        const got = await td.findBlock(v);
        if (got?.block !== m.block || got.shared !== d.details.snapshottedTime > m.time) wrong.push(v);
      }
      expect(wrong).toEqual([]);
      expect(await td.findBlock(7_000_000)).toBeUndefined();
      td.close();
    }
    // thin_restore counts a block once per device mapping it.
    expect(await pmd.dataBlockCount(10_000)).toBe(2);
    expect(await pmd.dataBlockCount(20_000)).toBe(1);
    expect(await pmd.dataBlockCount(59_999)).toBe(0);

    // udm changes the restored pool; the tools agree with the result.
    const b = new Builder(pmd);
    for (const [id, d] of devices) b.devices.set(id, d);
    b.time = 2;
    await b.snap(10, 5);
    await b.map(10, [0, 1, 2, 100_001, 999_999]);
    await b.map(
      9,
      Array.from({ length: 1_000 }, (_, i) => i),
    );
    await b.unmapRange(0, 0, 3_000);
    await b.delete(5);
    await pmd.commit();
    await saveImage(dev, file);
    await toolOk("thin_check", [file]);
    const dump = parseDump((await toolOk("thin_dump", [file])).stdout);
    expect(dump.superblock.transaction).toBe("17");
    expectSameDevices(dump.devices, b.devices);
  });
});
