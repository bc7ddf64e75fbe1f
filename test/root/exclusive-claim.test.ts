/**
 * A table's kernel block devices are claimed exclusively, as the kernel's dm_get_device claims
 * them: while a table holds a device nobody can mount it or open it with O_EXCL, a mounted device
 * cannot go into a table, and removing the table gives the device back (xfstests' generic/741
 * checks the first and last of these through the attached device).
 *
 * Needs root, /dev/loop-control and mkfs.ext4; otherwise skipped with the reason printed, unless
 * UDM_REQUIRE_ROOT_TESTS=1 makes that a failure.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createDeviceMapper, type DeviceMapper } from "../../index.js";
import { createLoopDevice, type LoopDevice, type SparseFile, withSparseFile } from "../support/loop-device.js";
import { rootUnavailableReason, skipOrFail } from "../support/requirements.js";
import { sh, tool } from "../support/tools.js";
import { MiB, SECTOR } from "../support/units.js";

const SUITE = "root exclusive-claim tests";
const skipReason = rootUnavailableReason(["mkfs.ext4"]);
skipOrFail(SUITE, skipReason);

const SIZE = 32 * MiB;
const SECTORS = SIZE / SECTOR;

/** An O_EXCL open of `node` from this process: a claim by another holder than the table's. */
function claimError(node: string): string | null {
  try {
    fs.closeSync(fs.openSync(node, fs.constants.O_RDONLY | fs.constants.O_EXCL));
    return null;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? String(err);
  }
}

/** mount(8) of `node` on `dir`: null when it mounted (and is unmounted again), else its stderr. */
async function tryMount(node: string, dir: string): Promise<string | null> {
  const r = await tool("mount", [node, dir]);
  if (r.code !== 0) return r.stderr || `mount exited ${r.code}`;
  await sh("umount", dir);
  return null;
}

describe.skipIf(skipReason !== null)(SUITE, () => {
  let file: SparseFile;
  let loop: LoopDevice;
  let mnt: string;
  let dm: DeviceMapper;

  beforeAll(async () => {
    file = await withSparseFile(SIZE);
    loop = await createLoopDevice(file.path);
    await sh("mkfs.ext4", "-q", "-F", loop.path);
    mnt = await fs.promises.mkdtemp(path.join(os.tmpdir(), "udm-claim-mnt-"));
  });

  afterAll(async () => {
    await dm?.removeAll({ force: true });
    await tool("umount", [mnt]);
    await fs.promises.rm(mnt, { recursive: true, force: true });
    await loop?.detach();
    await file?.remove();
  });

  it("a table's device cannot be mounted or claimed until the table is removed", async () => {
    dm = createDeviceMapper();
    expect(claimError(loop.path)).toBeNull();
    await dm.create("claimed", { table: `0 ${SECTORS} linear ${loop.path} 0` });
    expect(claimError(loop.path)).toBe("EBUSY");
    expect(await tryMount(loop.path, mnt)).toMatch(/busy|in use/i);

    // A second table on the same device shares the one claim (dm_get_device's shared dm_dev).
    await dm.create("claimed2", { table: `0 ${SECTORS / 2} linear ${loop.path} ${SECTORS / 2}` });
    await dm.remove("claimed");
    expect(claimError(loop.path)).toBe("EBUSY");
    await dm.remove("claimed2");

    expect(claimError(loop.path)).toBeNull();
    expect(await tryMount(loop.path, mnt)).toBeNull();
  });

  it("a read-only table upgraded by a read-write one keeps the claim (one holder, two handles)", async () => {
    dm = createDeviceMapper();
    await dm.create("ro", { readOnly: true, table: `0 ${SECTORS} linear ${loop.path} 0` });
    await dm.create("rw", { table: `0 ${SECTORS} linear ${loop.path} 0` });
    expect(claimError(loop.path)).toBe("EBUSY");
    await dm.remove("ro");
    expect(claimError(loop.path)).toBe("EBUSY");
    await dm.remove("rw");
    expect(claimError(loop.path)).toBeNull();
  });

  it("a mounted device is refused with an error naming it, and no device is left behind", async () => {
    dm = createDeviceMapper();
    await sh("mount", loop.path, mnt);
    try {
      const err = await dm.create("refused", { table: `0 ${SECTORS} linear ${loop.path} 0` }).then(
        () => null,
        (e: Error) => e,
      );
      expect((err as { errno?: string } | null)?.errno).toBe("EBUSY");
      expect(err?.message).toContain(loop.path);
      expect(err?.message).toMatch(/busy/);
      expect(dm.list()).not.toContain("refused");
    } finally {
      await sh("umount", mnt);
    }
    // Unmounted, the same table loads.
    await dm.create("refused", { table: `0 ${SECTORS} linear ${loop.path} 0` });
    await dm.remove("refused");
  });

  it("io.exclusive: false opens without a claim (for callers that share a device on purpose)", async () => {
    dm = createDeviceMapper({ io: { exclusive: false } });
    await dm.create("shared", { table: `0 ${SECTORS} linear ${loop.path} 0` });
    expect(claimError(loop.path)).toBeNull();
    await dm.remove("shared");
  });
});
