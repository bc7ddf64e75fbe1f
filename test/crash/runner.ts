/**
 * The crash-consistency runner (udm issue 6, "Replay and crash harness").
 *
 * 1. Workload. The origin's RAM disk and each snapshot's COW RAM disk sit under their own
 *    `log-writes <data> <log>` device; `snapshot-origin` and `snapshot` tables name those
 *    log-writes devices (/dev/mapper/lw-origin, /dev/mapper/lw-cow<k>). A seeded workload drives
 *    the stack through the library API: concurrent origin and snapshot writes (some FUA) and
 *    reads (checked at once against the model), flushes, suspends with I/O in flight, snapshot
 *    creation and removal, and merges (with I/O during the merge) when `snapshot-merge` is
 *    registered and passes a self-test. After every operation a `mark op<n>` message goes to
 *    every log-writes device.
 *
 * 2. Time. Some bios to the RAM disks are delayed a few event-loop turns (`jitter`), so copies,
 *    commits and flushes complete out of order. One clock stamps the mapped devices' submissions
 *    and acknowledgements, every submission and completion on the data RAM disks (a
 *    RecordingDevice under each log-writes target) and the marks. From those the runner rebuilds
 *    the sequence log-writes must have logged and checks the log is exactly it (mapEntries), which
 *    gives each entry the moment it completed (`c`) and the moment it became durable (`d`): its
 *    own completion for FLUSH and FUA entries, for a plain write the completion of the first
 *    flush submitted after it completed. A crash at moment t is: on every data device, every
 *    entry with d <= t, plus any subset of the plain writes with c <= t < d (written back from
 *    a volatile cache, or not), applied per sector in completion order (applyEntry). That is
 *    not always a prefix of the log (mapEntries and applyEntry say why), but at every mark
 *    nothing is in flight and it is: `replayLog(..., { endMark })` is compared with the
 *    incremental replay every few operations.
 *
 * 3. Crash points: every FLUSH or FUA entry of any device (nothing unflushed kept), plus random
 *    moments with a random subset of the unflushed writes kept. For each, fresh RAM disks get the
 *    replayed contents, the snapshot-origin and every snapshot that existed at that moment are
 *    activated again (persistent stores reload, chunk size 0), and snapshot-design §4.10 is
 *    checked against the model:
 *    - the COW image parses without a problem and the exceptions load (status not Invalid, the
 *      usage the image implies);
 *    - no leaked chunk: records in allocation order, next_free = last recorded + 1, every data
 *      chunk below next_free recorded;
 *    - the origin holds every acknowledged flushed write (any sector: the last durable write or a
 *      later submitted one; never a lost or invented one);
 *    - each snapshot equals the origin at its creation plus its own acknowledged flushed writes;
 *      a chunk the snapshot has recorded holds exactly its point-in-time data (or its own later
 *      writes); a chunk it has not recorded must not show any origin write made after creation;
 *    - during a merge: the origin comes back as snapshot-merge (reading the metadata), the merge
 *      must run to the end, and the origin must then hold the merged snapshot's data in every
 *      chunk it had recorded (or writes made to the origin during the merge); the other
 *      snapshots keep their point in time;
 *    - at the random points, after recovery: new origin and snapshot writes, then a second
 *      reactivation, change nothing they should not (a reloaded store must not reuse a chunk).
 */
import { Bio, BioFlags, SECTOR_SIZE, submitAndWait } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { MemoryDevice } from "../../core/devices/memory-device.js";
import { MemoryLogger } from "../../core/logger.js";
import type { TargetClass } from "../../core/target.js";
import { createDeviceMapper } from "../../index.js";
import { END_MARK, LOG_FLUSH_FLAG, LOG_FUA_FLAG, LOG_MARK_FLAG, type LogEntry, markName } from "../../targets/log-writes/format.js";
import { LogReader, deviceLogSource, replayLog } from "../../targets/log-writes/replay.js";
import { isMetadataChunk, skipMetadata } from "../../targets/snapshot/cow-format.js";
import { type CowImage, readCowImage } from "../../targets/snapshot/cow-image.js";
import { type Completion, CrashClock, type Jitter, NamedDevices, OverlayDevice, RecordingDevice } from "./devices.js";
import {
  DeviceHistory, type SnapshotModel, type TopFlush, type TopWrite, decodeSector, describeValue, stampSector, writeData,
} from "./model.js";
import { Rng } from "./rng.js";

export interface CrashRunOptions {
  /** Workload operations. */
  ops: number;
  seed: number;
  /** Origin size in sectors (default 2048). */
  originSectors?: number;
  /** Snapshots alive at once, at most (default 3). */
  maxSnapshots?: number;
  /** Crash points at random moments, with random unflushed writes kept (default ops / 2). */
  randomPoints?: number;
  /** Add random points until at least this many crash points are checked (default 0). */
  minPoints?: number;
  /** Target type of the workload's snapshot tables (default "snapshot"); reactivation always uses "snapshot". */
  snapshotTarget?: string;
  /** Target type of the workload's merge tables (default "snapshot-merge"); reactivation always uses "snapshot-merge". */
  mergeTarget?: string;
  /** Extra target classes for the workload's device mapper (e.g. a deliberately broken snapshot). */
  targets?: TargetClass[];
  /** Merge snapshots back into the origin: "auto" (default) when the registry lists snapshot-merge and a self-test passes. */
  merges?: boolean | "auto";
  /** Probability that a bio to a data RAM disk completes a few event-loop turns late (default 0.3). */
  jitter?: number;
  /** At random points, write to the recovered devices and reactivate them again (default true). */
  postRecovery?: boolean;
  /** Compare replayLog(--end-mark) with the incremental replay every this many operations (default 50; 0: never). */
  crossCheckEvery?: number;
  /** Failing crash points described in the report, at most (default 10). */
  maxReported?: number;
  /** Progress lines (seed, phases). */
  progress?: (line: string) => void;
}

export interface CrashFailure {
  point: string;
  problems: string[];
}

export interface CrashRunReport {
  seed: number;
  ops: number;
  pointsChecked: number;
  flushPoints: number;
  randomPoints: number;
  /** Failing crash points plus workload problems (a wrong live read, a failed I/O, an engine error). */
  failures: number;
  failedPoints: number;
  failureDetails: CrashFailure[];
  workloadProblems: string[];
  crossChecks: number;
  merges: { enabled: boolean; note: string; done: number };
  stats: {
    writes: number;
    reads: number;
    flushes: number;
    suspends: number;
    snapshotsCreated: number;
    snapshotsRemoved: number;
    logEntries: number;
    unflushedKept: number;
    unflushedDropped: number;
    /** Sectors where log order and completion order disagreed (see applyEntry). */
    reorderedSectors: number;
    /** Plain writes made durable by a flush that log-writes did not give them to (see mapEntries). */
    earlierDurable: number;
  };
  elapsedMs: { workload: number; check: number; total: number };
}

const LOG_SECTORS = 1 << 24; // sparse: only what is logged takes memory
const CHUNK_SIZES = [8, 16, 32] as const;
/** Ids of writes made while checking a recovered state (never in the model). */
const RECOVERY_ID_BASE = 0x4000_0000;

/** COW sectors for a never-overflowing snapshot of `originSectors` (snapshot-design §4.11, plus slack). */
export function cowSectorsFor(cs: number, originSectors: number): number {
  const chunks = Math.ceil(originSectors / cs);
  const epa = (cs * SECTOR_SIZE) / 16;
  return cs * (1 + Math.ceil((chunks + 1) / epa) + chunks + 2);
}

