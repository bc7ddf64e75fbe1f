/**
 * `-U/--uid`, `-G/--gid`, `-M/--mode`: dmsetup gives them to the device node libdm makes. udm's
 * node is the kernel device an attached device is bound to (its `$UDM_DEV_DIR/NAME` link points
 * there), so that is what they change, on `create` of a device udmd attaches and on `attach`.
 */
import fs from "node:fs";
import { strerror } from "../../core/errors.js";

export interface NodeOwner {
  uid?: number;
  gid?: number;
  mode?: number;
}

export const hasNodeOwner = (o: NodeOwner) => o.uid !== undefined || o.gid !== undefined || o.mode !== undefined;

/** chown and chmod `path`; failures as libdm's log_sys_error words them. */
export function applyNodeOwner(path: string, o: NodeOwner): void {
  const step = (what: string, fn: () => void) => {
    try {
      fn();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? "EIO";
      throw new Error(`${path}: ${what} failed: ${strerror(code)}`);
    }
  };
  if (o.uid !== undefined || o.gid !== undefined) step("chown", () => fs.chownSync(path, o.uid ?? -1, o.gid ?? -1));
  if (o.mode !== undefined) step("chmod", () => fs.chmodSync(path, o.mode! & 0o7777));
}
