/**
 * zero: reads return zeros, writes and discards succeed and are dropped (dm-zero.c).
 */
import type { Bio } from "../core/bio.js";
import { BioFlags } from "../core/bio.js";
import { target } from "../core/registry.js";
import { MapResult, Target, TargetError } from "../core/target.js";

@target({ name: "zero", version: [1, 2, 0] })
export class ZeroTarget extends Target {
  ctr(args: string[]): void {
    if (args.length !== 0) throw new TargetError("No arguments required");
    this.numDiscardBios = 1;
  }

  map(bio: Bio): MapResult {
    switch (bio.op) {
      case "read":
        // Readahead of nothing is pointless: the kernel fails it rather than zero-filling.
        if (bio.flags & BioFlags.RAHEAD) return MapResult.KILL;
        bio.data.fill(0);
        bio.complete("ok");
        return MapResult.SUBMITTED;
      case "write":
      case "discard":
        bio.complete("ok");
        return MapResult.SUBMITTED;
      default:
        return MapResult.KILL;
    }
  }
}