type EntryKind = "flush" | "fua" | "plain" | "mark";

interface MappedEntry {
  entry: LogEntry;
  kind: EntryKind;
  /** Completion stamp (plain writes) or the stamp of the entry itself. */
  c: number;
  /**
   * When it became durable: its own stamp (flush, FUA, mark); for a plain write, the completion
   * of the first flush submitted after it completed (Infinity: none).
   */
  d: number;
  /** Applied to the incremental replay. */
  applied: boolean;
}

interface DataDev {
  key: string;
  lw: string;
  sectors: number;
  rec: RecordingDevice;
  log: MemoryDevice;
  initial: Buffer | null;
  snapshot: SnapshotModel | null;
  entries: MappedEntry[];
  /** The incremental replay: `acc` holds the first `applied` entries of `byDurable`. */
  acc: MemoryDevice;
  byDurable: MappedEntry[];
  applied: number;
  /** Plain writes by completion; the first `completed` have completed by the current moment. */
  byCompletion: MappedEntry[];
  completed: number;
  /** Plain writes completed by the current moment and not durable yet, in completion order. */
  pending: Set<MappedEntry>;
  /** Per sector: completion stamp of the write whose data `acc` holds there (0: the initial content). */
  stamps: Float64Array;
  /** Sectors where the log order put an older write after a newer one (see applyEntry). */
  reordered: Set<number>;
  /** Marks sent to its log-writes device. */
  marks: { name: string; at: number }[];
}

interface CrashPoint {
  t: number;
  kind: "flush" | "fua" | "random" | "cross-check";
  /** Which device's entry made the point (flush/fua) or which mark (cross-check). */
  source: string;
  /** Probability of keeping each unflushed write (random points). */
  keep: number;
  seed: number;
}

/** A snapshot brought back at a crash point. */
interface Activated {
  s: SnapshotModel;
  /** Its device in the replay device mapper. */
  name: string;
  cow: OverlayDevice;
  /** Its COW image as the crash left it. */
  img: CowImage;
}

interface OpRecord {
  index: number;
  at: number;
  desc: string;
}

class Problems {
  readonly list: string[] = [];
  private readonly perKey = new Map<string, number>();
  add(key: string, text: string, limit = 4): void {
    const n = (this.perKey.get(key) ?? 0) + 1;
    this.perKey.set(key, n);
    if (n <= limit) this.list.push(text);
    else if (n === limit + 1) this.list.push(`${key}: more problems like these left out`);
  }
  get empty(): boolean {
    return this.list.length === 0;
  }
}

export async function runCrashHarness(opts: CrashRunOptions): Promise<CrashRunReport> {
  const runner = new CrashRunner(opts);
  return runner.run();
}

class CrashRunner {
  private readonly rng: Rng;
  private readonly jitter: Jitter | null;
  private readonly clock = new CrashClock();
  private readonly backing = new NamedDevices();
  private readonly logger = new MemoryLogger(true);
  private readonly dm: DeviceMapper;
  private readonly N: number;
  private readonly maxSnapshots: number;
  private readonly snapshotTarget: string;
  private readonly progress: (line: string) => void;

  private readonly origin: DeviceHistory;
  private readonly dataDevs: DataDev[] = [];
  private readonly snapshots: SnapshotModel[] = [];
  private readonly ops: OpRecord[] = [];
  private readonly markStamps = new Map<string, number>();
  private readonly workloadProblems: string[] = [];
  private nextId = 1;
  private nextRecoveryId = RECOVERY_ID_BASE;
  private endOfWorkload = 0;
  private mergesEnabled = false;
  private mergeNote = "";
  private mergesDone = 0;
  private readonly stats = {
    writes: 0, reads: 0, flushes: 0, suspends: 0, snapshotsCreated: 0, snapshotsRemoved: 0, logEntries: 0,
    unflushedKept: 0, unflushedDropped: 0, reorderedSectors: 0, earlierDurable: 0,
  };

  constructor(private readonly opts: CrashRunOptions) {
    this.rng = new Rng(opts.seed);
    const jitterRng = this.rng.fork();
    const probability = opts.jitter ?? 0.3;
    this.jitter = probability > 0 ? { probability, int: (n) => jitterRng.int(n), chance: (p) => jitterRng.chance(p) } : null;
    this.N = opts.originSectors ?? 2048;
    this.maxSnapshots = opts.maxSnapshots ?? 3;
    this.snapshotTarget = opts.snapshotTarget ?? "snapshot";
    this.progress = opts.progress ?? (() => {});
    this.dm = createDeviceMapper({ backing: this.backing, logger: this.logger, targets: opts.targets ?? [] });
    this.origin = new DeviceHistory("origin", this.N);
  }

  async run(): Promise<CrashRunReport> {
    const started = performance.now();
    this.progress(`crash runner: seed ${this.opts.seed}, ${this.opts.ops} operations, origin ${this.N} sectors`);
    await this.decideMerges();
    await this.setUp();
    for (let i = 0; i < this.opts.ops; i++) await this.step(i);
    this.endOfWorkload = this.clock.tick();
    await this.tearDown();
    for (const rec of this.logger.records) {
      if (rec.level === "error") this.workloadProblem(`engine error during the workload: ${rec.msg} ${JSON.stringify(rec.fields ?? {})}`);
    }
    for (const h of [this.origin, ...this.snapshots.map((s) => s.history)]) {
      h.finalize();
      const overlap = h.overlapping();
      if (overlap) this.workloadProblem(`runner bug, the model cannot order these writes: ${overlap}`);
    }
    await this.readLogs();
    const workloadDone = performance.now();
    this.progress(
      `workload done: ${this.stats.writes} writes, ${this.stats.flushes} flushes, ${this.stats.snapshotsCreated} snapshots, ` +
        `${this.stats.logEntries} log entries (${Math.round(workloadDone - started)} ms)`,
    );
    const result = await this.checkAll();
    for (const d of this.dataDevs) this.stats.reorderedSectors += d.reordered.size;
    const finished = performance.now();
    const failures = result.failedPoints + this.workloadProblems.length;
    return {
      seed: this.opts.seed,
      ops: this.opts.ops,
      pointsChecked: result.points,
      flushPoints: result.flushPoints,
      randomPoints: result.randomPoints,
      failures,
      failedPoints: result.failedPoints,
      failureDetails: result.details,
      workloadProblems: this.workloadProblems.slice(0, 50),
      crossChecks: result.crossChecks,
      merges: { enabled: this.mergesEnabled, note: this.mergeNote, done: this.mergesDone },
      stats: this.stats,
      elapsedMs: {
        workload: Math.round(workloadDone - started),
        check: Math.round(finished - workloadDone),
        total: Math.round(finished - started),
      },
    };
  }

  private workloadProblem(text: string): void {
    this.workloadProblems.push(text);
  }

  // ---- set-up and teardown ----

  private async decideMerges(): Promise<void> {
    if (this.opts.merges === false) {
      this.mergeNote = "merges off";
      return;
    }
    if (!this.dm.targets().some((t) => t.name === "snapshot-merge")) {
      this.mergeNote = "snapshot-merge is not registered: no merges";
      if (this.opts.merges === true) throw new Error("merges requested, but snapshot-merge is not registered");
      return;
    }
    const failure = await mergeSelfTest();
    if (failure) {
      this.mergeNote = `snapshot-merge does not work (${failure}): no merges`;
      if (this.opts.merges === true) throw new Error(`merges requested, but ${this.mergeNote}`);
      return;
    }
    this.mergesEnabled = true;
    this.mergeNote = "on";
  }

