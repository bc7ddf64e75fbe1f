/**
 * Writable overlays in the benchmark matrix (udm issue 17): a persistent snapshot used as the
 * overlay of a base image (`snapshot ORIGIN COW P 8|128`: writes go to the COW device, the origin
 * is never written, no snapshot-origin device), next to nbdkit's cow filter and qemu-nbd's qcow2
 * overlays (4 KiB and 64 KiB clusters), with udm linear on the same origin as the reference for
 * reads through an overlay that holds nothing yet.
 *
 * The overlay workloads run in three phases, each on a fresh (empty) overlay:
 *   empty    1 MiB sequential read and 4 KiB random read (time-based): every read goes to the origin;
 *   written  the first 1 MiB sequential write pass over the whole device (every chunk / cluster /
 *            block allocated), the same pass again (nothing left to allocate), then, on the overlay
 *            now fully written, 4 KiB random read, 1 MiB sequential write and 4 KiB random write
 *            (time-based: steady-state overwrites, nothing allocated);
 *   strided  one 4 KiB write per 64 KiB stride over the whole device (fio rw=write:60k, one pass:
 *            every 64 KiB chunk / cluster / block gets its first write, and a 4 KiB-chunk snapshot
 *            one exception per 16 chunks), then the same pass again.
 * A phase runs when one of its workloads is selected; its first pass always runs (the later
 * workloads need its copies) but is only reported when selected.
 *
 * Targets (issue 17): every udm overlay row ≥ 1.5× the best peer of the same run (the best median;
 * the per-round range sets round n of both against each other); reads through the empty overlay
 * ≥ 0.9× udm linear on the same origin.
 */
import path from "node:path";
import { fmt, KiB, markdownTable, MiB } from "./format.js";
import type { ConfigResult, Figure, MatrixConfig, MatrixRep, MatrixResult, MatrixWorkload } from "./matrix.js";
import { sparseFile } from "./counting-backing.js";
import { remakingInstance, startUdmd } from "./servers.js";

const SECTOR = 512;

export type OverlayKey =
  | "ov-seqread"
  | "ov-seqwrite"
  | "ov-randread"
  | "ov-randwrite"
  | "ov-seqfirst"
  | "ov-seqrewrite"
  | "ov-stridefirst"
  | "ov-striderewrite"
  | "ov-randread-full";

function overlayWorkload(
  key: OverlayKey,
  name: string,
  rw: MatrixWorkload["rw"],
  blockSize: number,
  iodepth: number,
  unit: MatrixWorkload["unit"],
  pass: boolean,
  skip?: number,
): MatrixWorkload {
  return { key, name, rw, blockSize, iodepth, unit, pass, overlay: true, skip };
}

/** The overlay workloads, in the order of issue 17's table. */
export const OVERLAY_WORKLOADS: readonly MatrixWorkload[] = [
  overlayWorkload("ov-seqread", "1 MiB sequential read, empty overlay", "read", MiB, 4, "MiB/s", false),
  overlayWorkload("ov-seqwrite", "1 MiB sequential write, overlay fully written", "write", MiB, 4, "MiB/s", false),
  overlayWorkload("ov-randread", "4 KiB random read, empty overlay", "randread", 4 * KiB, 16, "IOPS", false),
  overlayWorkload("ov-randwrite", "4 KiB random write, overlay fully written", "randwrite", 4 * KiB, 16, "IOPS", false),
  overlayWorkload("ov-seqfirst", "first 1 MiB sequential write into an empty overlay", "write", MiB, 4, "MiB/s", true),
  overlayWorkload("ov-seqrewrite", "1 MiB sequential rewrite of it", "write", MiB, 4, "MiB/s", true),
  // One 4 KiB write per 64 KiB: fio's sequential I/O with holes (rw=write:60k).
  overlayWorkload(
    "ov-stridefirst",
    "first 4 KiB write per 64 KiB stride",
    "write",
    4 * KiB,
    16,
    "IOPS",
    true,
    60 * KiB,
  ),
  overlayWorkload("ov-striderewrite", "rewrite of those 4 KiB writes", "write", 4 * KiB, 16, "IOPS", true, 60 * KiB),
  overlayWorkload(
    "ov-randread-full",
    "4 KiB random read, overlay fully written",
    "randread",
    4 * KiB,
    16,
    "IOPS",
    false,
  ),
];

