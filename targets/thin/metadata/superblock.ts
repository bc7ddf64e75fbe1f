/**
 * The thin pool's superblock, metadata block 0 (dm-thin-metadata.c: struct thin_disk_superblock).
 * Every integer is little-endian; the structure fits in the first 512 bytes so the kernel can
 * count on the device writing it atomically.
 *
 *     0 csum u32            4 flags u32            8 blocknr u64         16 uuid [16]
 *    32 magic u64          40 version u32         44 time u32           48 trans_id u64
 *    56 held_root u64      64 data_space_map_root [128]                192 metadata_space_map_root [128]
 *   320 data_mapping_root u64                    328 device_details_root u64
 *   336 data_block_size u32 (sectors)            340 metadata_block_size u32 (sectors)
 *   344 metadata_nr_blocks u64                   352 compat_flags, compat_ro_flags, incompat_flags u32
 */
import type { BlockValidator } from "../persistent-data/block-manager.js";
import { SUPERBLOCK_CSUM_XOR, dmChecksum } from "../persistent-data/checksum.js";
import { pdError } from "../persistent-data/errors.js";
import { readU64, writeU64 } from "../persistent-data/space-map.js";

export const THIN_SUPERBLOCK_MAGIC = 27022010;
export const THIN_SUPERBLOCK_LOCATION = 0;
export const THIN_VERSION = 2;
export const SPACE_MAP_ROOT_SIZE = 128;
/** THIN_METADATA_NEEDS_CHECK_FLAG: set when the pool failed; cleared by thin_check --clear-needs-check-flag. */
export const NEEDS_CHECK_FLAG = 1;
/** Optional features this implementation understands (none, like the kernel's). */
export const INCOMPAT_SUPPORTED = 0;
export const COMPAT_RO_SUPPORTED = 0;

export const SB = {
  csum: 0,
  flags: 4,
  blocknr: 8,
  uuid: 16,
  magic: 32,
  version: 40,
  time: 44,
  transId: 48,
  heldRoot: 56,
  dataSpaceMapRoot: 64,
  metadataSpaceMapRoot: 192,
  dataMappingRoot: 320,
  deviceDetailsRoot: 328,
  dataBlockSize: 336,
  metadataBlockSize: 340,
  metadataNrBlocks: 344,
  compatFlags: 352,
  compatRoFlags: 356,
  incompatFlags: 360,
} as const;

export interface ThinSuperblock {
  flags: number;
  uuid: Buffer;
  magic: number;
  version: number;
  time: number;
  transactionId: bigint;
  heldRoot: number;
  dataSpaceMapRoot: Buffer;
  metadataSpaceMapRoot: Buffer;
  dataMappingRoot: number;
  deviceDetailsRoot: number;
  dataBlockSize: number;
  metadataBlockSize: number;
  metadataNrBlocks: number;
  compatFlags: number;
  compatRoFlags: number;
  incompatFlags: number;
}

export const superblockValidator: BlockValidator = {
  name: "superblock",
  prepareForWrite(data, location) {
    writeU64(data, SB.blocknr, location);
    data.writeUInt32LE(dmChecksum(data.subarray(4), SUPERBLOCK_CSUM_XOR), SB.csum);
  },
  check(data, location) {
    if (readU64(data, SB.blocknr) !== location) {
      throw pdError("ENOTBLK", `sb_check failed: blocknr ${readU64(data, SB.blocknr)}: wanted ${location}`);
    }
    if (readU64(data, SB.magic) !== THIN_SUPERBLOCK_MAGIC) {
      throw pdError("EILSEQ", `sb_check failed: magic ${readU64(data, SB.magic)}: wanted ${THIN_SUPERBLOCK_MAGIC}`);
    }
    const csum = dmChecksum(data.subarray(4), SUPERBLOCK_CSUM_XOR);
    if (csum !== data.readUInt32LE(SB.csum)) {
      throw pdError("EILSEQ", `sb_check failed: csum ${csum}: wanted ${data.readUInt32LE(SB.csum)}`);
    }
  },
};

export function decodeSuperblock(data: Buffer): ThinSuperblock {
  return {
    flags: data.readUInt32LE(SB.flags),
    uuid: Buffer.from(data.subarray(SB.uuid, SB.uuid + 16)),
    magic: readU64(data, SB.magic),
    version: data.readUInt32LE(SB.version),
    time: data.readUInt32LE(SB.time),
    transactionId: data.readBigUInt64LE(SB.transId),
    heldRoot: readU64(data, SB.heldRoot),
    dataSpaceMapRoot: Buffer.from(data.subarray(SB.dataSpaceMapRoot, SB.dataSpaceMapRoot + SPACE_MAP_ROOT_SIZE)),
    metadataSpaceMapRoot: Buffer.from(
      data.subarray(SB.metadataSpaceMapRoot, SB.metadataSpaceMapRoot + SPACE_MAP_ROOT_SIZE),
    ),
    dataMappingRoot: readU64(data, SB.dataMappingRoot),
    deviceDetailsRoot: readU64(data, SB.deviceDetailsRoot),
    dataBlockSize: data.readUInt32LE(SB.dataBlockSize),
    metadataBlockSize: data.readUInt32LE(SB.metadataBlockSize),
    metadataNrBlocks: readU64(data, SB.metadataNrBlocks),
    compatFlags: data.readUInt32LE(SB.compatFlags),
    compatRoFlags: data.readUInt32LE(SB.compatRoFlags),
    incompatFlags: data.readUInt32LE(SB.incompatFlags),
  };
}

/** The fields a commit rewrites (__commit_transaction); the rest stay as formatted. */
export interface CommitFields {
  flags: number;
  time: number;
  transactionId: bigint;
  dataMappingRoot: number;
  deviceDetailsRoot: number;
  dataSpaceMapRoot: Buffer;
  metadataSpaceMapRoot: Buffer;
}

export function writeCommitFields(data: Buffer, f: CommitFields): void {
  data.writeUInt32LE(f.flags, SB.flags);
  data.writeUInt32LE(f.time, SB.time);
  data.writeBigUInt64LE(f.transactionId, SB.transId);
  writeU64(data, SB.dataMappingRoot, f.dataMappingRoot);
  writeU64(data, SB.deviceDetailsRoot, f.deviceDetailsRoot);
  data.fill(0, SB.dataSpaceMapRoot, SB.dataSpaceMapRoot + 2 * SPACE_MAP_ROOT_SIZE);
  f.dataSpaceMapRoot.copy(data, SB.dataSpaceMapRoot);
  f.metadataSpaceMapRoot.copy(data, SB.metadataSpaceMapRoot);
}

/** __write_initial_superblock's constant fields, into a zeroed block. */
export function writeFormatFields(
  data: Buffer,
  f: { dataBlockSize: number; metadataNrBlocks: number; metadataBlockSize: number },
): void {
  writeU64(data, SB.magic, THIN_SUPERBLOCK_MAGIC);
  data.writeUInt32LE(THIN_VERSION, SB.version);
  data.writeUInt32LE(f.metadataBlockSize, SB.metadataBlockSize);
  writeU64(data, SB.metadataNrBlocks, f.metadataNrBlocks);
  data.writeUInt32LE(f.dataBlockSize, SB.dataBlockSize);
}

export function setHeldRoot(data: Buffer, heldRoot: number): void {
  writeU64(data, SB.heldRoot, heldRoot);
}