  private addDataDev(key: string, sectors: number, initial: Buffer | null, snapshot: SnapshotModel | null): DataDev {
    const mem = new MemoryDevice(sectors, { tableName: `${key}-data`, displayName: `${key}-data` });
    if (initial) mem.submit(markedWrite(0, initial));
    const rec = new RecordingDevice(mem, this.clock, this.jitter);
    const log = new MemoryDevice(LOG_SECTORS, { tableName: `${key}-log`, displayName: `${key}-log` });
    this.backing.add(`${key}-data`, rec);
    this.backing.add(`${key}-log`, log);
    const acc = new MemoryDevice(sectors, { tableName: `${key}-replay`, displayName: `${key}-replay` });
    if (initial) acc.submit(markedWrite(0, initial));
    const dev: DataDev = {
      key, lw: `lw-${key}`, sectors, rec, log, initial, snapshot, entries: [], acc,
      byDurable: [], applied: 0, byCompletion: [], completed: 0, pending: new Set(),
      stamps: new Float64Array(sectors), reordered: new Set(), marks: [],
    };
    this.dataDevs.push(dev);
    return dev;
  }

  private async setUp(): Promise<void> {
    const initial = Buffer.allocUnsafe(this.N * SECTOR_SIZE);
    for (let s = 0; s < this.N; s++) stampSector(initial, s * SECTOR_SIZE, 0, s);
    const dev = this.addDataDev("origin", this.N, initial, null);
    await this.dm.create(dev.lw, { table: `0 ${this.N} log-writes ${dev.key}-data ${dev.key}-log` });
    await this.dm.create("origin", { table: `0 ${this.N} snapshot-origin /dev/mapper/${dev.lw}` });
  }

  private async tearDown(): Promise<void> {
    for (const s of this.liveSnapshots()) await this.dm.remove(s.name);
    await this.dm.remove("origin");
    for (const d of this.dataDevs) await this.dm.remove(d.lw);
  }

  private liveSnapshots(): SnapshotModel[] {
    return this.snapshots.filter((s) => s.removedAt === Infinity);
  }

  // ---- the workload ----

  private async step(i: number): Promise<void> {
    const live = this.liveSnapshots();
    const at = this.clock.tick();
    const kind =
      i === 0 && this.maxSnapshots > 0
        ? "create"
        : this.rng.weighted<string>([
            ["io", 70],
            ["flush", 8],
            ["suspend", 6],
            ["create", live.length < this.maxSnapshots ? (live.length === 0 ? 30 : 6) : 0],
            ["remove", live.length > 0 ? 3 : 0],
            ["merge", this.mergesEnabled && live.length > 0 ? 3 : 0],
          ]);
    let desc: string = kind;
    switch (kind) {
      case "io":
        desc = await this.ioBatch(this.rng.range(1, 6));
        break;
      case "flush": {
        const dev = this.rng.chance(0.6) || live.length === 0 ? "origin" : this.rng.pick(live).name;
        desc = `flush ${dev}`;
        await this.flush(dev);
        break;
      }
      case "suspend":
        desc = await this.suspendWithIo();
        break;
      case "create":
        desc = await this.createSnapshot();
        break;
      case "remove":
        desc = await this.removeSnapshot(this.rng.pick(live));
        break;
      case "merge":
        desc = await this.mergeSnapshot(this.rng.pick(live));
        break;
    }
    this.ops.push({ index: i, at, desc });
    await this.mark(`op${i}`);
  }

  private async mark(name: string): Promise<void> {
    const at = this.clock.tick();
    this.markStamps.set(name, at);
    // Sent without awaiting in between: target.message runs synchronously inside dm.message.
    const devs = this.dataDevs.filter((d) => this.dm.has(d.lw));
    for (const d of devs) d.marks.push({ name, at });
    await Promise.all(devs.map((d) => this.dm.message(d.lw, 0, `mark ${name}`)));
  }

  private historyOf(dev: string): DeviceHistory {
    if (dev === "origin") return this.origin;
    const s = this.snapshots.find((x) => x.name === dev);
    if (!s) throw new Error(`no device ${dev}`);
    return s.history;
  }

  /** What a live read of `dev` must return at `sector` now. */
  private expected(dev: string, sector: number): number {
    if (dev === "origin") {
      const id = this.origin.current[sector]!;
      return id >= 0 ? id : 0;
    }
    const s = this.snapshots.find((x) => x.name === dev)!;
    const id = s.history.current[sector]!;
    return id >= 0 ? id : s.pointInTime[sector]!;
  }

  private write(dev: string, sector: number, sectors: number, fua: boolean): Promise<void> {
    const hist = this.historyOf(dev);
    const id = this.nextId++;
    const w: TopWrite = { id, device: dev, sector, sectors, fua, submit: 0, ack: Infinity, failed: false, durableAt: Infinity };
    hist.addWrite(w);
    this.stats.writes++;
    const data = writeData(id, sector, sectors);
    return new Promise<void>((resolve) => {
      const bio = new Bio("write", sector, sectors, data, fua ? BioFlags.FUA : 0, {
        bioDone: (b) => {
          w.ack = this.clock.tick();
          if (b.status !== "ok") {
            w.failed = true;
            this.workloadProblem(`write #${id} to ${dev} sectors ${sector}+${sectors} failed: ${b.status}`);
          } else {
            hist.acked(w);
          }
          resolve();
        },
      });
      w.submit = this.clock.tick();
      bio.submitTo(this.dm.device(dev));
    });
  }

  private read(dev: string, sector: number, sectors: number): Promise<void> {
    return this.readExpecting(dev, sector, sectors, (x) => this.expected(dev, x));
  }

  private readExpecting(dev: string, sector: number, sectors: number, expected: (sector: number) => number): Promise<void> {
    this.stats.reads++;
    const buf = Buffer.alloc(sectors * SECTOR_SIZE);
    return new Promise<void>((resolve) => {
      const bio = new Bio("read", sector, sectors, buf, 0, {
        bioDone: (b) => {
          if (b.status !== "ok") {
            this.workloadProblem(`read of ${dev} sectors ${sector}+${sectors} failed: ${b.status}`);
          } else {
            let bad = 0;
            for (let i = 0; i < sectors; i++) {
              const got = decodeSector(buf, i * SECTOR_SIZE, sector + i);
              const want = expected(sector + i);
              if (got !== want && bad++ < 2) {
                this.workloadProblem(`live read of ${dev} sector ${sector + i}: ${describeValue(got)}, expected ${describeValue(want)}`);
              }
            }
          }
          resolve();
        },
      });
      bio.submitTo(this.dm.device(dev));
    });
  }

  private flush(dev: string): Promise<void> {
    const hist = this.historyOf(dev);
    const f: TopFlush = { device: dev, submit: 0, ack: Infinity, failed: false };
    hist.flushes.push(f);
    this.stats.flushes++;
    return new Promise<void>((resolve) => {
      const bio = new Bio("flush", 0, 0, null, BioFlags.PREFLUSH, {
        bioDone: (b) => {
          f.ack = this.clock.tick();
          if (b.status !== "ok") {
            f.failed = true;
            this.workloadProblem(`flush of ${dev} failed: ${b.status}`);
          }
          resolve();
        },
      });
      f.submit = this.clock.tick();
      bio.submitTo(this.dm.device(dev));
    });
  }

