/**
 * System tools the tests run (qemu-io, nbdcopy, fio, mount, losetup, ...): where they are, and
 * running them with a timeout that cannot hang the test. What a suite does when a tool is
 * missing is in requirements.ts.
 */
import { type ChildProcess, execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

/** Absolute path of `tool` on PATH (or in /usr/sbin, /sbin, /usr/bin, /bin), or undefined. */
export function which(tool: string): string | undefined {
  const dirs = [...(process.env.PATH ?? "").split(path.delimiter), "/usr/sbin", "/sbin", "/usr/bin", "/bin"];
  return dirs
    .filter(Boolean)
    .map((d) => path.join(d, tool))
    .find((p) => {
      try {
        fs.accessSync(p, fs.constants.X_OK);
        return fs.statSync(p).isFile();
      } catch {
        return false;
      }
    });
}

export interface ToolResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

const DEFAULT_TIMEOUT_MS = 60_000;
const MAX_OUTPUT_BYTES = 64 * 1024 * 1024;

/** Children started by `tool()` and not yet exited: a cleanup kills them (see `killRunningTools`). */
const children = new Set<ChildProcess>();

/** The tools started by `tool()` that have not exited yet. */
export function runningTools(): readonly ChildProcess[] {
  return [...children];
}

/** SIGKILL every tool started by `tool()` that is still running. */
export function killRunningTools(): void {
  for (const child of children) child.kill("SIGKILL");
}

/**
 * Run a system tool (LANG=C); resolves whatever its exit status (`toolOk` and `sh`: it must
 * succeed). After `timeoutMs` it is killed, and the promise resolves (code null) even if the
 * process cannot die yet: a tool stuck in uninterruptible I/O on a hung device must not hang the
 * caller too.
 */
export function tool(
  name: string,
  args: string[],
  opts: { timeoutMs?: number; input?: string } = {},
): Promise<ToolResult> {
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  return new Promise((resolve) => {
    let settled = false;
    let timedOut = false;
    const finish = (r: ToolResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(r);
    };
    const child = execFile(
      which(name) ?? name,
      args,
      { encoding: "utf8", maxBuffer: MAX_OUTPUT_BYTES, env: { ...process.env, LANG: "C" } },
      (err, stdout, stderr) => {
        children.delete(child);
        const e = err as (Error & { code?: number | string; signal?: NodeJS.Signals }) | null;
        const code = e ? (typeof e.code === "number" ? e.code : null) : 0;
        const note = timedOut ? `\n(killed after ${timeoutMs} ms)` : e && code === null && !e.signal ? e.message : "";
        finish({ code, signal: e?.signal ?? null, stdout, stderr: stderr + note });
      },
    );
    children.add(child);
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
      // Still not gone after a second: in D state. Give up waiting; the cleanup kills it again.
      const stuck = `${name} ${args.join(" ")}: killed after ${timeoutMs} ms, not exited (stuck in I/O)`;
      setTimeout(() => finish({ code: null, signal: "SIGKILL", stdout: "", stderr: stuck }), 1_000).unref();
    }, timeoutMs);
    child.stdin?.on("error", () => undefined); // EPIPE when it was killed or never reads
    child.stdin?.end(opts.input ?? "");
  });
}

/** Run a system tool that must succeed; its result. */
export async function toolOk(
  name: string,
  args: string[],
  opts: { timeoutMs?: number; input?: string } = {},
): Promise<ToolResult> {
  const r = await tool(name, args, opts);
  if (r.code !== 0) {
    const status = r.signal ? `signal ${r.signal}` : `exit ${r.code}`;
    throw new Error(`${name} ${args.join(" ")} failed (${status}):\n${r.stderr}${r.stdout}`);
  }
  return r;
}

/** Run a system tool that must succeed; its stdout. */
export async function sh(name: string, ...args: string[]): Promise<string> {
  return (await toolOk(name, args)).stdout;
}
