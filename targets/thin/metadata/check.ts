/**
 * A consistency check of committed pool metadata, the checks thin_check makes: every btree node
 * valid (checksum, block number, max_entries a multiple of 3 that fits), its keys ordered and
 * within its parent's bounds, every node but a root at least a third full, and every reference
 * count in both space maps equal to the references the structures on disk hold (so no block
 * leaks and none is freed while in use). For tests and the crash runner: it reads the device as
 * the last commit left it, through a block manager of its own.
 */
import type { BlockDevice } from "../../../core/devices/block-device.js";
import { type BlockValidator, BlockManager } from "../persistent-data/block-manager.js";
import {
  btreeNodeValidator,
  isInternal,
  isLeaf,
  keyAt,
  maxEntries,
  nrEntries,
  value64,
  valueAt,
  valueSize,
} from "../persistent-data/btree-node.js";
import { type SmRoot, decodeSmRoot, readU64 } from "../persistent-data/space-map.js";
import {
  ENTRIES_PER_BLOCK,
  INDEX_ENTRY_SIZE,
  type IndexEntry,
  bitmapLookup,
  bitmapValidator,
  decodeIndexEntry,
} from "../persistent-data/space-map-bitmap.js";
import { indexValidator } from "../persistent-data/space-map-metadata.js";
import { DEVICE_DETAILS_SIZE } from "./device-details.js";
import { unpackBlockTime } from "./mapping.js";
import { THIN_SUPERBLOCK_LOCATION, decodeSuperblock, superblockValidator } from "./superblock.js";

export interface CheckReport {
  /** Empty when the metadata is consistent. */
  errors: string[];
  /** Mappings per thin device, as found in the mapping tree. */
  mappings: Map<number, Map<number, { block: number; time: number }>>;
}

class Counter {
  readonly counts = new Map<number, number>();
  inc(b: number): void {
    this.counts.set(b, (this.counts.get(b) ?? 0) + 1);
  }
}