const ov = (key: OverlayKey) => OVERLAY_WORKLOADS.find((w) => w.key === key)!;

/** The overlay peers, in table order; the best of them in a run is what udm is set against. */
export const OVERLAY_PEERS = ["nbdkit-cow", "qcow2-4k", "qcow2-64k"];
/** Short column names of the overlay table. */
const SHORT: Record<string, string> = {
  "nbdkit-cow": "nbdkit cow",
  "qcow2-4k": "qcow2 4K",
  "qcow2-64k": "qcow2 64K",
  "udm-linear": "udm linear",
  "udm-overlay-4k": "udm P 8",
  "udm-overlay-64k": "udm P 128",
};

/** The overlay targets (issue 17). */
export const OVERLAY_GOALS = {
  /** udm overlay / the best peer, every overlay workload. */
  vsBestPeer: 1.5,
  /** udm overlay reads with no exceptions / udm linear on the same origin. */
  readsVsLinear: 0.9,
};

/** COW bytes that can never overflow for `chunks` chunks of `chunkBytes` (docs/snapshot.md, Sizing). */
export function cowBytesFor(chunks: number, chunkBytes: number): number {
  const perArea = chunkBytes / 16;
  return (1 + Math.ceil((chunks + 1) / perArea) + chunks) * chunkBytes;
}

/** udmd with one persistent snapshot "vm" of the data file on a zeroed COW file; fresh() replaces it. */
function udmOverlay(chunkSectors: number): MatrixConfig["open"] {
  return async (ctx) => {
    const d = await startUdmd(path.join(ctx.dir, "udm-run"), {
      udmd: ctx.udmd,
      args: ctx.udmdArgs,
      profileDir: ctx.profileDir,
      profileName: ctx.profileName,
    });
    const chunkBytes = chunkSectors * SECTOR;
    const cow = path.join(ctx.dir, "cow.img");
    let live = false;
    const fresh = async () => {
      if (live) await d.control.request("remove", { name: "vm" });
      live = false;
      sparseFile(cow, cowBytesFor(ctx.fileBytes / chunkBytes, chunkBytes));
      await d.control.request("create", {
        name: "vm",
        table: [
          {
            start: 0,
            length: ctx.fileBytes / SECTOR,
            type: "snapshot",
            params: `${ctx.data} ${cow} P ${chunkSectors}`,
          },
        ],
      });
      live = true;
    };
    return remakingInstance(d, d.uri("vm"), fresh, [cow]);
  };
}

export const OVERLAY_CONFIGS: readonly MatrixConfig[] = [
  {
    id: "udm-overlay-4k",
    label: "udm snapshot as an overlay, P 8 (4 KiB chunks)",
    passes: false,
    matrixWorkloads: false,
    overlay: "udm",
    perCoreRef: "nbdkit-cow",
    open: udmOverlay(8),
  },
  {
    id: "udm-overlay-64k",
    label: "udm snapshot as an overlay, P 128 (64 KiB chunks)",
    passes: false,
    matrixWorkloads: false,
    overlay: "udm",
    perCoreRef: "nbdkit-cow",
    open: udmOverlay(128),
  },
];

/** What the overlay phases need from the matrix's run of one configuration. */
export interface OverlayRun {
  /** A fresh (empty) overlay; a no-op for udm linear. */
  fresh(): Promise<void>;
  /** One fio job of `w`: time-based for `runtimeMs`, or one pass without it. */
  measure(w: MatrixWorkload, runtimeMs: number | undefined, label?: string): Promise<MatrixRep>;
  warmupMs: number;
  runtimeMs: number;
}

/**
 * The selected overlay workloads of one round, phase by phase (module comment); returns each
 * selected workload's repetition.
 */
