/**
 * A thin volume as the writable overlay of an external origin (udm issue 19, "Performance"), over
 * NBD and driven by fio like the benchmark matrix (bench/matrix.ts, whose configurations and
 * helpers it reuses): udmd with a pool of 64 KiB blocks and `thin POOL 1 BASE`, against qemu-nbd
 * with a qcow2 overlay of 64 KiB clusters and nbdkit's cow filter (64 KiB blocks), all over the
 * same base file. `npm run bench -- --thin-overlay`, or `node --import tsx bench/thin-overlay.ts`.
 *
 * Each repetition, on a fresh overlay of each configuration (the order rotated): the first write
 * (one pass of 4 KiB random writes at QD16 over the whole device: each 64 KiB block's first write
 * copies it from the base) and its rewrite (the same pass again: nothing left to copy), then, on
 * another fresh overlay, a first 1 MiB sequential write pass (QD4; every block written whole: no
 * copy) and its rewrite. Target: udm ≥ 1.2 × each peer on every pass.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { type FioJob, runFio } from "./fio.js";
import { fmt, KiB, markdownTable, MiB, recordResultsSection, runAsScript } from "./format.js";
import { ensureBuilt, MATRIX_CONFIGS, type MatrixConfig } from "./matrix.js";
import { filesystemOf, median, pickDataDir } from "./micro.js";
import { sparseFile } from "./counting-backing.js";
import { remakingInstance, startUdmd } from "./servers.js";

const SECTOR = 512;
const BLOCK_SECTORS = 128;

export const THIN_OVERLAY_GOAL = 1.2;

export interface ThinOverlayOptions {
  fileBytes: number;
  repetitions: number;
  dir?: string;
  log?: (m: string) => void;
}

export const FULL_THIN_OVERLAY: ThinOverlayOptions = { fileBytes: 128 * MiB, repetitions: 3 };

type Ctx = Parameters<MatrixConfig["open"]>[0];
type Instance = Awaited<ReturnType<MatrixConfig["open"]>>;

/** udmd with a pool (64 KiB blocks) and thin volume 1 over the base as its external origin; fresh() makes a new pool. */
async function openThinOverlay(ctx: Ctx): Promise<Instance> {
  const d = await startUdmd(path.join(ctx.dir, "udm-run"), { udmd: ctx.udmd, args: ctx.udmdArgs });
  const meta = path.join(ctx.dir, "thin-meta.img");
  const data = path.join(ctx.dir, "thin-data.img");
  const sectors = ctx.fileBytes / SECTOR;
  const dataBytes = ctx.fileBytes + 16 * MiB;
  let live = false;
  const table = (type: string, length: number, params: string) => [{ start: 0, length, type, params }];
  const fresh = async () => {
    if (live) {
      await d.control.request("remove", { name: "vol" });
      await d.control.request("remove", { name: "pool" });
    }
    live = false;
    sparseFile(meta, 16 * MiB);
    sparseFile(data, dataBytes);
    await d.control.request("create", {
      name: "pool",
      table: table("thin-pool", dataBytes / SECTOR, `${meta} ${data} ${BLOCK_SECTORS} 0`),
    });
    await d.control.request("message", { name: "pool", sector: 0, message: "create_thin 1" });
    await d.control.request("create", { name: "vol", table: table("thin", sectors, `/dev/mapper/pool 1 ${ctx.data}`) });
    live = true;
  };
  return remakingInstance(d, d.uri("vol"), fresh, [meta, data]);
}

const CONFIGS: { id: string; label: string; open: MatrixConfig["open"] }[] = [
  { id: "udm-thin-64k", label: "udm thin over an external origin, 64 KiB blocks", open: openThinOverlay },
  ...["qcow2-64k", "nbdkit-cow"].map((id) => {
    const c = MATRIX_CONFIGS.find((x) => x.id === id);
    if (!c) throw new Error(`bench/matrix.ts has no configuration ${id}`);
    return { id, label: c.label, open: c.open };
  }),
];

const PASSES = [
  { key: "rand", name: "4 KiB random writes, QD16", job: { rw: "randwrite", blockSize: 4 * KiB, iodepth: 16 } },
  { key: "seq", name: "1 MiB sequential writes, QD4", job: { rw: "write", blockSize: MiB, iodepth: 4 } },
] as const;

export interface ThinOverlayResult {
  options: ThinOverlayOptions;
  dataDir: string;
  /** MiB/s per configuration id, per pass ("rand first", "rand rewrite", ...), per repetition. */
  mibps: Record<string, Record<string, number[]>>;
}

