/**
 * libdm's name mangling (libdm-common.c: mangle_string, unmangle_string and their callers): in
 * `auto` and `hex` modes, names and uuids are sent to the daemon with every byte outside udev's
 * whitelist written as `\xNN`, and read back decoded, so that a device made with
 * `udmsetup create 'a b'` is `a\x20b` in udmd (its NBD export, its /dev link) and `a b` on
 * udmsetup's side, as with dmsetup and the kernel. `none` passes names through. A name read back
 * that should have been mangled and was not makes the command fail, as in libdm; `udmsetup
 * mangle` puts such names right.
 */
import type { ControlClient } from "../control/client.js";
import type { Op, RequestMap } from "../control/protocol.js";
import { deviceNameFromPath } from "./device-path.js";

export type ManglingMode = "none" | "auto" | "hex";

/** libdm's message for a name it cannot mangle or unmangle; the command fails with it. */
export class ManglingError extends Error {}

/** DM_NAME_LEN and DM_UUID_LEN: the buffers a mangled name or uuid must fit in, NUL included. */
const NAME_LEN = 128;
const UUID_LEN = 129;

/** `--manglename` values, any case, as dmsetup takes them; null for anything else. */
export function parseManglingMode(text: string): ManglingMode | null {
  const mode = text.toLowerCase();
  return mode === "none" || mode === "auto" || mode === "hex" ? mode : null;
}

/** libdm's default: $DM_DEFAULT_NAME_MANGLING_MODE when it names a mode, else auto. */
export function manglingModeFromEnv(env: NodeJS.ProcessEnv): ManglingMode {
  return parseManglingMode(env.DM_DEFAULT_NAME_MANGLING_MODE ?? "") ?? "auto";
}

const isWhitelisted = (byte: number) => /[0-9A-Za-z#+\-.:=@_]/.test(String.fromCharCode(byte));
const BACKSLASH = 0x5c;
const X = 0x78;

/** What the string is in libdm's messages: "name", "UUID", "new name". */
type What = string;

/** check_multiple_mangled_string_allowed: `\x5cx` is a mangled backslash before an `x`. */
export function checkMangledOnce(str: string, what: What, mode: ManglingMode): void {
  if (mode === "auto" && str.includes("\\x5cx"))
    throw new ManglingError(
      `The ${what} "${str}" seems to be mangled more than once. This is not allowed in auto mode.`,
    );
}

/**
 * mangle_string: the mangled form, or `str` itself when it needs none. In auto mode (and `none`,
 * which mangles as auto when asked to), a `\xNN` already there is kept, and a mix of mangled and
 * unmangled parts is refused; hex mode mangles every byte outside the whitelist, backslashes too.
 */
export function mangleString(str: string, what: What, mode: ManglingMode, bufLen = NAME_LEN): string {
  const bytes = Buffer.from(str);
  const auto = mode !== "hex";
  let out = "";
  let need: boolean | undefined;
  const mixed = () =>
    new ManglingError(
      `The ${what} "${str}" contains mixed mangled and unmangled characters or it's already mangled improperly.`,
    );
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i]!;
    if (auto && b === BACKSLASH && bytes[i + 1] === X) {
      if (bytes.length - i < 4 || need === true) throw mixed();
      out += bytes.subarray(i, i + 4).toString("latin1");
      i += 3;
      need = false;
      continue;
    }
    if (isWhitelisted(b)) {
      out += String.fromCharCode(b);
      continue;
    }
    if (auto && need === false) throw mixed();
    out += `\\x${b.toString(16).padStart(2, "0")}`;
    need = true;
  }
  if (need && out.length > bufLen - 1) throw new ManglingError(`Mangled form of the ${what} too long for "${str}".`);
  return need ? out : str;
}

/**
 * unmangle_string: `\xNN` decoded. Strict (any mode but none): a byte that should have been
 * mangled is an error. As libdm's sscanf("%2x"), one or two hex digits are read; anything else
 * after `\x` ends the result there.
 */
