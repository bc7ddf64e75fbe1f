/**
 * The text interface of the thin-pool and thin targets, as dm-thin.c has it: table arguments
 * checked in pool_ctr's and thin_ctr's order with their error strings, the feature list as
 * emit_flags prints it, the status lines of pool_status and thin_status (with their trailing
 * spaces), and the message arguments. Pure functions: the targets open the devices in between.
 */
import { ArgReader, parseUnsigned } from "../../core/args.js";
import { TargetError } from "../../core/target.js";
import { MAX_DEV_ID } from "./metadata/thin-metadata.js";

/** DATA_DEV_BLOCK_SIZE_MIN_SECTORS (64 KiB) and _MAX_SECTORS (1 GiB). */
export const DATA_BLOCK_SIZE_MIN_SECTORS = 128;
export const DATA_BLOCK_SIZE_MAX_SECTORS = 2 * 1024 * 1024;

/** struct pool_features */
export interface PoolFeatures {
  zeroNewBlocks: boolean;
  discardEnabled: boolean;
  discardPassdown: boolean;
  readOnly: boolean;
  errorIfNoSpace: boolean;
}

/** pool_features_init */
export function defaultPoolFeatures(): PoolFeatures {
  return { zeroNewBlocks: true, discardEnabled: true, discardPassdown: true, readOnly: false, errorIfNoSpace: false };
}

/** enum pool_mode, in the kernel's order (a later mode is a worse one). */
export type PoolMode = "write" | "out-of-data-space" | "out-of-metadata-space" | "read-only" | "fail";

/** is_read_only_pool_mode */
export function isReadOnlyMode(mode: PoolMode): boolean {
  return mode === "out-of-metadata-space" || mode === "read-only";
}

export interface PoolArgs {
  metadataDev: string;
  dataDev: string;
  features: PoolFeatures;
}

/**
 * pool_ctr up to opening the devices: `<metadata dev> <data dev> <block size> <low water mark>
 * [<#features> <feature>...]`.
 */
export function parsePoolArgs(args: readonly string[]): PoolArgs {
  if (args.length < 4) throw new TargetError("Invalid argument count");
  if (args[0] === args[1]) throw new TargetError("Error setting metadata or data device");
  const as = new ArgReader(args);
  as.consume(4);
  return { metadataDev: args[0]!, dataDev: args[1]!, features: parsePoolFeatures(as) };
}

/** parse_pool_features: feature names in any case; unknown ones and bad counts fail. */
function parsePoolFeatures(as: ArgReader): PoolFeatures {
  const pf = defaultPoolFeatures();
  if (as.remaining === 0) return pf;
  let argc = as.readArgGroup({ min: 0, max: 4, error: "Invalid number of pool feature arguments" });
  while (argc-- > 0) {
    const name = as.shift()!.toLowerCase();
    if (name === "skip_block_zeroing") pf.zeroNewBlocks = false;
    else if (name === "ignore_discard") pf.discardEnabled = false;
    else if (name === "no_discard_passdown") pf.discardPassdown = false;
    else if (name === "read_only") pf.readOnly = true;
    else if (name === "error_if_no_space") pf.errorIfNoSpace = true;
    else throw new TargetError("Unrecognised pool feature requested");
  }
  return pf;
}

/** pool_ctr after the devices are open: the data block size (sectors) and the low water mark (blocks). */
export function parsePoolNumbers(args: readonly string[]): { blockSize: number; lowWaterBlocks: number } {
  const blockSize = parseUnsigned(args[2]!);
  if (
    blockSize === null ||
    blockSize < DATA_BLOCK_SIZE_MIN_SECTORS ||
    blockSize > DATA_BLOCK_SIZE_MAX_SECTORS ||
    blockSize % DATA_BLOCK_SIZE_MIN_SECTORS !== 0
  ) {
    throw new TargetError("Invalid block size");
  }
  const lowWaterBlocks = parseUnsigned(args[3]!);
  if (lowWaterBlocks === null) throw new TargetError("Invalid low water mark");
  return { blockSize, lowWaterBlocks };
}

/** emit_flags: the count, then each non-default feature, each followed by a space. */
export function formatPoolFeatures(pf: PoolFeatures): string {
  const names = [
    !pf.zeroNewBlocks && "skip_block_zeroing",
    !pf.discardEnabled && "ignore_discard",
    !pf.discardPassdown && "no_discard_passdown",
    pf.readOnly && "read_only",
    pf.errorIfNoSpace && "error_if_no_space",
  ].filter((n): n is string => typeof n === "string");
  return `${names.length} ${names.map((n) => `${n} `).join("")}`;
}

