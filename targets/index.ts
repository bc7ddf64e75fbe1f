/** The targets udm ships, oldest first (the registry lists the newest first, like the kernel). */
import { ErrorTarget } from "./error.js";
import { LinearTarget } from "./linear.js";
import { SnapshotOriginTarget } from "./snapshot/origin.js";
import { SnapshotTarget } from "./snapshot/snapshot.js";
import { StripedTarget } from "./striped.js";
import { ZeroTarget } from "./zero.js";

export { ErrorTarget, LinearTarget, SnapshotOriginTarget, SnapshotTarget, StripedTarget, ZeroTarget };

export const builtinTargets = [ErrorTarget, ZeroTarget, StripedTarget, LinearTarget, SnapshotOriginTarget, SnapshotTarget];
