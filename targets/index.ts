/** The targets udm ships, oldest first (the registry lists the newest first, like the kernel). */
import { ErrorTarget } from "./error.js";
import { LinearTarget } from "./linear.js";
import { SnapshotOriginTarget } from "./snapshot/origin.js";
import { SnapshotTarget } from "./snapshot/snapshot.js";
import { SnapshotMergeTarget } from "./snapshot/merge.js";
import { StripedTarget } from "./striped.js";
import { ZeroTarget } from "./zero.js";
import { DelayTarget } from "./delay.js";
import { DustTarget } from "./dust.js";
import { FlakeyTarget } from "./flakey.js";

export { DelayTarget, DustTarget, FlakeyTarget };
export {
  ErrorTarget,
  LinearTarget,
  SnapshotMergeTarget,
  SnapshotOriginTarget,
  SnapshotTarget,
  StripedTarget,
  ZeroTarget,
};

import { LogWritesTarget } from "./log-writes/target.js";
export { LogWritesTarget };

import { ThinPoolTarget } from "./thin/pool-target.js";
import { ThinTarget } from "./thin/thin-target.js";
export { ThinPoolTarget, ThinTarget };

export const builtinTargets = [
  ErrorTarget,
  ZeroTarget,
  StripedTarget,
  LinearTarget,
  SnapshotOriginTarget,
  SnapshotTarget,
  SnapshotMergeTarget,
  FlakeyTarget,
  DelayTarget,
  DustTarget,
  LogWritesTarget,
  // dm-thin.c registers thin-pool, then thin.
  ThinPoolTarget,
  ThinTarget,
];