  /** A range on `dev` that overlaps nothing in `busy` (same device), or null. */
  private pickRange(dev: string, busy: Map<string, [number, number][]>, maxLen: number): [number, number] | null {
    const live = this.liveSnapshots();
    for (let attempt = 0; attempt < 6; attempt++) {
      let start: number;
      let len: number;
      const snap = live.length > 0 ? this.rng.pick(live) : null;
      if (snap && this.rng.chance(0.25)) {
        // Whole chunks of some snapshot (a snapshot write of a whole chunk skips the copy).
        const cs = snap.chunkSize;
        const chunks = this.rng.range(1, 2);
        start = this.rng.int(Math.floor(this.N / cs) - chunks + 1) * cs;
        len = chunks * cs;
      } else {
        len = Math.min(maxLen, this.rng.pick([1, 1, 2, 3, 4, 5, 7, 8, 8, 12, 16, 24]));
        // Half of the I/O goes to a hot quarter, so chunks are hit again and again.
        const span = this.rng.chance(0.5) ? Math.floor(this.N / 4) : this.N;
        start = this.rng.int(span - len + 1);
      }
      const ranges = busy.get(dev) ?? [];
      if (ranges.some(([a, b]) => start < b && a < start + len)) continue;
      ranges.push([start, start + len]);
      busy.set(dev, ranges);
      return [start, len];
    }
    return null;
  }

  /** Start `n` concurrent I/Os (no two of one device overlapping); returns their description and completion. */
  private startIo(n: number, busy = new Map<string, [number, number][]>()): { desc: string[]; done: Promise<void>[] } {
    const live = this.liveSnapshots();
    const desc: string[] = [];
    const done: Promise<void>[] = [];
    for (let k = 0; k < n; k++) {
      const what = this.rng.weighted<string>([
        ["origin-write", 40],
        ["snap-write", live.length ? 20 : 0],
        ["snap-read", live.length ? 15 : 0],
        ["origin-read", 8],
        ["flush", 12],
      ]);
      const dev = what.startsWith("origin") || live.length === 0 ? "origin" : this.rng.pick(live).name;
      if (what === "flush") {
        const target = this.rng.chance(0.5) ? "origin" : dev;
        desc.push(`flush ${target}`);
        done.push(this.flush(target));
        continue;
      }
      const isWrite = what.endsWith("write");
      const range = this.pickRange(dev, busy, isWrite ? 24 : 32);
      if (!range) continue;
      const [sector, sectors] = range;
      if (isWrite) {
        const fua = this.rng.chance(0.25);
        desc.push(`write ${dev} ${sector}+${sectors}${fua ? " FUA" : ""}`);
        done.push(this.write(dev, sector, sectors, fua));
      } else {
        desc.push(`read ${dev} ${sector}+${sectors}`);
        done.push(this.read(dev, sector, sectors));
      }
    }
    return { desc, done };
  }

  private async ioBatch(n: number): Promise<string> {
    const { desc, done } = this.startIo(n);
    await Promise.all(done);
    return desc.join(", ");
  }

  private async suspendWithIo(): Promise<string> {
    const live = this.liveSnapshots();
    const dev = live.length > 0 && this.rng.chance(0.4) ? this.rng.pick(live).name : "origin";
    this.stats.suspends++;
    const busy = new Map<string, [number, number][]>();
    const first = this.startIo(this.rng.range(1, 4), busy);
    const suspended = this.dm.suspend(dev);
    // Some I/O arrives while the device is suspending or suspended: it waits for the resume.
    const second = this.startIo(this.rng.range(0, 3), busy);
    await suspended;
    await this.dm.resume(dev);
    await Promise.all([...first.done, ...second.done]);
    return `suspend ${dev} with ${[...first.desc, ...second.desc].join(", ") || "no I/O"}`;
  }

  private async createSnapshot(): Promise<string> {
    const index = this.snapshots.length;
    const cs = this.rng.pick(CHUNK_SIZES);
    const cowSectors = cowSectorsFor(cs, this.N);
    const name = `snap${index}`;
    const model: SnapshotModel = {
      index, name, chunkSize: cs, cowSectors, createdAt: 0, removedAt: Infinity,
      pointInTime: new Int32Array(this.N), history: new DeviceHistory(name, this.N),
      mergeStartedAt: Infinity, mergeDoneAt: Infinity, recordedAtMerge: null,
    };
    const dev = this.addDataDev(`cow${index}`, cowSectors, null, model);
    await this.dm.create(dev.lw, { table: `0 ${cowSectors} log-writes ${dev.key}-data ${dev.key}-log` });
    // Nothing is in flight between operations: the origin's content is its acknowledged writes.
    for (let s = 0; s < this.N; s++) model.pointInTime[s] = this.expected("origin", s);
    model.createdAt = this.clock.tick();
    this.snapshots.push(model);
    await this.dm.suspend("origin");
    try {
      await this.dm.create(name, {
        table: `0 ${this.N} ${this.snapshotTarget} /dev/mapper/lw-origin /dev/mapper/${dev.lw} P ${cs}`,
      });
    } finally {
      await this.dm.resume("origin");
    }
    this.stats.snapshotsCreated++;
    return `create ${name} (chunk size ${cs})`;
  }

  private async removeSnapshot(s: SnapshotModel): Promise<string> {
    s.removedAt = this.clock.tick();
    await this.dm.remove(s.name);
    this.stats.snapshotsRemoved++;
    return `remove ${s.name}`;
  }

  /**
   * lvconvert --merge: the origin's device gets a snapshot-merge table that takes over the
   * snapshot's store (the snapshot device is suspended first), reads as the snapshot at once and
   * copies its chunks back; once the merge has finished the origin goes back to snapshot-origin
   * and the snapshot device is removed. In the model, every sector of a chunk the snapshot had
   * recorded gets a "merged" write carrying the snapshot's content there, durable once the merge
   * has finished; a crash before that reactivates the merge (see checkPoint).
   */
  private async mergeSnapshot(s: SnapshotModel): Promise<string> {
    const cow = this.dataDevs.find((d) => d.snapshot === s)!;
    // Nothing is in flight: what the COW device holds is what the store has committed.
    const img = await readCowImage(cow.rec.inner);
    s.recordedAtMerge = new Set(img.records.map((r) => r.oldChunk));
    s.mergeStartedAt = this.clock.tick();
    s.removedAt = s.mergeStartedAt;
    // From now on the origin device reads as the snapshot.
    const merged: TopWrite[] = [];
    for (const chunk of s.recordedAtMerge) {
      for (let sector = chunk * s.chunkSize; sector < Math.min(this.N, (chunk + 1) * s.chunkSize); sector++) {
        const w: TopWrite = {
          id: this.expected(s.name, sector), device: "origin", sector, sectors: 1, fua: false,
          submit: s.mergeStartedAt, ack: s.mergeStartedAt, failed: false, durableAt: Infinity, merged: true,
        };
        this.origin.addWrite(w);
        merged.push(w);
      }
    }
    for (const w of merged) this.origin.acked(w);
    await this.dm.load("origin", `0 ${this.N} ${this.opts.mergeTarget ?? "snapshot-merge"} /dev/mapper/lw-origin /dev/mapper/${cow.lw} P ${s.chunkSize}`);
    await this.dm.suspend(s.name);
    await this.dm.resume("origin");
    // I/O while it merges: writes to merged, merging and not yet merged chunks (R10), flushes.
    const during: string[] = [];
    for (let k = this.rng.range(0, 4); k > 0; k--) during.push(await this.ioBatch(this.rng.range(1, 5)));
    const failure = await waitForMerge(this.dm, "origin", 30_000);
    if (failure) this.workloadProblem(`merge of ${s.name}: ${failure}`);
    s.mergeDoneAt = this.clock.tick();
    for (const w of merged) w.durableAt = s.mergeDoneAt;
    await this.readExpecting("origin", 0, this.N, (x) => this.expected("origin", x));
    await this.dm.load("origin", `0 ${this.N} snapshot-origin /dev/mapper/lw-origin`);
    await this.dm.resume("origin");
    await this.dm.remove(s.name);
    this.mergesDone++;
    return `merge ${s.name} (${s.recordedAtMerge.size} chunks)${during.length ? `, meanwhile ${during.join("; ")}` : ""}`;
  }

