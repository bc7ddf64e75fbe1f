/**
 * Remote devices in the benchmark matrix (udm issue 20): udm tables over an NBD export, against
 * fio's nbd engine straight to the same export.
 *
 *   udm-linear-nbd   udmd, linear over nbdkit's file plugin serving the data file
 *                    (nbd+unix:// URI in the table), set against "nbdkit file": goal ≥ 0.9× on the
 *                    four standard workloads (the extra hop costs at most a tenth);
 *   udm-snap-remote  the base-image case: udmd, a persistent snapshot (chunk 8) whose origin is a
 *                    read-only nbdkit export of the data file and whose COW is a local file;
 *   qcow2-remote     next to it, qemu-nbd serving a qcow2 overlay (4 KiB clusters) whose backing
 *                    file is the same read-only nbdkit export (its first write and rewrite).
 *
 * The CPU figures are udmd's (and qemu-nbd's) alone: the nbdkit under them is not counted.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import type { ConfigResult, Figure, MatrixConfig, MatrixWorkload, WorkloadKey } from "./matrix.js";
import { sparseFile } from "./counting-backing.js";
import { cowBytesFor } from "./overlay.js";
import { remakingInstance, type Server, startNbdkit, startQemuNbd, startUdmd } from "./servers.js";

const SECTOR = 512;

/** The goal of udm linear over NBD / fio straight to the export. */
export const LINEAR_OVER_NBD_GOAL = 0.9;

/** nbdkit's file plugin on `ctx.data` (read-only with `readOnly`), on a socket in `dir`. */
function nbdkitUnder(dir: string, data: string, readOnly: boolean): Promise<Server> {
  return startNbdkit(path.join(dir, "remote.sock"), [...(readOnly ? ["-r"] : []), "file", data]);
}

/** A server pair stopped together; CPU and URI are the upper one's. */
function pair(upper: Server, lower: Server): Server {
  return {
    ...upper,
    stop: async () => {
      await upper.stop();
      await lower.stop();
    },
  };
}

export const REMOTE_CONFIGS: readonly MatrixConfig[] = [
  {
    id: "udm-linear-nbd",
    label: "udm linear over NBD (nbdkit file)",
    passes: false,
    perCoreRef: "nbdkit-file",
    open: async (ctx) => {
      const lower = await nbdkitUnder(ctx.dir, ctx.data, false);
      const d = await startUdmd(path.join(ctx.dir, "udm-run"), {
        udmd: ctx.udmd,
        args: ctx.udmdArgs,
        profileDir: ctx.profileDir,
        profileName: ctx.profileName,
      });
      const server = pair(d, lower);
      try {
        await d.control.request("create", {
          name: "vol",
          table: [{ start: 0, length: ctx.fileBytes / SECTOR, type: "linear", params: `${lower.uri()} 0` }],
        });
      } catch (err) {
        await server.stop();
        throw err;
      }
      const running = { target: { engine: "nbd" as const, uri: d.uri("vol") }, server };
      return { running: () => running, fresh: async () => undefined, close: server.stop };
    },
  },
  {
    id: "udm-snap-remote",
    label: "udm snapshot (chunk 8) over a remote origin (nbdkit -r), local COW",
    passes: true,
    perCoreRef: "nbdkit-cow",
    open: async (ctx) => {
      const lower = await nbdkitUnder(ctx.dir, ctx.data, true);
      const d = await startUdmd(path.join(ctx.dir, "udm-run"), {
        udmd: ctx.udmd,
        args: ctx.udmdArgs,
        profileDir: ctx.profileDir,
        profileName: ctx.profileName,
      });
      const server = pair(d, lower);
      const sectors = ctx.fileBytes / SECTOR;
      const cow = path.join(ctx.dir, "cow.img");
      let live = false;
      const fresh = async () => {
        if (live) await d.control.request("remove", { name: "vm" });
        live = false;
        // Never overflows (a header, the exception areas and every chunk): 4 KiB chunks.
        sparseFile(cow, cowBytesFor(ctx.fileBytes / 4096, 4096));
        await d.control.request("create", {
          name: "vm",
          table: [{ start: 0, length: sectors, type: "snapshot", params: `${lower.uri()} ${cow} P 8` }],
        });
        live = true;
      };
      return remakingInstance(server, d.uri("vm"), fresh, [cow]);
    },
  },
  {
    id: "qcow2-remote",
    label: "qemu-nbd qcow2 overlay (4 KiB clusters) over a remote backing file (nbdkit -r)",
    passes: true,
    perCoreRef: "nbdkit-cow",
    open: async (ctx) => {
      const lower = await nbdkitUnder(ctx.dir, ctx.data, true);
      const overlay = path.join(ctx.dir, "overlay.qcow2");
      let upper: Server | null = null;
      const fresh = async () => {
        await upper?.stop();
        upper = null;
        fs.rmSync(overlay, { force: true });
        execFileSync("qemu-img", [
          "create",
          "-q",
          "-f",
          "qcow2",
          "-b",
          lower.uri(),
          "-F",
          "raw",
          "-o",
          "cluster_size=4096",
          overlay,
          String(ctx.fileBytes),
        ]);
        upper = await startQemuNbd(path.join(ctx.dir, "qemu.sock"), ["-f", "qcow2", overlay]);
      };
      try {
        await fresh();
      } catch (err) {
        await lower.stop();
        throw err;
      }
      return {
        running: () => ({ target: { engine: "nbd", uri: upper!.uri() }, server: upper }),
        fresh,
        close: async () => {
          await upper?.stop();
          await lower.stop();
        },
      };
    },
  },
];

type Compare = (target: string, a: Figure | undefined, b: Figure | undefined, w: MatrixWorkload, goal: number) => void;

/** The remote rows of the target table: udm linear over NBD / fio straight to the export. */
export function remoteTargets(
  by: (id: string) => ConfigResult | undefined,
  workloads: readonly MatrixWorkload[],
  compare: Compare,
): void {
  const over = by("udm-linear-nbd");
  const straight = by("nbdkit-file");
  for (const w of workloads) {
    const key: WorkloadKey = w.key;
    compare(
      `udm linear over NBD / fio's nbd engine straight to the same nbdkit export, ${w.name}`,
      over?.figures[key],
      straight?.figures[key],
      w,
      LINEAR_OVER_NBD_GOAL,
    );
  }
}
