/**
 * dust: a linear mapping whose listed "bad" blocks fail reads, emulating a disk that reports read
 * medium errors (dm-dust.c).
 *
 * `<dev> <offset> <blksz>`, blksz in bytes (a power of two, at least 512, at most the target length
 * and 1 GiB). Bad blocks are numbered in blksz units of the underlying device (remapped sector /
 * sectors per block) and managed by messages. The target starts in bypass mode; `enable` makes a
 * read of a bad block fail with EIO. While enabled, a write to a bad block fails while the block's
 * write-fail count is positive (decrementing it), and otherwise removes the block from the list and
 * is written ("healed"). `quiet` toggles the informational log lines.
 */
import { parseSector, parseUnsigned, UINT_MAX } from "../core/args.js";
import type { Bio } from "../core/bio.js";
import type { BlockDevice } from "../core/devices/block-device.js";
import type { Logger } from "../core/logger.js";
import { target } from "../core/registry.js";
import { type DeviceLookup, Services } from "../core/services.js";
import { type DeviceAreaCallback, MapResult, type StatusType, Target, TargetError } from "../core/target.js";

/** 1 GiB in sectors: the largest block size. */
const DUST_MAX_BLKSZ_SECTORS = 2_097_152;

@target({ name: "dust", version: [1, 0, 0], inject: [Services.DeviceLookup, Services.Logger] })
export class DustTarget extends Target {
  private device!: BlockDevice;
  private start = 0;
  private blksz = 0;
  private sectPerBlock = 1;
  /** Bad block number → remaining write failures. */
  private readonly badBlocks = new Map<number, { wrFailCnt: number }>();
  private failReadOnBb = false;
  private quietMode = false;

  constructor(
    private readonly devices: DeviceLookup,
    private readonly logger: Logger,
  ) {
    super();
  }

  async ctr(args: string[]): Promise<void> {
    if (args.length !== 3) throw new TargetError("Invalid argument count");
    const blksz = parseUnsigned(args[2]!, UINT_MAX);
    if (!blksz) throw new TargetError("Invalid block size parameter");
    if (blksz < 512) throw new TargetError("Block size must be at least 512");
    if ((blksz & (blksz - 1)) !== 0) throw new TargetError("Block size must be a power of 2");
    if (blksz / 512 > Math.min(this.len, DUST_MAX_BLKSZ_SECTORS)) throw new TargetError("Block size is too large");
    const start = parseSector(args[1]!);
    if (start === null) throw new TargetError("Invalid device offset sector");
    try {
      this.device = await this.devices.get(args[0]!, this.table.readOnly ? "r" : "rw");
    } catch {
      // dust_ctr returns -EINVAL whatever dm_get_device said.
      throw new TargetError("Device lookup failed");
    }
    this.start = start;
    this.blksz = blksz;
    this.sectPerBlock = blksz / 512;
    this.maxIoLen = this.sectPerBlock;
    this.numDiscardBios = 1;
    this.numFlushBios = 1;
  }

  /** DMINFO/DMERR lines, with the kernel's text. */
  private log(level: "info" | "error", text: string): void {
    this.logger[level](`dust: ${text}`, { device: this.table.deviceName });
  }

  map(bio: Bio): MapResult {
    bio.device = this.device;
    // An empty flush has no block: it passes (see docs/targets.md).
    if (bio.op === "flush") return MapResult.REMAPPED;
    bio.sector = this.start + (bio.sector - this.begin);
    if (!this.failReadOnBb) return MapResult.REMAPPED;
    const block = Math.floor(bio.sector / this.sectPerBlock);
    const bad = this.badBlocks.get(block);
    if (bio.op === "read") return bad ? MapResult.KILL : MapResult.REMAPPED;
    if (bad && bad.wrFailCnt > 0) {
      bad.wrFailCnt--;
      return MapResult.KILL;
    }
    if (bad) {
      this.badBlocks.delete(block);
      // The kernel divides the block number by sectors-per-block once more for this line only.
      if (!this.quietMode)
        this.log("info", `block ${Math.floor(block / this.sectPerBlock)} removed from badblocklist by write`);
    }
    return MapResult.REMAPPED;
  }