export async function runOverlayPhases(
  run: OverlayRun,
  selected: readonly MatrixWorkload[],
): Promise<Map<OverlayKey, MatrixRep>> {
  const want = new Set(selected.map((w) => w.key));
  const out = new Map<OverlayKey, MatrixRep>();
  const timed = async (key: OverlayKey) => {
    if (!want.has(key)) return;
    if (run.warmupMs > 0) await run.measure(ov(key), run.warmupMs, `${ov(key).name} warm-up`);
    out.set(key, await run.measure(ov(key), run.runtimeMs));
  };
  const pass = async (key: OverlayKey) => {
    const r = await run.measure(ov(key), undefined);
    if (want.has(key)) out.set(key, r);
  };
  const some = (...keys: OverlayKey[]) => keys.some((k) => want.has(k));
  if (some("ov-seqread", "ov-randread")) {
    await run.fresh();
    await timed("ov-seqread");
    await timed("ov-randread");
  }
  if (some("ov-seqfirst", "ov-seqrewrite", "ov-randread-full", "ov-seqwrite", "ov-randwrite")) {
    if (run.warmupMs > 0) {
      // The server's write path warmed up on an overlay of its own, not timed.
      await run.fresh();
      await run.measure(ov("ov-seqwrite"), run.warmupMs, "overlay write warm-up");
    }
    await run.fresh();
    await pass("ov-seqfirst");
    if (want.has("ov-seqrewrite")) await pass("ov-seqrewrite");
    await timed("ov-randread-full");
    await timed("ov-seqwrite");
    await timed("ov-randwrite");
  }
  if (some("ov-stridefirst", "ov-striderewrite")) {
    await run.fresh();
    await pass("ov-stridefirst");
    if (want.has("ov-striderewrite")) await pass("ov-striderewrite");
  }
  return out;
}

// ---- ratios, table, targets ----

const value = (f: Figure, w: MatrixWorkload) => (w.unit === "IOPS" ? f.iops : f.mibps);

/** a / b as a ratio of medians, and the lowest and highest ratio of one round (repetition n of both). */
export function roundRatio(a: Figure, b: Figure, w: MatrixWorkload): { ratio: number; low: number; high: number } {
  const bv = b.reps.map((r) => (w.unit === "IOPS" ? r.iops : r.mibps));
  const perRound = a.reps
    .map((r, i) => (w.unit === "IOPS" ? r.iops : r.mibps) / bv[i]!)
    .filter((x) => Number.isFinite(x));
  return { ratio: value(a, w) / value(b, w), low: Math.min(...perRound), high: Math.max(...perRound) };
}

/** The peer with the best median on `w` in this run, if any ran it. */
export function bestPeer(by: (id: string) => ConfigResult | undefined, w: MatrixWorkload): ConfigResult | undefined {
  return OVERLAY_PEERS.map(by)
    .filter((c) => c?.figures[w.key])
    .sort((x, y) => value(y!.figures[w.key]!, w) - value(x!.figures[w.key]!, w))[0];
}

const dash = "—";
const num = (f: Figure | undefined, w: MatrixWorkload) =>
  f ? (w.unit === "IOPS" ? fmt(value(f, w), 0) : fmt(value(f, w))) : dash;
const ratioText = (r: { ratio: number; low: number; high: number }) =>
  `${r.ratio.toFixed(2)}× (${r.low.toFixed(2)}–${r.high.toFixed(2)})`;

/**
 * Issue 17's table: a row per overlay workload, a column per configuration of the run, the best
 * peer, and each udm overlay as a ratio to it (ratio of medians, per-round range in brackets).
 * Null when no overlay workload ran.
 */