  // ---- the logs ----

  private async readLogs(): Promise<void> {
    for (const dev of this.dataDevs) {
      const reader = await LogReader.open(deviceLogSource(dev.log));
      const entries: LogEntry[] = [];
      for await (const e of reader.entries({ data: true })) entries.push(e);
      dev.entries = this.mapEntries(dev, entries);
      dev.byDurable = [...dev.entries].sort((a, b) => a.d - b.d);
      // Sectors where the log has an older write after a newer one (see applyEntry).
      const newest = new Float64Array(dev.sectors);
      for (const m of dev.entries) {
        if (m.kind !== "plain" && m.kind !== "fua") continue;
        for (let x = m.entry.sector; x < m.entry.sector + m.entry.nrSectors; x++) {
          if (m.c < newest[x]!) dev.reordered.add(x);
          else newest[x] = m.c;
        }
      }
      dev.byCompletion = dev.entries.filter((m) => m.kind === "plain").sort((a, b) => a.c - b.c);
      this.stats.logEntries += entries.length;
    }
  }

  /**
   * Give every log entry its stamps, by replaying what log-writes does with the recorded
   * completions: a flush takes the plain writes completed so far when it is mapped (= submitted
   * to the data device) and logs them, then itself, when it completes; a FUA write is logged when
   * it completes, a mark when it is sent; at teardown the writes still unflushed and the end mark.
   * The log must be exactly that sequence.
   */
  private mapEntries(dev: DataDev, entries: LogEntry[]): MappedEntry[] {
    type Event = { at: number; run: () => void };
    const events: Event[] = [];
    const expected: { kind: EntryKind; c: number; d: number; sector: number; sectors: number; mark?: string }[] = [];
    let unflushed: Completion[] = [];
    const batches = new Map<Completion, Completion[]>();
    for (const c of dev.rec.completions) {
      if (c.kind === "flush") {
        events.push({ at: c.submitted, run: () => (batches.set(c, unflushed), (unflushed = [])) });
        events.push({
          at: c.at,
          run: () => {
            for (const w of batches.get(c)!) expected.push({ kind: "plain", c: w.at, d: c.at, sector: w.sector, sectors: w.sectors });
            expected.push({ kind: "flush", c: c.at, d: c.at, sector: 0, sectors: 0 });
          },
        });
      } else if (c.kind === "fua") {
        events.push({ at: c.at, run: () => expected.push({ kind: "fua", c: c.at, d: c.at, sector: c.sector, sectors: c.sectors }) });
      } else {
        events.push({ at: c.at, run: () => unflushed.push(c) });
      }
    }
    for (const m of dev.marks) {
      events.push({ at: m.at, run: () => expected.push({ kind: "mark", c: m.at, d: m.at, sector: 0, sectors: 0, mark: m.name }) });
    }
    events.sort((a, b) => a.at - b.at);
    for (const e of events) e.run();
    for (const w of unflushed) expected.push({ kind: "plain", c: w.at, d: Infinity, sector: w.sector, sectors: w.sectors });
    expected.push({ kind: "mark", c: Infinity, d: Infinity, sector: 0, sectors: 0, mark: END_MARK });

    const kindOf = (e: LogEntry): EntryKind =>
      e.flags & LOG_MARK_FLAG ? "mark" : e.flags & LOG_FLUSH_FLAG ? "flush" : e.flags & LOG_FUA_FLAG ? "fua" : "plain";
    if (entries.length !== expected.length) {
      throw new Error(`${dev.key}: the log has ${entries.length} entries, the recorded I/O makes ${expected.length}`);
    }
    const out: MappedEntry[] = entries.map((e, i) => {
      const x = expected[i]!;
      const kind = kindOf(e);
      const same =
        kind === x.kind &&
        (kind === "mark" ? markName(e) === x.mark : kind === "flush" || (e.sector === x.sector && e.nrSectors === x.sectors));
      if (!same) {
        throw new Error(
          `${dev.key}: log entry ${i} is ${kind} ${kind === "mark" ? markName(e) : `${e.sector}+${e.nrSectors}`}, ` +
            `the recorded I/O makes it ${x.kind} ${x.kind === "mark" ? x.mark : `${x.sector}+${x.sectors}`}`,
        );
      }
      return { entry: e, kind, c: x.c, d: x.d, applied: false };
    });
    // log-writes gives a plain write to the first flush mapped after it completed, but any flush
    // submitted after that makes it durable: with flushes completing out of order, a later one
    // can finish first, and replaying the log up to it would miss writes it covered.
    const flushes = dev.rec.completions.filter((c) => c.kind === "flush").sort((a, b) => a.submitted - b.submitted);
    const firstDone = new Array<number>(flushes.length + 1).fill(Infinity);
    for (let i = flushes.length - 1; i >= 0; i--) firstDone[i] = Math.min(firstDone[i + 1]!, flushes[i]!.at);
    for (const m of out) {
      if (m.kind !== "plain") continue;
      let lo = 0;
      let hi = flushes.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (flushes[mid]!.submitted > m.c) hi = mid;
        else lo = mid + 1;
      }
      const d = firstDone[lo]!;
      if (d < m.d) this.stats.earlierDurable++;
      m.d = d;
    }
    return out;
  }

  // ---- crash points ----

  private schedule(): CrashPoint[] {
    const points: CrashPoint[] = [];
    const plainStamps: number[] = [];
    for (const dev of this.dataDevs) {
      for (const m of dev.entries) {
        if (m.d > this.endOfWorkload) continue;
        if (m.kind === "flush" || m.kind === "fua") {
          points.push({ t: m.d, kind: m.kind, source: `${dev.key} entry ${m.entry.index}`, keep: 0, seed: 0 });
        }
      }
      for (const m of dev.entries) if (m.kind === "plain" && m.c <= this.endOfWorkload) plainStamps.push(m.c);
    }
    const pointRng = this.rng.fork();
    let randomCount = plainStamps.length === 0 ? 0 : (this.opts.randomPoints ?? Math.round(this.opts.ops / 2));
    if (plainStamps.length > 0) randomCount = Math.max(randomCount, (this.opts.minPoints ?? 0) - points.length);
    for (let i = 0; i < randomCount; i++) {
      const t = pointRng.pick(plainStamps);
      const keep = pointRng.weighted<number>([[0.5, 3], [1, 1], [0.2, 1]]);
      points.push({ t, kind: "random", source: `random, keeping ${Math.round(keep * 100)}% of the unflushed writes`, keep, seed: pointRng.u32() });
    }
    const every = this.opts.crossCheckEvery ?? 50;
    if (every > 0) {
      for (const op of this.ops) {
        if (op.index % every === every - 1 || op.index === this.ops.length - 1) {
          points.push({ t: this.markStamps.get(`op${op.index}`)!, kind: "cross-check", source: `op${op.index}`, keep: 0, seed: 0 });
        }
      }
    }
    return points.sort((a, b) => a.t - b.t);
  }

  private async checkAll(): Promise<{
    points: number; flushPoints: number; randomPoints: number; failedPoints: number; details: CrashFailure[]; crossChecks: number;
  }> {
    const replay = createDeviceMapper({ backing: this.backing, logger: new MemoryLogger(false) });
    const points = this.schedule();
    let checked = 0;
    let flushPoints = 0;
    let randomPoints = 0;
    let failedPoints = 0;
    let crossChecks = 0;
    const details: CrashFailure[] = [];
    const maxReported = this.opts.maxReported ?? 10;
    for (const p of points) {
      for (const dev of this.dataDevs) await this.advance(dev, p.t);
      let problems: string[];
      if (p.kind === "cross-check") {
        problems = await this.crossCheck(p);
        crossChecks++;
      } else {
        problems = await this.checkPoint(replay, p, checked);
        checked++;
        if (p.kind === "random") randomPoints++;
        else flushPoints++;
      }
      if (problems.length > 0) {
        failedPoints++;
        if (details.length < maxReported) details.push({ point: this.describePoint(p, checked), problems });
      }
      if (checked % 500 === 0 && p.kind !== "cross-check") this.progress(`  ${checked}/${points.length} crash points checked`);
    }
    await replay.close();
    return { points: checked, flushPoints, randomPoints, failedPoints, details, crossChecks };
  }

  private describePoint(p: CrashPoint, n: number): string {
    let op: OpRecord | undefined;
    for (const o of this.ops) if (o.at <= p.t) op = o;
    const during = op ? `during op ${op.index} (${op.desc})` : "before the first operation";
    const cuts = this.dataDevs
      .filter((d) => this.devAlive(d, p.t))
      .map((d) => `${d.key} ${d.applied}/${d.entries.length} durable + ${d.pending.size} unflushed`)
      .join(", ");
    return `crash point ${n} (${p.kind}: ${p.source}; t=${p.t}, ${during}; log entries: ${cuts}; seed ${this.opts.seed})`;
  }

  /** Move the incremental replay to moment t: every entry durable by then applied. */
  private async advance(dev: DataDev, t: number): Promise<void> {
    while (dev.completed < dev.byCompletion.length && dev.byCompletion[dev.completed]!.c <= t) {
      dev.pending.add(dev.byCompletion[dev.completed++]!);
    }
    while (dev.applied < dev.byDurable.length && dev.byDurable[dev.applied]!.d <= t) {
      const m = dev.byDurable[dev.applied++]!;
      await applyEntry(dev.acc, m, (s) => dev.stamps[s]!, (s) => (dev.stamps[s] = m.c));
      m.applied = true;
      dev.pending.delete(m);
    }
  }

  private devAlive(dev: DataDev, t: number): boolean {
    const s = dev.snapshot;
    return s === null || (s.createdAt <= t && t < s.removedAt) || (s.mergeStartedAt <= t && t < s.mergeDoneAt);
  }

  /** A fresh device holding `dev`'s state at the point: what was durable, plus the unflushed writes kept. */
  private async crashImage(dev: DataDev, p: CrashPoint, name: string, rng: Rng | null): Promise<OverlayDevice> {
    const ov = new OverlayDevice(dev.acc, name);
    if (rng) {
      const stamps = new Map<number, number>();
      for (const m of dev.pending) {
        if (rng.chance(p.keep)) {
          await applyEntry(ov, m, (s) => stamps.get(s) ?? dev.stamps[s]!, (s) => stamps.set(s, m.c));
          this.stats.unflushedKept++;
        } else {
          this.stats.unflushedDropped++;
        }
      }
    }
    return ov;
  }

  /**
   * At a mark nothing is in flight, so what was durable then is exactly the log up to the mark:
   * replayLog(--end-mark) onto a fresh device must stop there and give what the incremental
   * replay has.
   */
  private async crossCheck(p: CrashPoint): Promise<string[]> {
    const problems: string[] = [];
    for (const dev of this.dataDevs) {
      if (!dev.entries.some((m) => m.kind === "mark" && markName(m.entry) === p.source)) continue;
      const fresh = new MemoryDevice(dev.sectors);
      if (dev.initial) fresh.submit(markedWrite(0, dev.initial));
      const result = await replayLog(dev.log, fresh, { endMark: p.source });
      if (result.stoppedBy !== "condition") problems.push(`${dev.key}: replayLog did not find mark ${p.source}`);
      const prefix = dev.entries.slice(0, result.lastEntry + 1);
      if (dev.applied !== prefix.length || prefix.some((m) => !m.applied)) {
        problems.push(`${dev.key}: mark ${p.source} is log entry ${result.lastEntry}, but the clock makes ${dev.applied} other entries durable then`);
      }
      // They differ only where the log's order is not the device's (see applyEntry).
      const a = await readAll(fresh, dev.sectors);
      const b = await readAll(dev.acc, dev.sectors);
      for (let s = 0; s < dev.sectors; s++) {
        const x = a.subarray(s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE);
        if (!dev.reordered.has(s) && !x.equals(b.subarray(s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE))) {
          problems.push(`${dev.key}: replayLog to mark ${p.source} differs from the incremental replay at sector ${s}`);
          break;
        }
      }
    }
    return problems;
  }

  private async checkPoint(replay: DeviceMapper, p: CrashPoint, n: number): Promise<string[]> {
    const problems = new Problems();
    const t = p.t;
    const prefix = `c${n}`;
    const rng = p.kind === "random" ? new Rng(p.seed) : null;
    const originDev = this.dataDevs[0]!;
    const originImage = await this.crashImage(originDev, p, `${prefix}-o`, rng);
    this.backing.add(`${prefix}-o`, originImage);
    const alive: Activated[] = [];
    let merging: Activated | null = null;
    for (const dev of this.dataDevs.slice(1)) {
      if (!this.devAlive(dev, t)) continue;
      const s = dev.snapshot!;
      const cow = await this.crashImage(dev, p, `${prefix}-k${s.index}`, rng);
      this.backing.add(`${prefix}-k${s.index}`, cow);
      const img = await readCowImage(cow);
      for (const q of img.problems) problems.add(`${s.name} image`, `${s.name}: COW image: ${q}`);
      for (const q of leakProblems(img)) problems.add(`${s.name} leak`, `${s.name}: ${q}`);
      const a: Activated = { s, name: `${prefix}-s${s.index}`, cow, img };
      if (s.mergeStartedAt <= t) merging = a;
      else alive.push(a);
    }
    const created: string[] = [];
    try {
      await this.activate(replay, prefix, alive, merging, created, problems);
      if (problems.empty && merging) {
        // LVM reactivates an interrupted merge: it must run to the end from what is on disk.
        const failure = await waitForMerge(replay, `${prefix}-origin`, 10_000);
        if (failure) problems.add("merge", `${merging.s.name}: merge after reactivation: ${failure}`);
        const after = await readCowImage(merging.cow);
        if (after.records.length > 0) problems.add("merge", `${merging.s.name}: ${after.records.length} records left after the merge`);
      }
      if (problems.empty) {
        const originData = await readAll(replay.device(`${prefix}-origin`), this.N);
        this.checkOrigin(originData, t, problems, merging?.s ?? null);
        const snapData = new Map<string, Buffer>();
        for (const a of alive) {
          const data = await readAll(replay.device(a.name), this.N);
          snapData.set(a.name, data);
          this.checkSnapshot(a.s, a.img, data, t, problems);
        }
        if (problems.empty && !merging && p.kind === "random" && (this.opts.postRecovery ?? true)) {
          await this.postRecovery(replay, prefix, alive, created, originData, snapData, rng!, problems);
        }
      }
    } finally {
      for (const name of created.reverse()) await replay.remove(name).catch(() => undefined);
      this.backing.delete(`${prefix}-o`);
      for (const a of [...alive, ...(merging ? [merging] : [])]) this.backing.delete(`${prefix}-k${a.s.index}`);
    }
    return problems.list;
  }

  /**
   * The origin device over the crash image (snapshot-origin, or snapshot-merge reading the
   * merging snapshot's metadata), then every snapshot (reloading its store), then the origin's
   * resume (which starts the merge, once the other snapshots are there to preserve their chunks).
   */
  private async activate(
    replay: DeviceMapper,
    prefix: string,
    alive: { s: SnapshotModel; name: string; img: CowImage | null }[],
    merging: Activated | null,
    created: string[],
    problems: Problems,
  ): Promise<void> {
    const originName = `${prefix}-origin`;
    await replay.create(originName);
    created.push(originName);
    const originTable = merging
      ? `0 ${this.N} snapshot-merge ${prefix}-o ${prefix}-k${merging.s.index} P 0`
      : `0 ${this.N} snapshot-origin ${prefix}-o`;
    try {
      await replay.load(originName, originTable);
    } catch (err) {
      problems.add("load", `${merging ? `${merging.s.name} (merging)` : "origin"}: ${(err as Error).message}`);
      return;
    }
    for (const a of alive) {
      try {
        await replay.create(a.name, { table: `0 ${this.N} snapshot ${prefix}-o ${prefix}-k${a.s.index} P 0` });
        created.push(a.name);
      } catch (err) {
        problems.add(`${a.s.name} load`, `${a.s.name}: exceptions do not load: ${(err as Error).message}`);
        continue;
      }
      // Before the origin resumes: a merge would make the snapshot copy chunks.
      const status = replay.status(a.name)[0]?.params ?? "";
      if (a.img === null) {
        if (!/^\d+\/\d+ \d+$/.test(status)) problems.add(`${a.s.name} status`, `${a.s.name}: status "${status}"`);
      } else if (a.img.state === "valid") {
        const u = a.img.usage;
        const want = `${u.allocated}/${u.total} ${u.metadata}`;
        if (status !== want) problems.add(`${a.s.name} status`, `${a.s.name}: status after reload is "${status}", the image implies "${want}"`);
      } else if (a.img.state !== "new" || /^[A-Z]/.test(status)) {
        problems.add(`${a.s.name} status`, `${a.s.name}: COW image ${a.img.state}, status "${status}"`);
      }
    }
    try {
      await replay.resume(originName);
    } catch (err) {
      problems.add("load", `resume of the origin: ${(err as Error).message}`);
    }
  }

  private checkOrigin(data: Buffer, t: number, problems: Problems, merging: SnapshotModel | null): void {
    for (let s = 0; s < this.N; s++) {
      const v = decodeSector(data, s * SECTOR_SIZE, s);
      if (merging?.recordedAtMerge!.has(Math.floor(s / merging.chunkSize))) {
        // Merged from the snapshot: what the snapshot held (its own writes, or its point in time),
        // unless a write to the origin device made during the merge is there or durable.
        // (The merged writes themselves were submitted at mergeStartedAt.)
        const during = this.origin.allowedAt(s, t, { after: merging.mergeStartedAt });
        const own = merging.history.allowedAt(s, t);
        const ok =
          during.ids.includes(v) ||
          (during.base && (own.ids.includes(v) || (own.base && v === merging.pointInTime[s])));
        if (!ok) {
          problems.add(
            "origin",
            `origin sector ${s} holds ${describeValue(v)} after the merge of ${merging.name}; allowed: ` +
              (during.base
                ? `${own.base ? `${describeValue(merging.pointInTime[s]!)} (its point in time), ` : ""}${describeAllowed(own.ids, false, own.durable)}` +
                  (during.ids.length ? `, writes during the merge ${describeAllowed(during.ids, false, null)}` : "")
                : `writes during the merge ${describeAllowed(during.ids, false, during.durable)}`),
          );
        }
        continue;
      }
      const allowed = this.origin.allowedAt(s, t);
      if ((v === 0 && allowed.base) || (v >= 0 && allowed.ids.includes(v))) continue;
      problems.add("origin", `origin sector ${s} holds ${describeValue(v)}; allowed: ${describeAllowed(allowed.ids, allowed.base, allowed.durable)}`);
    }
  }

  private checkSnapshot(s: SnapshotModel, img: CowImage, data: Buffer, t: number, problems: Problems): void {
    const recorded = new Set(img.state === "valid" ? img.records.map((r) => r.oldChunk) : []);
    const cs = s.chunkSize;
    const ids = (list: number[]) => list.map((i) => `#${i}`).join(" ");
    for (let sector = 0; sector < this.N; sector++) {
      const v = decodeSector(data, sector * SECTOR_SIZE, sector);
      const own = s.history.allowedAt(sector, t);
      const pit = s.pointInTime[sector]!;
      const chunk = Math.floor(sector / cs);
      let why: (() => string) | null = null;
      if (!own.base) {
        if (!own.ids.includes(v)) why = () => `its own writes ${ids(own.ids)} (#${own.durable!.id} durable)`;
      } else if (recorded.has(chunk)) {
        if (v !== pit && !own.ids.includes(v)) {
          why = () => `chunk ${chunk} is recorded: ${describeValue(pit)} (point in time)${own.ids.length ? ` or its own writes ${ids(own.ids)}` : ""}`;
        }
      } else {
        const o = this.origin.allowedAt(sector, t, { before: s.createdAt });
        if (!((v === 0 && o.base) || (v >= 0 && o.ids.includes(v)))) {
          why = () => `chunk ${chunk} is not recorded: the origin's data from before the snapshot (${describeValue(pit)} or older, if not durable)`;
        }
      }
      if (why) problems.add(s.name, `${s.name} sector ${sector} holds ${describeValue(v)}; allowed: ${why()}`);
    }
  }

  /**
   * After recovery, the stack must go on working: origin writes must copy only chunks the
   * snapshots have not recorded (into chunks the reloaded stores allocate after next_free),
   * snapshot writes land in their own chunks, and a second reactivation shows the same data.
   */
  private async postRecovery(
    replay: DeviceMapper,
    prefix: string,
    alive: { s: SnapshotModel; name: string }[],
    created: string[],
    originData: Buffer,
    snapData: Map<string, Buffer>,
    rng: Rng,
    problems: Problems,
  ): Promise<void> {
    const expectOrigin = Buffer.from(originData);
    const expectSnap = new Map([...snapData].map(([k, v]) => [k, Buffer.from(v)]));
    const writes = rng.range(2, 6);
    for (let i = 0; i < writes; i++) {
      const onSnap = alive.length > 0 && rng.chance(0.3) ? rng.pick(alive) : null;
      const len = rng.pick([1, 4, 8, 16, 32]);
      const sector = rng.int(this.N - len + 1);
      const data = writeData(this.nextRecoveryId++, sector, len);
      const name = onSnap ? onSnap.name : `${prefix}-origin`;
      try {
        await submitAndWait(replay.device(name), new Bio("write", sector, len, data, 0, null));
      } catch (err) {
        problems.add("post", `after recovery: write to ${name} ${sector}+${len} failed: ${(err as Error).message}`);
        return;
      }
      data.copy(onSnap ? expectSnap.get(onSnap.name)! : expectOrigin, sector * SECTOR_SIZE);
    }
    const verify = async (when: string) => {
      const o = await readAll(replay.device(`${prefix}-origin`), this.N);
      if (!o.equals(expectOrigin)) problems.add("post", `${when}: the origin differs from what was written (${firstDiff(o, expectOrigin)})`);
      for (const a of alive) {
        const got = await readAll(replay.device(a.name), this.N);
        if (!got.equals(expectSnap.get(a.name)!)) {
          problems.add("post", `${when}: ${a.s.name} changed (${firstDiff(got, expectSnap.get(a.name)!)})`);
        }
      }
    };
    await verify("after writes to the recovered devices");
    // Reactivate once more: what was committed after recovery must load as well.
    for (const name of [...created].reverse()) await replay.remove(name);
    created.length = 0;
    const again = new Problems();
    await this.activate(replay, prefix, alive.map((a) => ({ ...a, img: null })), null, created, again);
    for (const q of again.list) problems.add("post", `second reactivation: ${q}`);
    if (created.length === alive.length + 1) await verify("after a second reactivation");
  }
}