export function unmangleString(str: string, what: What, mode: ManglingMode): string {
  const bytes = Buffer.from(str);
  const out: number[] = [];
  let decoded = false;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i]!;
    if (mode !== "none" && !isWhitelisted(b) && b !== BACKSLASH)
      throw new ManglingError(`The ${what} "${str}" should be mangled but it contains blacklisted characters.`);
    if (b === BACKSLASH && bytes[i + 1] === X) {
      const hex = /^[0-9a-fA-F]{1,2}/.exec(bytes.subarray(i + 2, i + 4).toString("latin1"));
      if (!hex) break;
      out.push(parseInt(hex[0], 16));
      i += 3;
      decoded = true;
    } else {
      out.push(b);
    }
  }
  return decoded ? Buffer.from(out).toString() : str;
}

/** dm_task_set_name and friends: the form a name (uuid) is sent in. */
function sendForm(str: string, what: What, failure: string, mode: ManglingMode, bufLen = NAME_LEN): string {
  checkMangledOnce(str, what, mode);
  if (mode === "none") return str;
  try {
    return mangleString(str, what, mode, bufLen);
  } catch (err) {
    throw new ManglingError(`${(err as Error).message}\n${failure} "${str}".`);
  }
}

/** The name as the daemon knows it; a path (with a `/`) is not mangled, as in dm_task_set_name. */
export function sentName(name: string, mode: ManglingMode): string {
  return name.includes("/") ? name : sendForm(name, "name", "Failed to mangle device name", mode);
}

/** What the daemon said, as libdm hands it on after the ioctl (_do_dm_ioctl_unmangle_string). */
function readForm(str: string, what: What, mode: ManglingMode): string {
  if (mode === "none") return str;
  checkMangledOnce(str, what, mode);
  return unmangleString(str, what, mode);
}

type Requester = Pick<ControlClient, "request">;

interface Named {
  name: string;
  uuid?: string;
}

/**
 * A control client that sends names and uuids mangled and reads them back unmangled, as libdm
 * does around every ioctl.
 */
export class ManglingClient implements Requester {
  constructor(
    private readonly client: Requester,
    readonly mode: ManglingMode,
    /** Where device links are: a device named by a path is looked up there (device-path.ts). */
    private readonly devDirs?: readonly string[],
  ) {}

  async request<O extends Op>(op: O, args: RequestMap[O]): Promise<unknown> {
    const sent: Record<string, unknown> = { ...args };
    const mode = this.mode;
    if (typeof sent.name === "string") {
      // A path names an existing device (never one to create) and is not mangled: dm_task_set_name.
      const byPath = op !== "create" && this.devDirs !== undefined && sent.name.includes("/");
      sent.name = byPath ? await deviceNameFromPath(sent.name, this.devDirs!) : sentName(sent.name, mode);
    }
    if (typeof sent.newName === "string")
      sent.newName = sendForm(sent.newName, "new name", "Failed to mangle new device name", mode);
    if (typeof sent.uuid === "string")
      sent.uuid = sendForm(sent.uuid, "UUID", "Failed to mangle device uuid", mode, UUID_LEN);
    if (typeof sent.newUuid === "string")
      sent.newUuid = sendForm(sent.newUuid, "new UUID", "Failed to mangle new device UUID", mode, UUID_LEN);
    const result = await this.client.request(op, sent as RequestMap[O]);
    switch (op) {
      case "list":
        return (result as Named[]).map((d) => this.read(d));
      case "info":
        return this.read(result as Named);
      case "wait": {
        const r = result as { info: Named };
        return { ...r, info: this.read(r.info) };
      }
      default:
        return result;
    }
  }

  private read<T extends Named>(d: T): T {
    const name = readForm(d.name, "name", this.mode);
    return d.uuid === undefined ? { ...d, name } : { ...d, name, uuid: readForm(d.uuid, "UUID", this.mode) };
  }
}