export function overlayTable(r: MatrixResult): string | null {
  const by = (id: string) => r.configs.find((c) => c.id === id);
  const ran = r.configs.filter((c) => c.overlay && OVERLAY_WORKLOADS.some((w) => c.figures[w.key]));
  if (!ran.length) return null;
  const workloads = OVERLAY_WORKLOADS.filter((w) => ran.some((c) => c.figures[w.key]));
  const peers = ran.filter((c) => c.overlay === "peer");
  const others = ran.filter((c) => c.overlay !== "peer");
  const name = (c: ConfigResult) => SHORT[c.id] ?? c.id;
  const header = [
    "workload",
    ...peers.map(name),
    "best peer",
    ...others.flatMap((c) => (c.overlay === "udm" ? [name(c), `${name(c)} / best peer`] : [name(c)])),
  ];
  const rows = workloads.map((w) => {
    const best = bestPeer(by, w);
    return [
      `${w.name} ${w.unit}`,
      ...peers.map((c) => num(c.figures[w.key], w)),
      best ? name(best) : dash,
      ...others.flatMap((c) => {
        const f = c.figures[w.key];
        if (c.overlay !== "udm") return [num(f, w)];
        const b = best?.figures[w.key];
        return [num(f, w), f && b ? ratioText(roundRatio(f, b, w)) : dash];
      }),
    ];
  });
  const right = new Set(header.map((_, i) => i).filter((i) => i > 0 && header[i] !== "best peer"));
  return markdownTable(header, rows, right);
}

/** Server CPU seconds per GiB moved, for the overlay workloads (null when none ran). */
export function overlayCpuTable(r: MatrixResult): string | null {
  const ran = r.configs.filter((c) => c.overlay && OVERLAY_WORKLOADS.some((w) => c.figures[w.key]));
  if (!ran.length) return null;
  const workloads = OVERLAY_WORKLOADS.filter((w) => ran.some((c) => c.figures[w.key]));
  const header = ["Server CPU s per GiB moved", ...ran.map((c) => SHORT[c.id] ?? c.id)];
  const rows = workloads.map((w) => [
    w.name,
    ...ran.map((c) => {
      const f = c.figures[w.key];
      return f?.cpuPerGiB != null ? fmt(f.cpuPerGiB, 2) : dash;
    }),
  ]);
  return markdownTable(header, rows, new Set(ran.map((_, i) => i + 1)));
}

type Compare = (target: string, a: Figure | undefined, b: Figure | undefined, w: MatrixWorkload, goal: number) => void;

/** The overlay rows of the target table. */
export function overlayTargets(by: (id: string) => ConfigResult | undefined, compare: Compare): void {
  for (const c of OVERLAY_CONFIGS.map((x) => by(x.id))) {
    if (!c) continue;
    for (const w of OVERLAY_WORKLOADS) {
      const best = bestPeer(by, w);
      if (best)
        compare(
          `${SHORT[c.id]} overlay / best peer (${SHORT[best.id]}), ${w.name}`,
          c.figures[w.key],
          best.figures[w.key],
          w,
          OVERLAY_GOALS.vsBestPeer,
        );
    }
    for (const key of ["ov-seqread", "ov-randread"] as const)
      compare(
        `${SHORT[c.id]} overlay / udm linear on the same origin, ${ov(key).name}`,
        c.figures[key],
        by("udm-linear")?.figures[key],
        ov(key),
        OVERLAY_GOALS.readsVsLinear,
      );
  }
}

/** The run's description of the overlay rows (describeMatrixRun). */
export const OVERLAY_DESCRIPTION =
  "overlay rows (issue 17; `--configs overlays --only overlays` runs just them): udm `snapshot DATA COW P 8|128` alone (no snapshot-origin, the origin never written; COW file zeroed, made big enough never to fill) next to nbdkit's cow filter and the qcow2 overlays, and udm linear on the same data file as the reference for reads; each repetition runs three phases on a fresh overlay: (1) 1 MiB sequential read (QD 4) and 4 KiB random read (QD 16) of the empty overlay, time-based; (2) one pass of 1 MiB sequential writes (QD 4) over the whole device (first write: everything allocated), the same pass again (rewrite), then on the fully written overlay 4 KiB random read, 1 MiB sequential write and 4 KiB random write, time-based; (3) one pass of one 4 KiB write per 64 KiB stride (QD 16; fio rw=write:60k) and the same pass again; udm rows as a ratio to the best peer's median, the per-round range in brackets";
