/**
 * dmsetup commands that need no device-mapper driver, so udmsetup answers them without udmd:
 * `splitname` (a report over an LVM name), the udev cookie commands (udm has no udev
 * synchronisation: no cookie is ever outstanding, so they report nothing pending), `mknodes`
 * (udm makes no /dev/mapper nodes: nothing to fix) and `help`. Output as lvm2's dmsetup.c
 * prints it (_splitname, _udevflags, _udevcookies, _udevcomplete, _udevcomplete_all).
 */
import { UsageError } from "./options.js";
import type { CliOptions } from "./options.js";
import type { Io } from "./commands.js";
import { formatInfoColumns } from "./format/report.js";
import type { Selection } from "./select.js";

/** libdm's udev cookie prefix (DM_COOKIE_MAGIC): the semaphore keys dmsetup would look at. */
const DM_COOKIE_MAGIC = 0x0d4d;
const DM_UDEV_FLAGS_SHIFT = 16;

/** Names of the udev flags in a cookie's upper 16 bits (libdevmapper.h), bit 0 first. */
const UDEV_FLAGS = [
  "DM_UDEV_DISABLE_DM_RULES_FLAG",
  "DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG",
  "DM_UDEV_DISABLE_DISK_RULES_FLAG",
  "DM_UDEV_DISABLE_OTHER_RULES_FLAG",
  "DM_UDEV_LOW_PRIORITY_FLAG",
  "DM_UDEV_DISABLE_LIBRARY_FALLBACK_FLAG",
  "DM_UDEV_PRIMARY_SOURCE_FLAG",
  "DM_UDEV_FLAG7",
  ...Array.from({ length: 8 }, (_, i) => `DM_SUBSYSTEM_UDEV_FLAG${i}`),
];

export const LOCAL_COMMANDS = new Set([
  "splitname",
  "udevflags",
  "udevcookies",
  "udevcomplete",
  "udevcomplete_all",
  "mknodes",
  "help",
]);

/** Parse a cookie the way dmsetup does (strtoul with base 0: decimal, 0x hex, 0 octal). */
function parseCookie(text: string | undefined): number {
  if (text === undefined) throw new UsageError("Incorrect number of arguments.");
  const value = /^0x[0-9a-f]+$/i.test(text)
    ? parseInt(text, 16)
    : /^0[0-7]*$/.test(text)
      ? parseInt(text, 8)
      : /^[1-9]\d*$/.test(text)
        ? parseInt(text, 10)
        : NaN;
  if (!Number.isSafeInteger(value) || value > 0xffffffff) throw new UsageError(`Invalid cookie value: ${text}`);
  return value;
}

/** Run a local command; the exit status. */
export function runLocalCommand(
  command: string,
  args: string[],
  opts: CliOptions,
  io: Io,
  usage: string,
  selection: Selection | null = null,
): number {
  switch (command) {
    case "splitname": {
      const [name, subsystem = "LVM"] = args;
      if (name === undefined || args.length > 2) throw new UsageError("Incorrect number of arguments.");
      // The report's vg/lv/layer fields split names of devices whose uuid has subsystem LVM.
      const info = { name, uuid: `${subsystem}-`, major: 0, minor: 0 } as Parameters<typeof formatInfoColumns>[0][0];
      io.out(
        formatInfoColumns([info], {
          fields: opts.options ?? "vg_name,lv_name,lv_layer",
          noHeadings: opts.noheadings,
          separator: opts.separator,
          nameprefixes: opts.nameprefixes,
          rows: opts.rows,
          selection: selection ?? undefined,
        }),
      );
      return 0;
    }
    case "udevflags": {
      const flags = parseCookie(args[0]) >>> DM_UDEV_FLAGS_SHIFT;
      UDEV_FLAGS.forEach((flag, bit) => {
        if (flags & (1 << bit)) io.out(`${flag}='1'\n`);
      });
      return 0;
    }
    case "udevcookies":
      io.out("Cookie       Semid      Value      Last semop time           Last change time\n");
      return 0;
    case "udevcomplete": {
      const cookie = parseCookie(args[0]);
      io.out(`DM_COOKIE_COMPLETED=0x${cookie.toString(16)}\n`);
      return 0;
    }
    case "udevcomplete_all": {
      const prefix = `${DM_COOKIE_MAGIC} (0x${DM_COOKIE_MAGIC.toString(16)})`;
      io.out(`0 semaphores with keys prefixed by ${prefix} destroyed. 0 skipped.\n`);
      return 0;
    }
    case "mknodes":
      return 0;
    case "help":
      io.out(usage);
      return 0;
    default:
      throw new Error(`not a local command: ${command}`);
  }
}
