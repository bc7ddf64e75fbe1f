/**
 * udmsetup's help: the general usage (`udmsetup --help`, `udmsetup help`) with the environment,
 * examples and the commands that take --json, and each command's own (`udmsetup help CMD`,
 * `udmsetup CMD --help`).
 */

export const USAGE = `Usage: udmsetup [--run-dir DIR] [--no-autostart] [--json] <command> [args]
       udmsetup help [COMMAND] | udmsetup COMMAND --help | udmsetup --version
Options (as dmsetup): [-v] [-f] [-r] [--checks] [--manglename none|hex|auto] [--noopencount] [--noflush]
  [--inactive] [--retry] [-c] [-o FIELDS] [-O SORT] [-S SELECTION] [--noheadings] [--separator S]
  [-U UID] [-G GID] [-M MODE]
Commands (as dmsetup):
  create NAME [TABLE_FILE] [--table TABLE] [-u UUID] [-r] [-n|--notable]
  create --concise [SPEC]
  load|reload NAME [TABLE_FILE] [--table TABLE] [-r]
  clear NAME...
  suspend [--noflush] NAME...
  resume NAME...
  remove [-f] [--retry] [--deferred] NAME...
  remove_all [-f]
  rename NAME NEWNAME | rename NAME --setuuid UUID
  ls [--target TYPE] [--exec COMMAND] [--tree] [-o OPTIONS]
  info [-c [-o FIELDS] [--noheadings] [--separator S]] [NAME...]   (-o help lists the fields)
  table [--target TYPE] [--concise] [--inactive] [NAME...]
  status [--target TYPE] [--inactive] [NAME...]
  message NAME SECTOR MESSAGE...
  targets
  target-version TARGET...
  deps [-o devno|blkdevname|devname] [NAME...]
  wait NAME [EVENT_NR]
  mangle [NAME...]
  setgeometry NAME CYL HEAD SECT START
  version
  splitname NAME [SUBSYSTEM] [-o FIELDS]
  udevflags COOKIE | udevcookies | udevcomplete COOKIE | udevcomplete_all [AGE]
  mknodes [NAME] | help [COMMAND]
  wipe_table NAME...     replace the table with one error target of the same size, and resume
udm extras:
  attach NAME            expose NAME as a kernel block device (root), print its path
  detach NAME            undo attach
  merge ORIGIN SNAPSHOT  merge SNAPSHOT back into ORIGIN (snapshot-merge), with progress;
                         ORIGIN ends as snapshot-origin
  daemon [--foreground] [UDMD_OPTION...]
                         start udmd on the run directory (in the background unless --foreground);
                         udmd's options pass through (udmsetup help daemon lists them)
  daemon stop            stop the run directory's udmd (devices flushed and removed) and wait for it
  plugin load MODULE     load a target plugin into udmd: a path or a package name, resolved here
  plugin list            the plugins udmd loaded: FILE: TARGET...
--json: ls, info, table, status, targets, deps and plugin print JSON; with --json, every command
  reports a failure as one line {"error": MESSAGE, "errno": NAME} on stderr (same exit status).
Environment:
  UDM_RUN_DIR            the run directory (udmd's sockets, pid, log), as --run-dir; default
                         /run/udm for root, else $XDG_RUNTIME_DIR/udm, else /tmp/udm-$UID
  UDM_NO_AUTOSTART=1     do not start udmd when none answers, as --no-autostart
  UDM_DEV_DIR            where udmd links attached devices as NAME (default /dev/udm); ls --exec
                         passes $UDM_DEV_DIR/NAME
  UDM_AUTO_ATTACH=1      (read by udmd, also one udmsetup starts) attach every device when it is
                         activated, as udmd --auto-attach
  DM_DEFAULT_NAME_MANGLING_MODE  none|hex|auto (default auto), as --manglename
Examples:
  udmsetup create vol --table '0 2097152 linear /var/tmp/disk.img 0'   # 1 GiB of that file
  udmsetup info -c -o name,attr,open,devs_used
  udmsetup --json info vol                  # with its NBD URI
  qemu-img info "nbd+unix:///vol?socket=$UDM_RUN_DIR/nbd.sock"
  udmsetup attach vol                       # root: /dev/udm/vol, a kernel block device
  udmsetup remove vol
  udmsetup daemon stop
`;

