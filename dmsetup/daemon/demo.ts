/**
 * `npm start`: a daemon with ready devices over sparse files that persist in the state directory
 * (./var), and a banner saying where they are, what to try and how to stop.
 */
import fs from "node:fs";
import path from "node:path";
import type { Daemon } from "./daemon.js";

const GiB = 1024 ** 3;

function sparseFile(file: string, bytes: number): void {
  const fd = fs.openSync(file, fs.existsSync(file) ? "r+" : "w+");
  if (fs.fstatSync(fd).size < bytes) fs.ftruncateSync(fd, bytes);
  fs.closeSync(fd);
}

export async function setUpDemo(daemon: Daemon, stateDir: string): Promise<string> {
  const dir = path.resolve(stateDir);
  fs.mkdirSync(dir, { recursive: true });
  const origin = path.join(dir, "origin.img");
  const cow = path.join(dir, "cow.img");
  sparseFile(origin, GiB);
  sparseFile(cow, GiB / 4);
  const dm = daemon.dm;
  const sectors = GiB / 512;
  // The documented sequence: origin device first, then suspend it while the snapshot is created.
  // A fresh COW file reads as zeros, which the persistent store takes as a new store; an existing
  // one (from an earlier run) is reloaded with its exceptions.
  // Devices a killed demo daemon left are back already (restored from the run directory).
  if (!dm.has("demo-origin")) await dm.create("demo-origin", { table: `0 ${sectors} snapshot-origin ${origin}` });
  if (!dm.has("demo-snap")) {
    await dm.suspend("demo-origin");
    await dm.create("demo-snap", { table: `0 ${sectors} snapshot ${origin} ${cow} P 8` });
    await dm.resume("demo-origin");
  }
  daemon.saveState();
  const run = daemon.opts.paths.dir;
  const env = `UDM_RUN_DIR=${run}`;
  const uri = (n: string) => daemon.nbdUri(n);
  const file = (f: string, size: string, what: string) =>
    `  ${path.basename(f).padEnd(11)} ${size.padEnd(8)} ${what} (${onDisk(f)} on disk now)`;
  return `udm demo: udmd is running on ${run} (pid ${process.pid}).

Devices, exported over NBD:
  demo-origin  ${uri("demo-origin")}
  demo-snap    ${uri("demo-snap")}
${daemon.tcpAddress ? `  TCP: nbd://${daemon.tcpAddress.host}:${daemon.tcpAddress.port}/demo-origin\n` : ""}
Their files, in ${dir}:
${file(origin, "1 GiB", "demo-origin's data")}
${file(cow, "256 MiB", "demo-snap's copy-on-write store")}
Sparse files take only the space written to them. They stay after the demo, and the next npm start
uses them again, snapshot included; delete the folder to start afresh.

Try, in another shell:
  ${env} npx udmsetup ls
  ${env} npx udmsetup table demo-origin
  ${env} npx udmsetup info demo-origin
  ${env} npx udmsetup status demo-snap        # <allocated>/<total> <metadata> sectors
  nbdinfo --list '${uri("demo-origin")}'
  qemu-io -f raw '${uri("demo-origin")}' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  qemu-io -f raw -r '${uri("demo-snap")}' -c 'read -P 0 0 1M'      # the snapshot still reads the old data
  nbdcopy '${uri("demo-origin")}' - | head -c 16 | od -An -tx1
  qemu-img info '${uri("demo-origin")}'

To stop: Ctrl-C here, or in another shell:
  ${env} npx udmsetup daemon stop
The devices go away; their data stays in the files.
`;
}

/** The space a sparse file takes, as du shows it. */
function onDisk(file: string): string {
  const bytes = fs.statSync(file).blocks * 512;
  return bytes >= 1024 * 1024 ? `${(bytes / 1024 / 1024).toFixed(1)} MiB` : `${Math.round(bytes / 1024)} KiB`;
}
