/**
 * What the system holds right now, read from /proc and /sys: mounts, bound loop devices,
 * processes. Root tests use it to clean up after a test and to check that nothing is left.
 */
import fs from "node:fs";
import path from "node:path";

/** A path from /proc/self/mounts, with its octal escapes (`\040` for a space) undone. */
export function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** [source, target] of every mount, from /proc/self/mounts. */
export function mounts(): { source: string; target: string }[] {
  return fs
    .readFileSync("/proc/self/mounts", "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => {
      const [source, target] = l.split(" ");
      return { source: unescapeMount(source!), target: unescapeMount(target!) };
    });
}

/** Bound loop devices and their backing files (as sysfs reports them). */
export function boundLoops(): { dev: string; backing: string }[] {
  const out: { dev: string; backing: string }[] = [];
  for (const d of fs.readdirSync("/sys/block").filter((n) => n.startsWith("loop"))) {
    try {
      out.push({ dev: `/dev/${d}`, backing: fs.readFileSync(`/sys/block/${d}/loop/backing_file`, "utf8").trim() });
    } catch {
      // not bound
    }
  }
  return out;
}

/** Processes whose executable basename is `exe` and whose command line mentions `needle`. */
export function pidsOf(exe: string, needle: string): number[] {
  const pids: number[] = [];
  for (const pid of fs.readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    if (Number(pid) === process.pid) continue;
    try {
      const argv = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
      if (argv.some((a) => path.basename(a) === exe) && argv.some((a) => a.includes(needle))) pids.push(Number(pid));
    } catch {
      // exited meanwhile
    }
  }
  return pids;
}

/** `p` is `dir` or inside it. */
export function isUnder(p: string, dir: string): boolean {
  return p === dir || p.startsWith(dir + "/");
}

/** Send `signal` to `pid` if it still exists. */
export function killQuietly(pid: number, signal: NodeJS.Signals = "SIGKILL"): void {
  try {
    process.kill(pid, signal);
  } catch {
    // gone
  }
}