interface CommandHelp {
  usage: string;
  text: string;
}

/** Each command's help: its usage line(s), then what it does. */
const COMMANDS: Record<string, CommandHelp> = {
  create: {
    usage: `create NAME [TABLE_FILE] [--table TABLE] [-u UUID] [-r] [-n|--notable] [-U UID] [-G GID] [-M MODE]
create --concise [NAME,UUID,MINOR,rw|ro,TABLE[,TABLE...][;...]]`,
    text: `Create device NAME and load and resume its table: from --table (lines separated by newlines), from
TABLE_FILE, or from stdin. Blank lines and # comments are ignored. --notable creates it without a
table. A failed create leaves nothing behind. --concise creates several devices.
  udmsetup create vol --table '0 2048 linear /var/tmp/disk.img 0'`,
  },
  load: {
    usage: "load|reload NAME [TABLE_FILE] [--table TABLE] [-r]",
    text: "Load a table into NAME's inactive slot; resume swaps it in.",
  },
  clear: { usage: "clear [-S SELECTION] NAME...", text: "Drop NAME's inactive table." },
  suspend: {
    usage: "suspend [--noflush] [--checks] [-S SELECTION] NAME...",
    text: "Wait for NAME's I/O in flight; new I/O waits until resume. NBD clients see a pause, not an error.",
  },
  resume: { usage: "resume [-S SELECTION] NAME...", text: "Swap in the inactive table if any, and let I/O through." },
  remove: {
    usage: "remove [-f] [--retry] [--deferred] [-S SELECTION] NAME...",
    text: `Remove NAME; refused while it is open (NBD clients, other tables, users of its attached kernel
device) unless -f, which ends NBD connections and fails held I/O. --retry retries a busy device
25 times; --deferred marks it and removes it when its last user goes.`,
  },
  remove_all: { usage: "remove_all [-f]", text: "Remove every device, top of each stack first." },
  rename: {
    usage: "rename NAME NEWNAME | rename NAME --setuuid UUID",
    text: "Rename a device (it keeps its NBD clients and attached kernel device), or give it a uuid.",
  },
  ls: {
    usage: "ls [--target TYPE] [--exec COMMAND] [--tree [-o OPTIONS]] [-S SELECTION]",
    text: "List the devices: NAME (MAJOR:MINOR). --tree draws what uses what. --json: the list as JSON.",
  },
  info: {
    usage: `info [-S SELECTION] [NAME...]
info -c [-o FIELDS] [-O SORT] [--noheadings] [--separator S] [--nameprefixes] [--rows] [-S SELECTION] [NAME...]`,
    text: `Show each device's state (every device without NAME). -c prints a report of the fields -o names
(-o help lists them; -o +FIELD adds to the default ones). A table over NBD URIs adds Remote lines:
each one's connection state. --json: one object per device, with its NBD URI, attached kernel
device, geometry and remote devices.
  udmsetup info -c -o name,attr,open,devs_used`,
  },
  table: {
    usage: "table [--target TYPE] [--concise] [--inactive] [-S SELECTION] [NAME...]",
    text: "Print the live (or --inactive) table. --json: the lines as objects.",
  },
  status: {
    usage: "status [--target TYPE] [--inactive] [-S SELECTION] [NAME...]",
    text: "Print each target's status line. --json: the lines as objects.",
  },
  message: {
    usage: "message NAME SECTOR MESSAGE...",
    text: "Send MESSAGE to the target at SECTOR (0 for most targets).",
  },
  targets: { usage: "targets", text: "List the target types and their versions. --json: as objects." },
  "target-version": { usage: "target-version TARGET...", text: "Print the given targets' lines of `targets`." },
  deps: {
    usage: "deps [-o devno|blkdevname|devname] [-S SELECTION] [NAME...]",
    text: "Print the devices each device uses (files by path). --json: as objects.",
  },
  wait: {
    usage: "wait NAME [EVENT_NR]",
    text: "Return once NAME's event number differs from EVENT_NR (default 0).",
  },
  mangle: { usage: "mangle [NAME...]", text: "Rename devices whose names are not in the --manglename form." },
  setgeometry: { usage: "setgeometry NAME CYL HEAD SECT START", text: "Set the geometry HDIO_GETGEO would report." },
  version: { usage: "version", text: "Print udm's library version and udmd's driver version." },
  splitname: {
    usage: "splitname NAME [SUBSYSTEM] [-o FIELDS] [--noheadings] [--separator S]",
    text: "Split an LVM device name into VG, LV and layer (no daemon needed). -o help lists the fields.",
  },
  udevflags: { usage: "udevflags COOKIE", text: "Name the udev flags in a cookie's upper 16 bits." },
  udevcookies: { usage: "udevcookies", text: "udm has no udev cookies: prints the heading only." },
  udevcomplete: { usage: "udevcomplete COOKIE", text: "Prints DM_COOKIE_COMPLETED=0x...; nothing to wake." },
  udevcomplete_all: { usage: "udevcomplete_all [AGE]", text: "udm has no udev cookies: destroys nothing." },
  mknodes: { usage: "mknodes [NAME...]", text: "udm makes no /dev/mapper nodes: nothing to do." },
  help: { usage: "help [COMMAND]", text: "Print the usage, or COMMAND's help." },
  wipe_table: {
    usage: "wipe_table [--noflush] [-S SELECTION] NAME...",
    text: "Replace each table with one error target of the same size, and resume.",
  },
  attach: {
    usage: "attach NAME [-U UID] [-G GID] [-M MODE]",
    text: "Expose NAME as a kernel block device (root) and print its path; $UDM_DEV_DIR/NAME links to it.",
  },
  detach: { usage: "detach NAME", text: "Undo attach." },
  merge: {
    usage: "merge ORIGIN SNAPSHOT",
    text: "Merge SNAPSHOT back into ORIGIN (snapshot-merge) with progress; ORIGIN ends as snapshot-origin.",
  },
  daemon: {
    usage: `daemon [--foreground] [UDMD_OPTION...]
daemon stop`,
    text: `daemon starts udmd on the run directory (udmsetup's --run-dir, $UDM_RUN_DIR or the default) and
returns once it answers, its log in RUN_DIR/udmd.log; with --foreground it runs udmd here, logging
to the terminal, until Ctrl-C. udmd's options follow, no -- needed:
  udmsetup daemon --foreground --plugin ./dist/index.js --log-format text
daemon stop stops the run directory's udmd as SIGTERM does (I/O flushed, devices removed, sockets
and pid file gone) and returns once it has exited; with no udmd there it fails.`,
  },
  plugin: {
    usage: "plugin load MODULE | plugin list",
    text: `load: load a target plugin into udmd (a path relative to here, or a package name resolved from
here) and print FILE: TARGET...; list: every plugin udmd loaded. --json: as objects.`,
  },
};
COMMANDS.reload = COMMANDS.load!;

/** `udmsetup help CMD`, or undefined for a command there is no such help for. */
export function commandHelp(command: string, udmdUsage: string): string | undefined {
  const help = Object.hasOwn(COMMANDS, command) ? COMMANDS[command] : undefined;
  if (!help) return undefined;
  const [first, ...more] = help.usage.split("\n");
  const usage = [`Usage: udmsetup ${first}`, ...more.map((l) => `       udmsetup ${l}`)].join("\n");
  const extra = command === "daemon" ? `\nudmd's options:\n${udmdUsage.replace(/^Usage:.*\n/, "")}` : "";
  return `${usage}\n\n${help.text}\n${extra}`;
}
