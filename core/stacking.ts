/**
 * Rules for stacking mapped devices on each other, checked when a table is loaded: no cycle (a
 * device that, through the tables below it, would end up under itself; its I/O would never end)
 * and a bounded height of the whole stack through the device. The kernel's block layer turns
 * such stacks into endless or stack-exhausting recursion; udm refuses them with a reason.
 */
import type { StackableDevice } from "./devices/shared-devices.js";
import { DmError } from "./errors.js";

/** Most mapped devices one I/O may pass through, top to bottom. */
export const MAX_STACK_DEPTH = 64;

/** Refuse a table of `self` that stacks on `lowers` when that makes a cycle or too high a stack. */
export function checkStacking(self: StackableDevice, lowers: readonly StackableDevice[]): void {
  for (const lower of lowers) {
    const path = pathDown(lower, self);
    if (path) {
      const names = [self, ...path].map((d) => d.name).join(" -> ");
      throw new DmError("EINVAL", `${self.name}: table would stack the device on itself: ${names}`);
    }
  }
  const depths = new Map<StackableDevice, number>();
  const below = Math.max(0, ...lowers.map((l) => depthBelow(l, depths)));
  const height = heightAbove(self, new Map()) + 1 + below;
  if (height > MAX_STACK_DEPTH) {
    throw new DmError(
      "EINVAL",
      `${self.name}: table would make a stack of ${height} mapped devices; at most ${MAX_STACK_DEPTH} may be stacked`,
    );
  }
}

/** The devices from `from` down to `to` through tables (both included), or null if `to` is not below. */
function pathDown(from: StackableDevice, to: StackableDevice): StackableDevice[] | null {
  const seen = new Set<StackableDevice>();
  const walk = (d: StackableDevice): StackableDevice[] | null => {
    if (d === to) return [d];
    if (seen.has(d)) return null;
    seen.add(d);
    for (const lower of d.lowerDevices()) {
      const rest = walk(lower);
      if (rest) return [d, ...rest];
    }
    return null;
  };
  return walk(from);
}

/**
 * Mapped devices in the longest chain from `d` down, `d` included. Memoised in `known`: devices
 * shared by several above (a diamond, a ladder) would otherwise be walked once per path, and the
 * paths through a ladder of n levels number 2^n.
 */
function depthBelow(d: StackableDevice, known: Map<StackableDevice, number>): number {
  let depth = known.get(d);
  if (depth === undefined) {
    depth = 1 + Math.max(0, ...d.lowerDevices().map((l) => depthBelow(l, known)));
    known.set(d, depth);
  }
  return depth;
}

/** Mapped devices in the longest chain of holders above `d`, `d` excluded; memoised as depthBelow. */
function heightAbove(d: StackableDevice, known: Map<StackableDevice, number>): number {
  let height = known.get(d);
  if (height === undefined) {
    height = Math.max(0, ...d.holders.map((h) => 1 + heightAbove(h, known)));
    known.set(d, height);
  }
  return height;
}
