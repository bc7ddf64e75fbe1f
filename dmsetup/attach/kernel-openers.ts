/**
 * Who has a kernel block device open, counted as the kernel counts a dm device's openers
 * (dm_blk_open): each open file description, each mounted filesystem, each device stacked on it
 * (holders/), each swap area. The kernel keeps no such count for a loop or nbd device, so it is
 * gathered from /proc and /sys, synchronously (none of these reads reach the device itself, so
 * none can wait on the daemon that serves it).
 *
 * Opens by this process are left out: udmd itself is never a user of the device (it holds no
 * descriptor on it; its brief probes, such as detach's exclusive open, must not count).
 */
import fs from "node:fs";
import path from "node:path";
import type { Devno } from "../../core/devices/kernel-block-device.js";

export function kernelOpenerCount(dev: string, devno: Devno): number {
  return openDescriptors(dev) + mountedFilesystems(devno) + holders(dev) + swapAreas(dev);
}

/** Descriptors of other processes open on `dev` (what /proc/PID/fd links name: /dev/loopN). */
function openDescriptors(dev: string): number {
  return descriptorTargets().get(dev) ?? 0;
}

/**
 * How many descriptors of other processes point at each path. One walk of /proc serves every
 * device asked about in the same event-loop turn (an `info` or `ls` of many attached devices).
 */
let walked: Map<string, number> | null = null;
function descriptorTargets(): Map<string, number> {
  if (walked) return walked;
  const self = String(process.pid);
  const counts = new Map<string, number>();
  for (const pid of readdir("/proc")) {
    if (pid === self || !/^\d+$/.test(pid)) continue;
    const fdDir = `/proc/${pid}/fd`;
    for (const fd of readdir(fdDir)) {
      try {
        const target = fs.readlinkSync(`${fdDir}/${fd}`);
        if (target.startsWith("/dev/")) counts.set(target, (counts.get(target) ?? 0) + 1);
      } catch {
        // closed meanwhile, or the process has exited
      }
    }
  }
  walked = counts;
  setImmediate(() => (walked = null));
  return counts;
}

/** One per filesystem on the device (bind mounts share it): /proc/self/mountinfo's major:minor. */
function mountedFilesystems(devno: Devno): number {
  const id = `${devno.major}:${devno.minor}`;
  try {
    const lines = fs.readFileSync("/proc/self/mountinfo", "utf8").split("\n");
    return lines.some((line) => line.split(" ")[2] === id) ? 1 : 0;
  } catch {
    return 0;
  }
}

/** Devices stacked on it (dm, md): /sys/class/block/NAME/holders/. */
function holders(dev: string): number {
  return readdir(`/sys/class/block/${path.basename(dev)}/holders`).length;
}

function swapAreas(dev: string): number {
  try {
    const lines = fs.readFileSync("/proc/swaps", "utf8").split("\n").slice(1);
    return lines.filter((line) => line.split(/\s+/)[0] === dev).length;
  } catch {
    return 0;
  }
}

function readdir(dir: string): string[] {
  try {
    return fs.readdirSync(dir);
  } catch {
    return [];
  }
}
