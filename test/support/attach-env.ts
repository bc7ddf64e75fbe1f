/**
 * Per-test state for tests of udmd's attach path (root): a run directory, a dev directory for
 * the NAME symlinks, a directory with a 64 MiB backing image and a mountpoint, a unique device
 * name, and the cleanup that runs whatever happened: the test's mount, the daemon (which
 * detaches), then any nbdfuse, FUSE mount or loop device a broken daemon left behind. The cleanup
 * then checks that none is left.
 */
import fs from "node:fs";
import path from "node:path";
import { afterEach, beforeEach, expect } from "vitest";
import { type CliResult, type RunningDaemon, startDaemon, tempDir, udmsetup } from "./daemon.js";
import { boundLoops, isUnder, killQuietly, mounts, pidsOf } from "./system-state.js";
import { tool } from "./tools.js";

export const MiB = 1024 * 1024;

/** The kernel device attach makes here: /dev/nbdN where the kernel has nbd, else a loop device. */
export const attachedDevicePattern = fs.existsSync("/dev/nbd0") ? /^\/dev\/nbd\d+$/ : /^\/dev\/loop\d+$/;

export interface AttachEnv {
  readonly runDir: string;
  readonly devDir: string;
  readonly files: string;
  readonly mnt: string;
  /** A 64 MiB sparse file. */
  readonly img: string;
  readonly name: string;
  daemon: RunningDaemon | undefined;
  /** Start the test's daemon (stopped by the cleanup). */
  start(args?: string[]): Promise<RunningDaemon>;
  run(...args: string[]): Promise<CliResult>;
  /** Loop devices bound to this test's nbdfuse file. */
  loops(): string[];
}

export function useAttachEnv(prefix: string): AttachEnv {
  const savedEnv = { UDM_DEV_DIR: process.env.UDM_DEV_DIR, UDM_AUTO_ATTACH: process.env.UDM_AUTO_ATTACH };
  let serial = 0;
  const env = {
    daemon: undefined as RunningDaemon | undefined,
    async start(args: string[] = []) {
      env.daemon = await startDaemon(env.runDir, args);
      return env.daemon;
    },
    run: (...args: string[]) => udmsetup(env.runDir, args),
    loops: () => loopsBackedBy(env.name),
  } as AttachEnv;
  const set = (fields: Omit<AttachEnv, "daemon" | "start" | "run" | "loops">) => Object.assign(env, fields);

  beforeEach(() => {
    const files = tempDir(`${prefix}files-`);
    const img = path.join(files, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 64 * MiB);
    fs.mkdirSync(path.join(files, "mnt"));
    set({
      runDir: tempDir(`${prefix}run-`),
      devDir: path.join(tempDir(`${prefix}dev-`), "udm"), // created by the daemon
      files,
      mnt: path.join(files, "mnt"),
      img,
      name: `${prefix.replace(/[^a-z]/g, "")}${process.pid}x${serial++}`, // leftovers are recognisable by name
    });
  });

  afterEach(async () => {
    const { runDir, files, mnt, name, devDir } = env;
    const ours = (p: string) => [runDir, files].some((d) => isUnder(p, d));
    // 1. The test's mount, while the daemon still serves its last writes.
    if (mountTargets().includes(mnt) && (await tool("umount", [mnt])).code !== 0) await tool("umount", ["-l", mnt]);
    // 2. The daemon detaches everything on SIGTERM. If it hangs (e.g. in a FUSE request), kill
    //    its nbdfuse first: that aborts the FUSE connection and lets it exit.
    let cleanExit = false;
    const daemon = env.daemon;
    env.daemon = undefined;
    if (daemon) {
      const alive = daemon.proc.exitCode === null && daemon.proc.signalCode === null;
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), 20_000)));
      const code = await Promise.race([daemon.stop("SIGTERM"), timeout]);
      clearTimeout(timer);
      if (code === "timeout") {
        for (const pid of pidsOf("nbdfuse", runDir)) killQuietly(pid);
        await daemon.stop("SIGKILL");
      }
      cleanExit = alive && code === 0;
    }
    // 3. What a broken daemon left behind: its nbdfuse, FUSE mounts, loop devices on them.
    for (const pid of pidsOf("nbdfuse", runDir)) killQuietly(pid);
    for (const target of mountTargets().filter(ours)) await tool("umount", ["-l", target]);
    for (const loop of loopsBackedBy(name)) await tool("losetup", ["-d", loop]);
    for (const [key, value] of Object.entries(savedEnv)) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }

    const leftovers = {
      nbdfuse: pidsOf("nbdfuse", runDir),
      mounts: mountTargets().filter(ours),
      loops: loopsBackedBy(name),
      // A daemon that stopped normally has cleaned its run directory (a killed one cannot).
      runDir: cleanExit ? fs.readdirSync(runDir) : [],
    };
    for (const d of [runDir, path.dirname(devDir), files]) fs.rmSync(d, { recursive: true, force: true });
    expect(leftovers).toEqual({ nbdfuse: [], mounts: [], loops: [], runDir: [] });
  }, 60_000);

  return env;
}

/** Mount targets. */
export function mountTargets(): string[] {
  return mounts().map((m) => m.target);
}

/**
 * Loop devices bound to our nbdfuse file. The kernel reports the path of a FUSE file whose mount
 * was detached lazily relative to that mount (`/NAME`), otherwise in full.
 */
export function loopsBackedBy(name: string): string[] {
  return boundLoops()
    .filter(({ backing }) => backing === `/${name}` || backing.endsWith(`/mnt/${name}`))
    .map(({ dev }) => dev);
}
