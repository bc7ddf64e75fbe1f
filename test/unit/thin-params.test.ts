/**
 * The thin-pool and thin table lines, status lines and message arguments as dm-thin.c reads and
 * prints them: error strings in the constructors' order, feature lists, trailing spaces.
 */
import { describe, expect, it } from "vitest";
import { TargetError } from "../../core/target.js";
import {
  defaultPoolFeatures,
  formatPoolFeatures,
  formatPoolStatus,
  formatPoolTable,
  formatThinStatus,
  metadataLowWater,
  parseDevId,
  parsePoolArgs,
  parsePoolNumbers,
  parseThinArgs,
  parseTransactionId,
} from "../../targets/thin/params.js";

function ctrError(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof TargetError) return err.message;
    throw err;
  }
  return "ok";
}

describe("thin-pool table line", () => {
  it("checks the argument count, distinct devices and features before anything else", () => {
    expect(ctrError(() => parsePoolArgs(["m", "d", "128"]))).toBe("Invalid argument count");
    expect(ctrError(() => parsePoolArgs(["m", "m", "128", "0"]))).toBe("Error setting metadata or data device");
    expect(ctrError(() => parsePoolArgs(["m", "d", "128", "0", "5", "a", "b", "c", "d", "e"]))).toBe(
      "Invalid number of pool feature arguments",
    );
    expect(ctrError(() => parsePoolArgs(["m", "d", "128", "0", "2", "read_only"]))).toBe(
      "Invalid number of pool feature arguments",
    );
    expect(ctrError(() => parsePoolArgs(["m", "d", "128", "0", "1", "zero_blocks"]))).toBe(
      "Unrecognised pool feature requested",
    );
    const { features } = parsePoolArgs([
      "m",
      "d",
      "128",
      "0",
      "4",
      "SKIP_BLOCK_ZEROING",
      "ignore_discard",
      "read_only",
      "error_if_no_space",
    ]);
    expect(features).toEqual({
      zeroNewBlocks: false,
      discardEnabled: false,
      discardPassdown: true,
      readOnly: true,
      errorIfNoSpace: true,
    });
    expect(parsePoolArgs(["m", "d", "128", "0"]).features).toEqual(defaultPoolFeatures());
  });

  it("block size: 64 KiB to 1 GiB in multiples of 64 KiB; the low water mark any count of blocks", () => {
    for (const bad of ["0", "64", "192", "2097280", "abc", "-128", ""]) {
      expect(ctrError(() => parsePoolNumbers(["m", "d", bad, "0"]))).toBe("Invalid block size");
    }
    expect(parsePoolNumbers(["m", "d", "2097152", "10"])).toEqual({ blockSize: 2097152, lowWaterBlocks: 10 });
    expect(ctrError(() => parsePoolNumbers(["m", "d", "128", "x"]))).toBe("Invalid low water mark");
  });

  it("prints features as emit_flags does, in its order, each with a trailing space", () => {
    expect(formatPoolFeatures(defaultPoolFeatures())).toBe("0 ");
    const all = {
      zeroNewBlocks: false,
      discardEnabled: false,
      discardPassdown: false,
      readOnly: true,
      errorIfNoSpace: true,
    };
    expect(formatPoolFeatures(all)).toBe(
      "5 skip_block_zeroing ignore_discard no_discard_passdown read_only error_if_no_space ",
    );
    expect(formatPoolTable("253:1", "253:2", 128, 32768, defaultPoolFeatures())).toBe("253:1 253:2 128 32768 0 ");
  });
});

describe("thin-pool status", () => {
  const base = {
    transactionId: 7n,
    usedMetadataBlocks: 10,
    totalMetadataBlocks: 4096,
    usedDataBlocks: 3,
    totalDataBlocks: 1000,
    heldRoot: 0,
    mode: "write" as const,
    features: defaultPoolFeatures(),
    needsCheck: false,
    metadataLowWater: metadataLowWater(4096),
  };

  it("prints the kernel's fields and words", () => {
    expect(formatPoolStatus(base)).toBe("7 10/4096 3/1000 - rw discard_passdown queue_if_no_space - 1024 ");
    expect(
      formatPoolStatus({
        ...base,
        heldRoot: 42,
        mode: "out-of-data-space",
        features: { ...base.features, discardPassdown: false, errorIfNoSpace: true },
        needsCheck: true,
      }),
    ).toBe("7 10/4096 3/1000 42 out_of_data_space no_discard_passdown error_if_no_space needs_check 1024 ");
    expect(
      formatPoolStatus({ ...base, mode: "read-only", features: { ...base.features, discardEnabled: false } }),
    ).toBe("7 10/4096 3/1000 - ro ignore_discard queue_if_no_space - 1024 ");
    expect(formatPoolStatus({ ...base, mode: "out-of-metadata-space" })).toContain(" ro ");
    expect(formatPoolStatus({ ...base, mode: "fail" })).toBe("Fail");
    expect(metadataLowWater(400)).toBe(100);
  });
});

describe("thin table line, status and messages", () => {
  it("checks arguments in thin_ctr's order", () => {
    expect(ctrError(() => parseThinArgs(["pool"]))).toBe("Invalid argument count");
    expect(ctrError(() => parseThinArgs(["pool", "1", "pool"]))).toBe("Error setting origin device");
    expect(ctrError(() => parseThinArgs(["pool", "16777216"]))).toBe("Invalid device id");
    expect(parseThinArgs(["pool", "16777215", "origin"])).toEqual({
      poolDev: "pool",
      devId: 16777215,
      externalOrigin: "origin",
    });
  });

  it("status: mapped sectors and the last sector of the highest mapped block", () => {
    expect(formatThinStatus("write", 0, undefined, 128)).toBe("0 -");
    expect(formatThinStatus("write", 3, 9, 128)).toBe("384 1279");
    expect(formatThinStatus("fail", 3, 9, 128)).toBe("Fail");
  });

  it("message arguments: device ids up to 2^24 - 1, transaction ids any u64", () => {
    expect([parseDevId("0"), parseDevId("16777215"), parseDevId("16777216"), parseDevId("1x")]).toEqual([
      0,
      16777215,
      null,
      null,
    ]);
    expect(parseTransactionId("18446744073709551615")).toBe(2n ** 64n - 1n);
    expect(parseTransactionId("18446744073709551616")).toBeNull();
    expect(parseTransactionId("-1")).toBeNull();
  });
});
