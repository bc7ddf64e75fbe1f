/**
 * udmd's command line: the options and the usage text, shared by udmd and by `udmsetup daemon`,
 * which passes udmd's options through and checks them before it starts one.
 */
import type { ParseArgsConfig } from "node:util";

export const UDMD_USAGE = `Usage: udmd [options]
  --run-dir DIR          run directory (default $UDM_RUN_DIR, /run/udm as root, else $XDG_RUNTIME_DIR/udm)
  --plugin MODULE        load a target plugin (file path or package name); repeatable
  --config FILE          JSON config: {"plugins": [...], "logLevel": "info", "nbdListen": "127.0.0.1:10809",
                         "tls": "require", "tlsCertificates": DIR, "tlsPsk": FILE}; relative paths in it
                         are relative to FILE's folder
  --log-level LEVEL      debug | info | warn | error (default info)
  --log-format text|json log lines for people (time, level, message, key=value) or JSON lines
                         (default: text when stderr is a terminal, json otherwise)
  --nbd-listen [HOST:]PORT  also serve NBD over TCP (default host 127.0.0.1; any other address
                         needs --tls=require)
  --tls=off|on|require   NBD TLS (STARTTLS), as nbdkit's and qemu-nbd's --tls: on offers it,
                         require refuses TCP clients until they start TLS (default off)
  --tls-certificates DIR x509: DIR/server-cert.pem, server-key.pem; with ca-cert.pem, clients
                         must present a certificate it signed
  --tls-psk FILE         pre-shared keys, one identity:hexkey per line (psktool's format)
  --nbd-handshake-timeout SECONDS  close NBD connections still negotiating after this long
                         (default 10; 0: never)
  --nbd-max-connections N  NBD connections at once, all sockets (default 1024, lowered to keep
                         descriptors free under RLIMIT_NOFILE)
  --nbd-max-client-connections N  NBD connections at once from one TCP address (default 16)
  --auto-attach          attach every device as a kernel block device when it is activated,
                         detach it on remove (also $UDM_AUTO_ATTACH=1)
  --dev-dir DIR          where attach makes NAME symlinks (default $UDM_DEV_DIR, else /dev/udm)
  --no-restore           start without the devices a killed or crashed udmd left in the run
                         directory (by default they are re-created, lower devices first)
  --demo                 create demo devices (demo-origin, demo-snap) over sparse files in --state-dir
  --state-dir DIR        where the demo keeps its files (default ./var)
  --foreground           accepted for compatibility: udmd always runs in the foreground
  --run CMD              captive mode (as nbdkit's --run): start, create the --device devices, run
                         CMD with sh -c ($uri: the first device's NBD URI, $socket: the NBD socket,
                         $UDM_RUN_DIR, $uri_NAME per device), then remove everything and exit with
                         CMD's exit status
  --device NAME=FILE     with --run: create device NAME from the table in FILE; repeatable
  --exit-with-parent     stop (as on SIGTERM) when the process that started udmd exits
Socket activation: started by systemd with LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES, udmd serves on
  the sockets passed instead of making its own: FileDescriptorName=control or nbd says which is which
  (unset: a socket at RUN_DIR/control, RUN_DIR/nbd.sock or the --nbd-listen address is that one).
  Their files stay at stop. See docs/cli.md, "Socket activation".
Tuning (defaults are best; these exist for comparisons, see bench/run.ts):
  --no-inline-reads      read every page-cache hit through libuv's thread pool, not in the event loop
  --no-write-plug        issue every small buffered write on its own, never merged per event-loop turn
  --no-zero-copy         copy large NBD READ replies through a buffer instead of sendfile(2)
`;

export const UDMD_OPTIONS = {
  "run-dir": { type: "string" },
  plugin: { type: "string", multiple: true },
  config: { type: "string" },
  "log-level": { type: "string" },
  "log-format": { type: "string" },
  "nbd-listen": { type: "string" },
  tls: { type: "string" },
  "tls-certificates": { type: "string" },
  "tls-psk": { type: "string" },
  "nbd-handshake-timeout": { type: "string" },
  "nbd-max-connections": { type: "string" },
  "nbd-max-client-connections": { type: "string" },
  "auto-attach": { type: "boolean" },
  "dev-dir": { type: "string" },
  "no-restore": { type: "boolean" },
  demo: { type: "boolean" },
  "state-dir": { type: "string" },
  foreground: { type: "boolean" },
  run: { type: "string" },
  device: { type: "string", multiple: true },
  "exit-with-parent": { type: "boolean" },
  "no-inline-reads": { type: "boolean" },
  "no-write-plug": { type: "boolean" },
  "no-zero-copy": { type: "boolean" },
  help: { type: "boolean", short: "h" },
} satisfies ParseArgsConfig["options"];