export async function checkPoolMetadata(device: BlockDevice): Promise<CheckReport> {
  const bm = new BlockManager(device, { readOnly: true });
  const errors: string[] = [];
  const mappings = new Map<number, Map<number, { block: number; time: number }>>();
  const meta = new Counter();
  const data = new Counter();
  const visited = new Set<number>();

  const read = async (b: number, v: BlockValidator, what: string): Promise<Buffer | undefined> => {
    try {
      return await bm.read(b, v);
    } catch (err) {
      errors.push(`${what}: block ${b}: ${(err as Error).message}`);
      return undefined;
    }
  };

  /** Counts a reference to the tree at `root` and, the first time, walks it. */
  const walkTree = async (
    root: number,
    size: number,
    what: string,
    onValue: (key: number, value: Buffer) => Promise<void> | void,
  ): Promise<void> => {
    const walkNode = async (b: number, lo: number, hi: number, isRoot: boolean): Promise<void> => {
      meta.inc(b);
      if (visited.has(b)) return;
      visited.add(b);
      const n = await read(b, btreeNodeValidator, what);
      if (!n) return;
      const nr = nrEntries(n);
      const max = maxEntries(n);
      if (max % 3 !== 0) errors.push(`${what}: node ${b}: max entries ${max} is not divisible by 3`);
      if (!isRoot && nr < Math.floor(max / 3)) errors.push(`${what}: node ${b}: too few entries (${nr} of ${max})`);
      if (nr > max) {
        errors.push(`${what}: node ${b}: ${nr} entries, room for ${max}`);
        return;
      }
      if (isLeaf(n) && valueSize(n) !== size) {
        // Its values cannot be read as this tree's (a block of another tree, after a torn commit).
        errors.push(`${what}: leaf ${b}: value size ${valueSize(n)}, not ${size}`);
        return;
      }
      for (let i = 0; i < nr; i++) {
        const k = keyAt(n, i);
        if (k < lo || k >= hi) errors.push(`${what}: node ${b}: key ${k} outside [${lo}, ${hi})`);
        if (i > 0 && k <= keyAt(n, i - 1)) errors.push(`${what}: node ${b}: keys out of order at ${i}`);
      }
      for (let i = 0; i < nr; i++) {
        if (isInternal(n)) {
          const end = i + 1 < nr ? keyAt(n, i + 1) : hi;
          await walkNode(value64(n, i), i === 0 ? lo : keyAt(n, i), end, false);
        } else {
          await onValue(keyAt(n, i), valueAt(n, i));
        }
      }
    };
    await walkNode(root, 0, Number.MAX_SAFE_INTEGER, true);
  };

  const sbData = await read(THIN_SUPERBLOCK_LOCATION, superblockValidator, "superblock");
  if (!sbData) return { errors, mappings };
  const sb = decodeSuperblock(sbData);
  meta.inc(THIN_SUPERBLOCK_LOCATION);

  /** Every entry of a (possibly shared) tree, without counting anything. */
  const collect = async (b: number, out: Map<number, { block: number; time: number }>): Promise<void> => {
    const n = await read(b, btreeNodeValidator, "mappings");
    if (!n) return;
    for (let i = 0; i < nrEntries(n); i++) {
      if (isInternal(n)) await collect(value64(n, i), out);
      else out.set(keyAt(n, i), unpackBlockTime(valueAt(n, i)));
    }
  };
  const walkMappings = async (root: number, record: boolean): Promise<void> => {
    await walkTree(root, 8, "mapping tree", async (dev, v) => {
      const subtree = readU64(v, 0);
      // Each leaf holds its references once, however many trees share it.
      await walkTree(subtree, 8, `mappings of device ${dev}`, (_vblock, bt) => data.inc(unpackBlockTime(bt).block));
      if (record) {
        const devMap = new Map<number, { block: number; time: number }>();
        await collect(subtree, devMap);
        mappings.set(dev, devMap);
      }
    });
  };
  const walkDetails = (root: number): Promise<void> => walkTree(root, DEVICE_DETAILS_SIZE, "device details", () => {});

  await walkMappings(sb.dataMappingRoot, true);
  await walkDetails(sb.deviceDetailsRoot);
  if (sb.heldRoot) {
    meta.inc(sb.heldRoot);
    const held = await read(sb.heldRoot, superblockValidator, "metadata snapshot");
    if (held) {
      const h = decodeSuperblock(held);
      await walkMappings(h.dataMappingRoot, false);
      await walkDetails(h.deviceDetailsRoot);
    }
  }

  // The space maps' own blocks.
  const metaRoot = decodeSmRoot(sb.metadataSpaceMapRoot);
  const dataRoot = decodeSmRoot(sb.dataSpaceMapRoot);
  meta.inc(metaRoot.bitmapRoot);
  const metaIndex: IndexEntry[] = [];
  const indexBlock = await read(metaRoot.bitmapRoot, indexValidator, "metadata space map index");
  if (indexBlock) {
    for (let i = 0; i < Math.ceil(metaRoot.nrBlocks / ENTRIES_PER_BLOCK); i++) {
      metaIndex.push(decodeIndexEntry(indexBlock, 16 + INDEX_ENTRY_SIZE * i));
    }
  }
  const dataIndex: IndexEntry[] = [];
  await walkTree(dataRoot.bitmapRoot, INDEX_ENTRY_SIZE, "data space map index", (i, v) => {
    dataIndex[i] = decodeIndexEntry(v);
  });
  for (const ie of [...metaIndex, ...dataIndex]) if (ie) meta.inc(ie.blocknr);
  const bigCounts = async (r: SmRoot, what: string): Promise<Map<number, number>> => {
    const counts = new Map<number, number>();
    await walkTree(r.refCountRoot, 4, what, (b, v) => void counts.set(b, v.readUInt32LE(0)));
    return counts;
  };
  const metaBig = await bigCounts(metaRoot, "metadata ref counts");
  const dataBig = await bigCounts(dataRoot, "data ref counts");

  const compare = async (
    what: string,
    r: SmRoot,
    index: IndexEntry[],
    big: Map<number, number>,
    expected: Counter,
  ): Promise<void> => {
    let allocated = 0;
    for (let i = 0; i * ENTRIES_PER_BLOCK < r.nrBlocks; i++) {
      const ie = index[i];
      if (!ie) {
        errors.push(`${what}: no index entry for bitmap ${i}`);
        continue;
      }
      const bm = await read(ie.blocknr, bitmapValidator, `${what} bitmap ${i}`);
      if (!bm) continue;
      let free = ENTRIES_PER_BLOCK;
      for (let bit = 0; bit < ENTRIES_PER_BLOCK && i * ENTRIES_PER_BLOCK + bit < r.nrBlocks; bit++) {
        const b = i * ENTRIES_PER_BLOCK + bit;
        const bits = bitmapLookup(bm, bit);
        const count = bits === 3 ? (big.get(b) ?? -1) : bits;
        const want = expected.counts.get(b) ?? 0;
        if (count !== want) errors.push(`${what}: block ${b} has count ${count}, but ${want} references`);
        if (bits !== 0) {
          allocated++;
          free--;
        }
        if (bits === 0 && bit < ie.noneFreeBefore) errors.push(`${what}: block ${b} is free below none_free_before`);
      }
      // The kernel counts the entries past the end of the last bitmap as free, thin_restore does not.
      const existing = Math.min(ENTRIES_PER_BLOCK, r.nrBlocks - i * ENTRIES_PER_BLOCK);
      if (ie.nrFree !== free && ie.nrFree !== free - (ENTRIES_PER_BLOCK - existing)) {
        errors.push(`${what}: bitmap ${i} says ${ie.nrFree} free, has ${free}`);
      }
    }
    if (allocated !== r.nrAllocated) errors.push(`${what}: ${allocated} blocks allocated, root says ${r.nrAllocated}`);
    for (const [b, n] of expected.counts) {
      if (b >= r.nrBlocks) errors.push(`${what}: block ${b} (${n} references) is beyond the ${r.nrBlocks} blocks`);
    }
  };
  await compare("metadata space map", metaRoot, metaIndex, metaBig, meta);
  await compare("data space map", dataRoot, dataIndex, dataBig, data);
  return { errors, mappings };
}