function describeAllowed(ids: number[], base: boolean, durable: TopWrite | null): string {
  const parts = ids.map((i) => `#${i}${durable && durable.id === i ? " (durable)" : ""}`);
  if (base) parts.unshift("its previous content (initial data)");
  return parts.join(", ") || "nothing";
}

function firstDiff(a: Buffer, b: Buffer): string {
  for (let s = 0; s < a.length / SECTOR_SIZE; s++) {
    const x = a.subarray(s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE);
    const y = b.subarray(s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE);
    if (!x.equals(y)) return `first at sector ${s}: ${describeValue(decodeSector(a, s * SECTOR_SIZE, s))} instead of ${describeValue(decodeSector(b, s * SECTOR_SIZE, s))}`;
  }
  return "no difference";
}

/** §4.10 (2): records in allocation order, next_free = last recorded + 1, nothing unrecorded below it. */
export function leakProblems(img: CowImage): string[] {
  if (img.state !== "valid") return img.state === "new" ? [] : [`COW image is ${img.state}`];
  const out: string[] = [];
  const epa = img.exceptionsPerArea;
  for (let i = 1; i < img.records.length; i++) {
    const a = img.records[i - 1]!;
    const b = img.records[i]!;
    if (b.newChunk <= a.newChunk) out.push(`records out of allocation order: area ${b.area} slot ${b.slot} has chunk ${b.newChunk} after ${a.newChunk}`);
  }
  const last = img.records.length > 0 ? img.records[img.records.length - 1]!.newChunk : 1;
  const expectedNext = skipMetadata(epa, last + 1);
  if (img.nextFree !== expectedNext) out.push(`next_free is ${img.nextFree}, the last recorded chunk + 1 is ${expectedNext}`);
  const used = new Set(img.records.map((r) => r.newChunk));
  for (let c = 2; c < img.nextFree; c++) {
    if (!isMetadataChunk(epa, c) && !used.has(c)) {
      out.push(`chunk ${c} lies below next_free (${img.nextFree}) but no record points at it (leaked)`);
      if (out.length > 6) break;
    }
  }
  return out;
}

