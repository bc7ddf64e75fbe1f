/**
 * `mangle [NAME...]` (dmsetup.c _mangle): bring each device's name into the form the mangling
 * mode wants (--manglename; auto by default), renaming it when it is not. dmsetup looks devices
 * up and renames them with mangling off, so a name the daemon holds unmangled can be reached; the
 * uuid cannot be renamed, so a uuid in the wrong form is an error.
 */
import { ManglingError, type ManglingMode, mangleString, unmangleString } from "./name-mangling.js";

export type MangleDecision = { rename: false; message: string } | { rename: true; newName: string; message: string };

const NAME_LEN = 128;
const UUID_LEN = 129;

/**
 * What dmsetup does with a device called `name` (as the daemon holds it) whose uuid is `uuid`:
 * the line it prints on stdout and whether it renames. Throws ManglingError with its messages.
 */
export function mangleDecision(name: string, uuid: string, target: ManglingMode): MangleDecision {
  if (target === "auto") {
    if (name.includes("\\x5cx"))
      throw new ManglingError(
        `The name "${name}" seems to be mangled more than once. Manual intervention required to rename the device.`,
      );
    if (uuid.includes("\\x5cx"))
      throw new ManglingError(
        `The UUID "${uuid}" seems to be mangled more than once. Manual intervention required to correct the device UUID.`,
      );
  }
  // The library runs in mode none here, which mangles as auto: hex asks for the same names.
  const convert = (s: string, what: string, failure: string, bufLen: number) => {
    if (target === "none") return unmangleString(s, what, "none");
    try {
      return mangleString(s, what, "none", bufLen);
    } catch (err) {
      throw new ManglingError(`${(err as Error).message}\n${failure} "${s}".`);
    }
  };
  const newName = convert(name, "name", "Failed to mangle device name", NAME_LEN);
  const newUuid = convert(uuid, "UUID", "Failed to mangle device uuid", UUID_LEN);
  if (uuid !== newUuid)
    throw new ManglingError(
      `${name}: ${uuid}: UUID in incorrect form. \nUnable to change device UUID. The device must be deactivated first.`,
    );
  if (name === newName) {
    const message = `${name}: ${uuid || "[no UUID]"}: name ${uuid ? "and UUID " : ""}already in correct form`;
    return { rename: false, message };
  }
  return { rename: true, newName, message: `${name}: renaming to ${newName}` };
}
