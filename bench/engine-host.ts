/**
 * Engine processes: each benchmark engine can run in a Node process of its own (started from
 * bench/engine-child.ts), driven over IPC one request at a time, so the reference and udm share
 * no JIT feedback, heap or libuv pool.
 */
import { fork } from "node:child_process";
import path from "node:path";
import type { EngineHost, EngineKind, EngineSpec, Repetition } from "./micro.js";

/** How an engine process loads TypeScript: tsc's emit (bench/tsc-loader.mjs) or tsx (esbuild). */
export type Loader = "tsc" | "tsx";

export type ChildRequest = { cmd: "open"; spec: EngineSpec } | { cmd: "run"; ms: number } | { cmd: "close" };
export type ChildReply = { ok: true; result?: Repetition } | { ok: false; error: string };

const ROOT = path.join(import.meta.dirname, "..");
const CHILD = path.join(import.meta.dirname, "engine-child.ts");

/**
 * Node flags for an engine process: the loader, plus this process's --cpu-prof* flags with a
 * profile name per engine, so `node --cpu-prof bench/run.ts` profiles each side separately.
 */
function childExecArgv(kind: EngineKind, loader: Loader): string[] {
  const prof = process.execArgv.filter((a) => a.startsWith("--cpu-prof") && !a.startsWith("--cpu-prof-name"));
  if (prof.includes("--cpu-prof")) prof.push(`--cpu-prof-name=bench-${kind}-${Date.now()}.cpuprofile`);
  return ["--import", loader === "tsx" ? "tsx" : "./bench/tsc-loader.mjs", ...prof];
}

/** Start an engine process; resolves once it is ready for requests. */
export function childHost(kind: EngineKind, loader: Loader): Promise<EngineHost> {
  const child = fork(CHILD, [], {
    cwd: ROOT,
    execArgv: childExecArgv(kind, loader),
    stdio: ["ignore", "inherit", "inherit", "ipc"],
  });
  let waiting: { resolve: (r: Repetition | undefined) => void; reject: (e: Error) => void } | null = null;
  const fail = (err: Error) => {
    waiting?.reject(err);
    waiting = null;
  };
  const exited = new Promise<void>((resolve) =>
    child.on("exit", (code, signal) => {
      fail(new Error(`${kind} engine process exited (${signal ?? code})`));
      resolve();
    }),
  );
  child.on("error", fail);
  child.on("message", (reply: ChildReply) => {
    const w = waiting;
    waiting = null;
    if (reply.ok) w?.resolve(reply.result);
    else w?.reject(new Error(`${kind} engine process: ${reply.error}`));
  });
  const request = (req?: ChildRequest) =>
    new Promise<Repetition | undefined>((resolve, reject) => {
      waiting = { resolve, reject };
      if (req) child.send(req);
    });
  const host: EngineHost = {
    open: async (spec) => void (await request({ cmd: "open", spec })),
    run: async (ms) => (await request({ cmd: "run", ms }))!,
    close: async () => void (await request({ cmd: "close" })),
    exit: async () => {
      if (child.connected) child.disconnect();
      await exited;
    },
  };
  // The child's first message says it has loaded.
  return request().then(
    () => host,
    async (err: unknown) => {
      child.kill();
      await exited;
      throw err;
    },
  );
}