/**
 * Apply a log entry the way the device would have ended up: sector by sector, only where no write
 * that completed later is already there. Entries are applied in the order they became durable,
 * and log-writes logs a FUA write as soon as it completes but a plain write only at the flush
 * that takes it, so a plain write followed (before any flush) by a FUA write to the same sector
 * comes *after* it in the log: a replay in log order would put the older data back.
 */
async function applyEntry(
  dev: BlockDevice,
  m: MappedEntry,
  stampOf: (sector: number) => number,
  setStamp: (sector: number) => void,
): Promise<void> {
  const e = m.entry;
  if (m.kind === "flush" || m.kind === "mark" || !e.data || e.nrSectors === 0) return;
  let runStart = -1;
  const write = async (end: number) => {
    if (runStart < 0) return;
    const data = e.data!.subarray((runStart - e.sector) * SECTOR_SIZE, (end - e.sector) * SECTOR_SIZE);
    await submitAndWait(dev, new Bio("write", runStart, end - runStart, data, 0, null));
    runStart = -1;
  };
  for (let s = e.sector; s < e.sector + e.nrSectors; s++) {
    if (m.c > stampOf(s)) {
      if (runStart < 0) runStart = s;
      setStamp(s);
    } else {
      await write(s);
    }
  }
  await write(e.sector + e.nrSectors);
}

