/**
 * Runnable library example (docs/library.md): `npx tsx docs/examples/library.ts`.
 * Builds a striped device over two sparse files plus a zero tail, writes and reads through it,
 * reloads it under a new table, and cleans up.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createDeviceMapper } from "../../index.js";

export async function example(): Promise<string[]> {
  const out: string[] = [];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-example-"));
  const disks = ["a.img", "b.img"].map((f) => path.join(dir, f));
  for (const d of disks) {
    fs.writeFileSync(d, Buffer.alloc(0));
    fs.truncateSync(d, 8 * 1024 * 1024);
  }

  const dm = createDeviceMapper();
  // 4 MiB striped over both files in 64 KiB chunks, then 1 MiB that reads as zeros.
  await dm.create("vol", {
    table: `0 8192 striped 2 128 ${disks[0]} 0 ${disks[1]} 0\n8192 2048 zero`,
  });
  out.push(
    ...dm
      .tableText("vol")
      .split("\n")
      .filter((l) => l !== ""),
  );

  const vol = dm.open("vol");
  await vol.write(0, Buffer.alloc(128 * 1024, 0x5a), { fua: true }); // spans both stripes
  const back = await vol.read(0, 256);
  out.push(`read back ${back.length} bytes, all 0x5a: ${back.every((b) => b === 0x5a)}`);
  out.push(`second chunk landed in b.img: ${fs.readFileSync(disks[1]!).subarray(0, 4).toString("hex")}`);

  // Reload: load into the inactive slot, then resume swaps it in (suspending I/O meanwhile).
  await dm.load("vol", `0 8192 linear ${disks[0]} 0`);
  await dm.resume("vol");
  out.push(
    ...dm
      .tableText("vol")
      .split("\n")
      .filter((l) => l !== ""),
  );
  out.push(`status: ${JSON.stringify(dm.status("vol"))}`);

  await vol.close();
  await dm.remove("vol");
  fs.rmSync(dir, { recursive: true });
  return out;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  for (const line of await example()) console.log(line);
}
