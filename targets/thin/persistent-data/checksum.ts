/**
 * Block checksums as the kernel computes them (dm-block-manager.c: dm_bm_checksum): the raw
 * CRC32C of the block after its checksum field, seeded with ~0 and not inverted at the end, xored
 * with a salt that differs per block type so a block of one type never validates as another.
 */

/** The salts (dm-thin-metadata.c, dm-btree-spine.c, dm-space-map-common.c). */
export const SUPERBLOCK_CSUM_XOR = 160774;
export const BTREE_CSUM_XOR = 121107;
export const INDEX_CSUM_XOR = 160478;
export const BITMAP_CSUM_XOR = 240779;

const POLY = 0x82f63b78; // CRC32C (Castagnoli), reflected

/** Slicing-by-8 tables: TABLES[k][b] is the CRC of byte b followed by k zero bytes. */
const TABLES: Uint32Array[] = (() => {
  const t = Array.from({ length: 8 }, () => new Uint32Array(256));
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ POLY : c >>> 1;
    t[0]![i] = c >>> 0;
  }
  for (let i = 0; i < 256; i++) {
    for (let k = 1; k < 8; k++) t[k]![i] = (t[k - 1]![i]! >>> 8) ^ t[0]![t[k - 1]![i]! & 0xff]!;
  }
  return t;
})();

/** CRC32C of `data` continuing from `crc`, without the final inversion (the kernel's crc32c()). */
export function crc32cRaw(crc: number, data: Uint8Array): number {
  const [t0, t1, t2, t3, t4, t5, t6, t7] = TABLES as [
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
  ];
  let c = crc >>> 0;
  let i = 0;
  const end8 = data.length - (data.length % 8);
  for (; i < end8; i += 8) {
    const a = c ^ (data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24));
    c =
      t7[a & 0xff]! ^
      t6[(a >>> 8) & 0xff]! ^
      t5[(a >>> 16) & 0xff]! ^
      t4[a >>> 24]! ^
      t3[data[i + 4]!]! ^
      t2[data[i + 5]!]! ^
      t1[data[i + 6]!]! ^
      t0[data[i + 7]!]!;
  }
  for (; i < data.length; i++) c = t0[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

/** Standard CRC32C (initial ~0, final inversion): "123456789" → 0xe3069283. */
export function crc32c(data: Uint8Array): number {
  return ~crc32cRaw(0xffffffff, data) >>> 0;
}

/** dm_bm_checksum: what a block's checksum field holds for `data` (the bytes after that field). */
export function dmChecksum(data: Uint8Array, xor: number): number {
  return (crc32cRaw(0xffffffff, data) ^ xor) >>> 0;
}
