/**
 * A snapshot of a live, mounted filesystem taken the documented way (docs/snapshot.md), for the
 * root tests: the loop devices, udm devices and trees of files before and after, and the checks
 * run on it afterwards.
 */
import fs from "node:fs";
import path from "node:path";
import { expect } from "vitest";
import { patternBytes } from "./device-data.js";
import { changeTree, makeTree, type Tree, writeTree } from "./file-tree.js";
import { fioOverwrite } from "./fio.js";
import { expectClean, type FsKind } from "./filesystems.js";
import type { LoopDevice } from "./loop-device.js";
import type { Attached, RootEnv } from "./root-env.js";
import { sh } from "./tools.js";
import { MiB, SECTOR } from "./units.js";

export interface LiveSnapshot {
  fs: FsKind;
  originFile: string;
  cowFile: string;
  originLoop: LoopDevice;
  cowLoop: LoopDevice;
  /** Size of both tables, in sectors. */
  sectors: number;
  /** udm device names. */
  base: string;
  snap: string;
  /** `base` attached and mounted here. */
  baseDev: Attached;
  mnt: string;
  /** The files when the snapshot was taken. */
  before: Tree;
  /** The files on the origin now. */
  after: Tree;
}

/** The snapshot table for `rig`, with chunk size `chunk` (0: from the COW header). */
export function snapshotTable(
  rig: Pick<LiveSnapshot, "sectors" | "originLoop" | "cowLoop">,
  chunk: number,
  store = "P",
): string {
  return `0 ${rig.sectors} snapshot ${rig.originLoop.path} ${rig.cowLoop.path} ${store} ${chunk}`;
}

/**
 * Make a filesystem on a loop device (the origin), put it behind a snapshot-origin device in a
 * fresh udmd, attach and mount that, write a tree of files, freeze the filesystem and take a
 * persistent snapshot with 4 KiB chunks on a second loop device (suspend the origin, create the
 * snapshot, resume: docs/snapshot.md), thaw, then keep changing files on the origin (`change`).
 */
export async function takeLiveSnapshot(
  env: RootEnv,
  kind: FsKind,
  opts: {
    originBytes?: number;
    cowBytes: number;
    /** Snapshot chunk size in sectors (default 8: one 4 KiB filesystem block per chunk). */
    chunk?: number;
    files?: number;
    maxFileBytes?: number;
    /** Rounds of changes on the origin after the snapshot (default 2). */
    changes?: number;
    /**
     * Also overwrite a file of this size (`fio.dat`, written before the snapshot) with fio:
     * random 4 KiB direct writes, 32 in flight, verified, while the changes run.
     */
    fioBytes?: number;
  },
): Promise<LiveSnapshot> {
  const originBytes = opts.originBytes ?? Math.max(128 * MiB, kind.minBytes);
  const originFile = env.sparseFile("origin.img", originBytes);
  const cowFile = env.sparseFile("cow.img", opts.cowBytes); // sparse: its start reads as zeros, a new store
  const originLoop = await env.loop(originFile);
  const cowLoop = await env.loop(cowFile);
  await kind.mkfs(originLoop.path);

  const sectors = originBytes / SECTOR;
  const base = env.name("base");
  const snap = env.name("snap");
  await env.startDaemon();
  await env.ok("create", base, "--table", `0 ${sectors} snapshot-origin ${originLoop.path}`);
  const baseDev = await env.attach(base);
  const mnt = env.dir("origin");
  await env.mount(baseDev.link, mnt);

  const before = makeTree(`${kind.name}-before`, opts.files ?? 24, opts.maxFileBytes ?? 1 * MiB);
  if (opts.fioBytes) before.set("fio.dat", patternBytes(`${kind.name}-fio`, opts.fioBytes));
  writeTree(mnt, before);
  await sh("sync", "-f", mnt);
  // A frozen filesystem is consistent on disk (its journal flushed): what the snapshot captures.
  await env.freeze(mnt);
  await env.ok("suspend", base);
  await env.ok("create", snap, "--table", snapshotTable({ sectors, originLoop, cowLoop }, opts.chunk ?? 8));
  await env.ok("resume", base);
  // Nothing copied yet: only the header and the first metadata area, a chunk each (thawing
  // writes the superblock, so check before).
  const fresh = 2 * (opts.chunk ?? 8);
  expect(await env.ok("status", snap)).toBe(`0 ${sectors} snapshot ${fresh}/${opts.cowBytes / SECTOR} ${fresh}\n`);
  await env.thaw(mnt);

  let after = before;
  const fio = opts.fioBytes ? fioOverwrite(path.join(mnt, "fio.dat"), opts.fioBytes) : null;
  for (let round = 0; round < (opts.changes ?? 2); round++) {
    after = changeTree(mnt, after, `${kind.name}-after${round}`);
    await sh("sync", "-f", mnt);
  }
  if (fio) {
    await fio;
    after = new Map(after).set("fio.dat", fs.readFileSync(path.join(mnt, "fio.dat")));
  }
  return { fs: kind, originFile, cowFile, originLoop, cowLoop, sectors, base, snap, baseDev, mnt, before, after };
}

/** `<allocated>/<total> <metadata>` of a snapshot (or snapshot-merge) status line, as numbers. */
export function snapshotUsage(status: string): { allocated: number; total: number; metadata: number } {
  const m = / snapshot(?:-merge)? (\d+)\/(\d+) (\d+)\n?$/.exec(status);
  if (!m) throw new Error(`not a snapshot usage status: ${JSON.stringify(status)}`);
  return { allocated: Number(m[1]), total: Number(m[2]), metadata: Number(m[3]) };
}

/**
 * Expect the filesystem on the attached snapshot `dev` to check clean, replaying its log first
 * (mount read-write at `mnt`, unmount) where the filesystem needs that (`replayLogBeforeCheck`).
 */
export async function expectCleanSnapshot(env: RootEnv, kind: FsKind, dev: string, mnt: string): Promise<void> {
  if (kind.replayLogBeforeCheck) {
    await env.mount(dev, mnt, kind.snapshotMountOptions(false));
    await env.umount(mnt);
  }
  await expectClean(kind, dev);
}