function fillRandom(file: string, bytes: number): void {
  const buf = Buffer.alloc(MiB);
  const fd = fs.openSync(file, "w");
  try {
    for (let at = 0; at < bytes; at += MiB) {
      for (let i = 0; i < MiB; i += 4) buf.writeUInt32LE((Math.random() * 2 ** 32) >>> 0, i);
      fs.writeSync(fd, buf, 0, MiB, at);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export async function runThinOverlayBenchmark(opts: ThinOverlayOptions): Promise<ThinOverlayResult> {
  const log = opts.log ?? (() => undefined);
  const dataDir = opts.dir ?? pickDataDir(4 * opts.fileBytes);
  const dir = fs.mkdtempSync(path.join(dataDir, "udm-thinov-"));
  const base = path.join(dir, "base.img");
  const mibps: ThinOverlayResult["mibps"] = {};
  try {
    fillRandom(base, opts.fileBytes);
    const ctx: Ctx = { dir, data: base, fileBytes: opts.fileBytes, profileName: "thin-overlay" };
    for (let rep = 0; rep < opts.repetitions; rep++) {
      for (let k = 0; k < CONFIGS.length; k++) {
        const c = CONFIGS[(k + rep) % CONFIGS.length]!;
        const inst = await c.open(ctx);
        try {
          for (const p of PASSES) {
            await inst.fresh();
            for (const phase of ["first", "rewrite"]) {
              const job: FioJob = { name: `${p.key}-${phase}`, ...p.job };
              const r = await runFio(inst.running().target, job, path.join(dir, "fio.json"));
              ((mibps[c.id] ??= {})[`${p.key} ${phase}`] ??= []).push(r.mibps);
              log(`thin overlay bench: ${c.id}, ${p.name}, ${phase}, repetition ${rep + 1}: ${fmt(r.mibps)} MiB/s`);
            }
          }
        } finally {
          await inst.close();
        }
      }
    }
    return { options: opts, dataDir, mibps };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export function thinOverlayTable(r: ThinOverlayResult): string {
  const rows: string[][] = [];
  const udm = r.mibps["udm-thin-64k"]!;
  for (const p of PASSES) {
    for (const phase of ["first", "rewrite"]) {
      const key = `${p.key} ${phase}`;
      const cells = [`${p.name}, ${phase === "first" ? "first write" : "rewrite"}`];
      for (const c of CONFIGS) cells.push(fmt(median(r.mibps[c.id]![key]!)));
      for (const id of ["qcow2-64k", "nbdkit-cow"]) {
        const peer = r.mibps[id]![key]!;
        const ratio = median(udm[key]!) / median(peer);
        const perRound = udm[key]!.map((x, i) => x / peer[i]!);
        cells.push(
          `${fmt(ratio, 2)}× (${fmt(Math.min(...perRound), 2)}–${fmt(Math.max(...perRound), 2)}) ${ratio >= THIN_OVERLAY_GOAL ? "PASS" : "MISS"}`,
        );
      }
      rows.push(cells);
    }
  }
  return markdownTable(
    [
      "Pass (MiB/s)",
      ...CONFIGS.map((c) => c.id),
      `udm / qcow2-64k (>= ${THIN_OVERLAY_GOAL}×)`,
      `udm / nbdkit-cow (>= ${THIN_OVERLAY_GOAL}×)`,
    ],
    rows,
    new Set([1, 2, 3]),
  );
}

export function describeThinOverlayRun(r: ThinOverlayResult): string[] {
  const fsys = filesystemOf(r.dataDir);
  return [
    `thin as a writable overlay over NBD, fio's nbd engine: ${CONFIGS.map((c) => `${c.id} (${c.label})`).join(", ")}; base: ${r.options.fileBytes / MiB} MiB of random bytes in ${r.dataDir} (${fsys.type})`,
    `each repetition, per configuration (order rotated) on a fresh overlay: one pass of 4 KiB random writes at QD16 over the whole device (first write: every 64 KiB block copied from the base on its first write) and the same pass again (rewrite); then on another fresh overlay a 1 MiB sequential write pass at QD4 and its rewrite; MiB/s: median of ${r.options.repetitions}, ratios of medians with the per-round range; ${os.cpus().length} CPUs shared with other work (noisy)`,
  ];
}

export function recordThinOverlayResults(file: string, description: string[], table: string, command: string): void {
  recordResultsSection(file, "thin-overlay", "Thin as a writable overlay", description, table, command);
}

runAsScript(
  import.meta.url,
  () => {
    ensureBuilt((m) => console.error(m));
    return runThinOverlayBenchmark({ ...FULL_THIN_OVERLAY, log: (m) => console.error(m) });
  },
  (r) => [...describeThinOverlayRun(r), "", thinOverlayTable(r)],
);