/** pool_status, STATUSTYPE_TABLE */
export function formatPoolTable(
  metadataDev: string,
  dataDev: string,
  blockSize: number,
  lowWaterBlocks: number,
  requested: PoolFeatures,
): string {
  return `${metadataDev} ${dataDev} ${blockSize} ${lowWaterBlocks} ${formatPoolFeatures(requested)}`;
}

export interface PoolStatus {
  transactionId: bigint;
  usedMetadataBlocks: number;
  totalMetadataBlocks: number;
  usedDataBlocks: number;
  totalDataBlocks: number;
  /** The held metadata snapshot's block, 0 for none. */
  heldRoot: number;
  mode: PoolMode;
  features: PoolFeatures;
  needsCheck: boolean;
  metadataLowWater: number;
}

/**
 * pool_status, STATUSTYPE_INFO: `<transaction id> <used>/<total metadata blocks> <used>/<total
 * data blocks> <held root|-> <rw|ro|out_of_data_space> <discard> <no space> <needs_check|->
 * <metadata low water mark> ` (counts in blocks, despite the kernel's comment saying sectors).
 */
export function formatPoolStatus(s: PoolStatus): string {
  if (s.mode === "fail") return "Fail";
  const mode = s.mode === "out-of-data-space" ? "out_of_data_space" : isReadOnlyMode(s.mode) ? "ro" : "rw";
  const discard = !s.features.discardEnabled
    ? "ignore_discard"
    : s.features.discardPassdown
      ? "discard_passdown"
      : "no_discard_passdown";
  return (
    `${s.transactionId} ${s.usedMetadataBlocks}/${s.totalMetadataBlocks} ${s.usedDataBlocks}/${s.totalDataBlocks} ` +
    `${s.heldRoot || "-"} ${mode} ${discard} ${s.features.errorIfNoSpace ? "error_if_no_space" : "queue_if_no_space"} ` +
    `${s.needsCheck ? "needs_check" : "-"} ${s.metadataLowWater} `
  );
}

/** calc_metadata_threshold: a quarter of the metadata device, at most 1024 blocks (4 MiB). */
export function metadataLowWater(metadataDevBlocks: number): number {
  return Math.min(1024, Math.floor(metadataDevBlocks / 4));
}

/** read_dev_id: a thin device id, 0..2^24-1; null otherwise. */
export function parseDevId(text: string): number | null {
  const id = parseUnsigned(text);
  return id !== null && id <= MAX_DEV_ID ? id : null;
}

export interface ThinArgs {
  poolDev: string;
  devId: number;
  externalOrigin: string | null;
}

/** thin_ctr's argument checks, in its order (the pool and origin are opened in between there). */
export function parseThinArgs(args: readonly string[]): ThinArgs {
  if (args.length !== 2 && args.length !== 3) throw new TargetError("Invalid argument count");
  if (args.length === 3 && args[0] === args[2]) throw new TargetError("Error setting origin device");
  const devId = parseDevId(args[1]!);
  if (devId === null) throw new TargetError("Invalid device id");
  return { poolDev: args[0]!, devId, externalOrigin: args[2] ?? null };
}

/** thin_status, STATUSTYPE_INFO: mapped sectors and the highest mapped sector ("-" for none). */
export function formatThinStatus(mode: PoolMode, mappedBlocks: number, highest: number | undefined, blockSize: number) {
  if (mode === "fail") return "Fail";
  return `${mappedBlocks * blockSize} ${highest === undefined ? "-" : (highest + 1) * blockSize - 1}`;
}

/** The six pool messages and their argument counts (check_arg_count counts the name too). */
export const POOL_MESSAGES: Readonly<Record<string, number>> = {
  create_thin: 2,
  create_snap: 3,
  delete: 2,
  set_transaction_id: 3,
  reserve_metadata_snap: 1,
  release_metadata_snap: 1,
};

/** A transaction id as set_transaction_id reads it (kstrtoull: any u64), or null. */
export function parseTransactionId(text: string): bigint | null {
  if (!/^\d+$/.test(text)) return null;
  const id = BigInt(text);
  return id < 2n ** 64n ? id : null;
}
