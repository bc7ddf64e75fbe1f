/**
 * `npm start`: a daemon with ready devices over sparse files, and the commands to try on them.
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
  // Until the snapshot target lands, demo-snap is a plain linear device over the COW file.
  await dm.create("demo-origin", { table: `0 ${sectors} linear ${origin} 0` });
  await dm.create("demo-snap", { table: `0 ${sectors / 4} linear ${cow} 0` });
  const run = daemon.opts.paths.dir;
  const env = `UDM_RUN_DIR=${run}`;
  const uri = (n: string) => daemon.nbdUri(n);
  return `udm demo is running (Ctrl-C to stop). Devices, exported over NBD:
  demo-origin  ${uri("demo-origin")}
  demo-snap    ${uri("demo-snap")}
${daemon.tcpAddress ? `  TCP: nbd://${daemon.tcpAddress.host}:${daemon.tcpAddress.port}/demo-origin\n` : ""}
Try, in another shell:
  ${env} npx udmsetup ls
  ${env} npx udmsetup table demo-origin
  ${env} npx udmsetup info demo-origin
  nbdinfo --list '${uri("demo-origin")}'
  qemu-io -f raw '${uri("demo-origin")}' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  nbdcopy '${uri("demo-origin")}' - | head -c 16 | od -An -tx1
  qemu-img info '${uri("demo-origin")}'
`;
}