  override message(argv: string[]): string | undefined {
    const argc = argv.length;
    const cmd = argv[0]!.toLowerCase();
    const fail = (text: string, logged = true): never => {
      if (logged) this.log("error", text);
      throw new TargetError(text);
    };
    if (argc === 1) {
      switch (cmd) {
        case "addbadblock":
        case "removebadblock":
        case "queryblock":
          return fail(`${argv[0]} requires an additional argument`);
        case "disable":
          this.log("info", "disabling read failures on bad sectors");
          this.failReadOnBb = false;
          return undefined;
        case "enable":
          this.log("info", "enabling read failures on bad sectors");
          this.failReadOnBb = true;
          return undefined;
        case "countbadblocks":
          return `countbadblocks: ${this.badBlocks.size} badblock(s) found`;
        case "clearbadblocks": {
          const had = this.badBlocks.size > 0;
          this.badBlocks.clear();
          return had ? "dust_clear_badblocks: badblocks cleared" : "dust_clear_badblocks: no badblocks found";
        }
        case "quiet":
          this.quietMode = !this.quietMode;
          return undefined;
        case "listbadblocks": {
          if (this.badBlocks.size === 0) return "No blocks in badblocklist";
          return [...this.badBlocks.keys()]
            .sort((a, b) => a - b)
            .map((b) => `${b}\n`)
            .join("");
        }
        default:
          return fail(`unrecognized message '${argv[0]}' received`);
      }
    }
    if (argc === 2 || argc === 3) {
      // The kernel fails a bad number with EINVAL and logs nothing.
      const block = parseUnsigned(argv[1]!);
      if (block === null) return fail(`invalid block number '${argv[1]}'`, false);
      let wrFailCnt = 0;
      if (argc === 3) {
        const cnt = parseUnsigned(argv[2]!, UINT_MAX);
        if (cnt === null) return fail(`invalid write fail count '${argv[2]}'`, false);
        if (cnt > 255) return fail("selected write fail count out of range");
        wrFailCnt = cnt;
      }
      // Blocks 0..size/blocks inclusive are accepted (the kernel compares with >).
      if (block > Math.floor(this.device.sizeSectors / this.sectPerBlock))
        return fail("selected block value out of range");
      if (argc === 3) {
        if (cmd === "addbadblock") return this.addBlock(block, wrFailCnt);
        return fail(`unrecognized message '${argv[0]}' received`);
      }
      switch (cmd) {
        case "addbadblock":
          return this.addBlock(block, 0);
        case "removebadblock":
          return this.removeBlock(block);
        case "queryblock":
          return `dust_query_block: block ${block} ${this.badBlocks.has(block) ? "found" : "not found"} in badblocklist`;
        default:
          return fail(`unrecognized message '${argv[0]}' received`);
      }
    }
    return fail(`invalid number of arguments '${argc}'`);
  }

  private addBlock(block: number, wrFailCnt: number): undefined {
    if (this.badBlocks.has(block)) {
      const text = `dust_add_block: block ${block} already in badblocklist`;
      if (!this.quietMode) this.log("error", text);
      throw new TargetError(text);
    }
    this.badBlocks.set(block, { wrFailCnt });
    if (!this.quietMode)
      this.log("info", `dust_add_block: badblock added at block ${block} with write fail count ${wrFailCnt}`);
    return undefined;
  }

  private removeBlock(block: number): undefined {
    if (!this.badBlocks.has(block)) {
      const text = `dust_remove_block: block ${block} not found in badblocklist`;
      if (!this.quietMode) this.log("error", text);
      throw new TargetError(text);
    }
    this.badBlocks.delete(block);
    if (!this.quietMode) this.log("info", `dust_remove_block: badblock removed at block ${block}`);
    return undefined;
  }

  override status(type: StatusType): string {
    if (type === "info") {
      return `${this.device.tableName} ${this.failReadOnBb ? "fail_read_on_bad_block" : "bypass"} ${this.quietMode ? "quiet" : "verbose"}`;
    }
    return `${this.device.tableName} ${this.start} ${this.blksz}`;
  }

  override iterateDevices(fn: DeviceAreaCallback): boolean {
    return fn(this.device, this.start, this.len) === true;
  }
}
