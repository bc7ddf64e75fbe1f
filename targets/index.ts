/** The targets udm ships, oldest first (the registry lists the newest first, like the kernel). */
import { ErrorTarget } from "./error.js";
import { LinearTarget } from "./linear.js";
import { StripedTarget } from "./striped.js";
import { ZeroTarget } from "./zero.js";

export { ErrorTarget, LinearTarget, StripedTarget, ZeroTarget };

export const builtinTargets = [ErrorTarget, ZeroTarget, StripedTarget, LinearTarget];