/**
 * Wait until the snapshot-merge table of `name` has merged everything (its usage shows nothing
 * but metadata, as snapshot.rst says to check); returns why not, or null.
 */
export async function waitForMerge(dm: DeviceMapper, name: string, timeoutMs: number): Promise<string | null> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const eventNr = dm.info(name).eventNr;
    const status = dm.status(name)[0]?.params ?? "";
    const m = /^(\d+)\/\d+ (\d+)$/.exec(status);
    if (m && m[1] === m[2]) return null;
    if (!m) return `status "${status}"`;
    const left = deadline - performance.now();
    if (left <= 0) return `not finished after ${timeoutMs} ms (status "${status}")`;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      dm.waitEvent(name, eventNr),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, Math.min(left, 50)))),
    ]);
    clearTimeout(timer);
  }
}

/**
 * Merges are part of the workload only if snapshot-merge works at all: a snapshot with copied and
 * written chunks merged into a small origin must leave the origin equal to the snapshot.
 */
async function mergeSelfTest(): Promise<string | null> {
  const backing = new NamedDevices();
  const dm = createDeviceMapper({ backing, logger: new MemoryLogger(false) });
  try {
    const size = 256;
    const origin = backing.add("o", new MemoryDevice(size));
    backing.add("c", new MemoryDevice(cowSectorsFor(8, size)));
    origin.submit(markedWrite(0, writeData(1, 0, size)));
    await dm.create("base", { table: `0 ${size} snapshot-origin o` });
    await dm.suspend("base");
    await dm.create("snap", { table: `0 ${size} snapshot o c P 8` });
    await dm.resume("base");
    await submitAndWait(dm.device("base"), new Bio("write", 16, 40, writeData(2, 16, 40), 0, null));
    await submitAndWait(dm.device("snap"), new Bio("write", 100, 20, writeData(3, 100, 20), 0, null));
    const want = await readAll(dm.device("snap"), size);
    await dm.load("base", `0 ${size} snapshot-merge o c P 8`);
    await dm.suspend("snap");
    await dm.resume("base");
    const failure = await waitForMerge(dm, "base", 5000);
    if (failure) return failure;
    await dm.load("base", `0 ${size} snapshot-origin o`);
    await dm.resume("base");
    await dm.remove("snap");
    const got = await readAll(origin, size);
    return got.equals(want) ? null : `the merged origin differs from the snapshot (${firstDiff(got, want)})`;
  } catch (err) {
    return (err as Error).message;
  } finally {
    await dm.close().catch(() => undefined);
  }
}

/** A write bio for direct submission to a RAM disk (which completes it synchronously). */
function markedWrite(sector: number, data: Buffer): Bio {
  const bio = new Bio("write", sector, data.length / SECTOR_SIZE, data, 0, null);
  bio.markInFlight();
  return bio;
}

async function readAll(dev: { submit(bio: Bio): void }, sectors: number): Promise<Buffer> {
  const buf = Buffer.alloc(sectors * SECTOR_SIZE);
  await submitAndWait(dev, new Bio("read", 0, sectors, buf, 0, null));
  return buf;
}
