/**
 * The crash-consistency runner (test/crash/runner.ts, `npm run crash`): a seeded workload on a
 * snapshot stack whose devices are recorded with log-writes, then every flush/FUA point and random
 * points in between replayed onto fresh RAM disks, reactivated and checked against the model
 * (docs/testing.md, "Crash-consistency runner"). Runs in-process on RAM disks: no root, no build needed.
 *
 * The seed is printed; `UDM_CRASH_SEED=<seed>` repeats a run (so does `npm run crash -- --seed`).
 *
 * The harness must be able to fail, so four deliberately broken variants of the targets are run
 * through it and must be caught:
 * - a snapshot whose store acknowledges a commit before writing the metadata (origin writes go on
 *   before the exception is durable);
 * - a snapshot whose metadata writes lose their PREFLUSH (a record can be durable before the chunk
 *   it points at);
 * - a snapshot that commits exceptions in the order their copies finish instead of allocation
 *   order (R11 in docs/snapshot.md: records out of order, chunks leaked below next_free after a crash);
 * - a merge that drops the origin flush before clearing the merged records (R20 in docs/snapshot.md);
 * - on reused COW devices (garbage and an older store under a zeroed header), a store that seals a
 *   full metadata area without zeroing the next one first (the loader then walks into the older
 *   store's records).
 */
import { spawnSync } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { type Bio, BioFlags } from "../../core/bio.js";
import type { BlockDevice } from "../../core/devices/block-device.js";
import { target } from "../../core/registry.js";
import { Services } from "../../core/services.js";
import { leakProblems, runCrashHarness, type CrashRunReport } from "../../testing/crash/runner.js";
import { cowImageChunks, readCowImage } from "../../targets/snapshot/cow-image.js";
import { writeRecord } from "../../targets/snapshot/cow-format.js";
import { SnapshotMergeTarget } from "../../targets/snapshot/merge.js";
import type { PendingException } from "../../targets/snapshot/pending.js";
import { SnapshotTarget } from "../../targets/snapshot/snapshot.js";
import { createDeviceMapper } from "../../index.js";
import { seedFrom } from "../../testing/rng.js";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** Commits are acknowledged at once; the metadata write happens a turn later. */
@target({
  name: "snap-ackearly",
  version: [1, 16, 0],
  inject: [Services.DeviceLookup, Services.Copier, Services.Logger],
})
class AckBeforeCommitSnapshot extends SnapshotTarget {
  override async ctr(args: string[]): Promise<void> {
    await super.ctr(args);
    const store = this.store;
    const commit = store.commitException.bind(store);
    store.commitException = (oldChunk, newChunk, valid, done) => {
      setImmediate(() => commit(oldChunk, newChunk, valid, () => {}));
      queueMicrotask(() => done(true));
    };
  }
}

/** Everything the store writes to its COW device loses PREFLUSH (FUA stays). */
@target({
  name: "snap-noflush",
  version: [1, 16, 0],
  inject: [Services.DeviceLookup, Services.Copier, Services.Logger],
})
class NoPreflushSnapshot extends SnapshotTarget {
  override async ctr(args: string[]): Promise<void> {
    await super.ctr(args);
    const store = this.store as unknown as { cow: BlockDevice };
    store.cow = withSubmit(store.cow, (bio, inner) => {
      bio.flags &= ~BioFlags.PREFLUSH;
      inner.submit(bio);
    });
  }
}

/** Commits in copy-completion order: the in-order gate (R11) bypassed. */
@target({
  name: "snap-noorder",
  version: [1, 16, 0],
  inject: [Services.DeviceLookup, Services.Copier, Services.Logger],
})
class UnorderedCommitSnapshot extends SnapshotTarget {
  override copyDone(pending: PendingException, error: boolean): void {
    pending.copyError = error;
    type WithPendingComplete = { pendingComplete(pending: PendingException, ok: boolean): Promise<void> };
    const complete = (this as unknown as WithPendingComplete).pendingComplete.bind(this);
    this.store.commitException(pending.oldChunk, pending.newChunk, !error, (ok) => void complete(pending, ok));
  }
}

/** A full metadata area is sealed without zeroing the next area first (`zeroNext` dropped). */
@target({
  name: "snap-nozeronext",
  version: [1, 16, 0],
  inject: [Services.DeviceLookup, Services.Copier, Services.Logger],
})
class NoZeroNextSnapshot extends SnapshotTarget {
  override async ctr(args: string[]): Promise<void> {
    await super.ctr(args);
    type Job = { zeroNext: boolean };
    const store = this.store as unknown as { writeJob(job: Job): Promise<void> };
    const write = store.writeJob.bind(store);
    store.writeJob = (job) => write({ ...job, zeroNext: false });
  }
}

/** The merge's origin flush completes without reaching the origin device. */
@target({
  name: "merge-noflush",
  version: [1, 5, 0],
  inject: [Services.DeviceLookup, Services.Copier, Services.Logger],
})
class NoFlushMerge extends SnapshotMergeTarget {
  override async ctr(args: string[]): Promise<void> {
    await super.ctr(args);
    this.origin = withSubmit(this.origin, (bio, inner) =>
      bio.op === "flush" ? bio.complete("ok") : inner.submit(bio),
    );
  }
}

function withSubmit(inner: BlockDevice, submit: (bio: Bio, inner: BlockDevice) => void): BlockDevice {
  return new Proxy(inner, {
    get(t, prop, receiver) {
      if (prop === "submit") return (bio: Bio) => submit(bio, t);
      return Reflect.get(t, prop, receiver);
    },
  });
}

function summary(r: CrashRunReport): string {
  return (
    `seed ${r.seed}: crash points checked: ${r.pointsChecked} (${r.flushPoints} flush/FUA, ${r.randomPoints} random), ` +
    `failures: ${r.failures}; ${r.stats.writes} writes, ${r.stats.snapshotsCreated} snapshots, ${r.merges.done} merges (${r.merges.note}), ` +
    `${r.stats.logEntries} log entries; ${r.elapsedMs.total} ms`
  );
}

function failureText(r: CrashRunReport): string {
  return [...r.failureDetails.map((f) => `${f.point}\n  ${f.problems.join("\n  ")}`), ...r.workloadProblems].join("\n");
}

/**
 * Reused COW devices: a 4096-sector origin, so a 4 KiB-chunk snapshot's area 0 (256 records) fills
 * when half the origin is copied, which the workload's origin sweeps do; no merges (shorter).
 */
const REUSED = { ops: 50, originSectors: 4096, reusedCow: true, merges: false } as const;
const REUSED_SEED = 3;

const mergeListed = createDeviceMapper()
  .targets()
  .some((t) => t.name === "snapshot-merge");

describe("crash-consistency runner", () => {
  it("checks at least 1000 crash points of a mixed workload without a failure", { timeout: 180_000 }, async () => {
    const seed = seedFrom(process.env.UDM_CRASH_SEED !== undefined ? "UDM_CRASH_SEED" : "UDM_FUZZ_SEED");
    console.log(
      `crash runner seed ${seed} (UDM_CRASH_SEED=${seed} or npm run crash -- --seed ${seed} --ops 250 --min-points 1000 repeats it)`,
    );
    const report = await runCrashHarness({ ops: 250, seed, minPoints: 1000 });
    console.log(summary(report));
    expect(report.failures, failureText(report)).toBe(0);
    expect(report.pointsChecked).toBeGreaterThanOrEqual(1000);
    expect(report.flushPoints).toBeGreaterThan(500);
    expect(report.randomPoints).toBeGreaterThan(0);
    expect(report.stats.unflushedKept).toBeGreaterThan(0);
    expect(report.stats.unflushedDropped).toBeGreaterThan(0);
    expect(report.crossChecks).toBeGreaterThan(0);
    expect(report.stats.snapshotsCreated).toBeGreaterThan(1);
    if (report.merges.enabled) expect(report.merges.done).toBeGreaterThan(0);
  });

  it("catches a store that acknowledges commits before the metadata is written", { timeout: 60_000 }, async () => {
    const report = await runCrashHarness({
      ops: 60,
      seed: 1,
      snapshotTarget: "snap-ackearly",
      targets: [AckBeforeCommitSnapshot],
      merges: false,
      maxReported: 50,
    });
    console.log(`ack before commit: ${summary(report)}`);
    expect(report.failedPoints).toBeGreaterThan(0);
    // Origin data written after the snapshot was taken shows through a chunk it never recorded.
    expect(failureText(report)).toMatch(/snap\d+ sector \d+ holds write #\d+; allowed: chunk \d+ is not recorded/);
  });

  it("catches metadata written without PREFLUSH (a record durable before its chunk)", { timeout: 60_000 }, async () => {
    const report = await runCrashHarness({
      ops: 60,
      seed: 1,
      snapshotTarget: "snap-noflush",
      targets: [NoPreflushSnapshot],
      merges: false,
      maxReported: 50,
    });
    console.log(`no PREFLUSH: ${summary(report)}`);
    expect(report.failedPoints).toBeGreaterThan(0);
    expect(failureText(report)).toMatch(/snap\d+ sector \d+ holds zeros; allowed: chunk \d+ is recorded/);
  });

  it("catches exceptions committed out of allocation order (R11)", { timeout: 60_000 }, async () => {
    // Copies must finish out of order for this to matter: every other RAM-disk bio is delayed.
    const report = await runCrashHarness({
      ops: 100,
      seed: 5,
      jitter: 0.5,
      snapshotTarget: "snap-noorder",
      targets: [UnorderedCommitSnapshot],
      merges: false,
      maxReported: 50,
    });
    console.log(`unordered commits: ${summary(report)}`);
    expect(report.failedPoints).toBeGreaterThan(0);
    expect(failureText(report)).toMatch(/records out of allocation order|no record points at it \(leaked\)/);
  });

  it.runIf(mergeListed)(
    "catches a merge that clears records before flushing the origin (R20)",
    { timeout: 120_000 },
    async () => {
      const report = await runCrashHarness({
        ops: 150,
        seed: 5,
        mergeTarget: "merge-noflush",
        targets: [NoFlushMerge],
        maxReported: 50,
      });
      console.log(`merge without flush: ${summary(report)}`);
      if (!report.merges.enabled) return; // snapshot-merge registered but not working: nothing to break
      expect(report.merges.done).toBeGreaterThan(0);
      expect(report.failedPoints).toBeGreaterThan(0);
      expect(failureText(report)).toMatch(/origin sector \d+ holds .* after the merge of snap\d+/);
    },
  );

  it(
    "on reused COW devices (garbage and an older store under a zeroed header): no failure",
    { timeout: 180_000 },
    async () => {
      const report = await runCrashHarness({ ...REUSED, seed: REUSED_SEED });
      console.log(`reused COW devices: ${summary(report)}`);
      expect(report.failures, failureText(report)).toBe(0);
      expect(report.stats.snapshotsCreated).toBeGreaterThan(1);
    },
  );

  it(
    "catches, on reused COW devices, a store that seals a full area without zeroing the next one",
    { timeout: 180_000 },
    async () => {
      const report = await runCrashHarness({
        ...REUSED,
        seed: REUSED_SEED,
        snapshotTarget: "snap-nozeronext",
        targets: [NoZeroNextSnapshot],
        maxReported: 50,
      });
      console.log(`area sealed without zeroing the next: ${summary(report)}`);
      expect(report.failedPoints).toBeGreaterThan(0);
      // The loader walks from the sealed area into the older store's records (or its garbage).
      expect(failureText(report)).toMatch(/COW image: area \d+ slot \d+: (old chunk \d+ has two exceptions|new chunk)/);
    },
  );

  it("reports a chunk below next_free that no record points at", async () => {
    // Three exceptions in order (chunks 2, 3, 4), then the last record made to skip chunk 4.
    const image = Buffer.alloc(64 * 8 * 512);
    for (const { chunk, data } of cowImageChunks({ chunkSize: 8, exceptions: 3, oldChunk: (i) => 10 + i }))
      data.copy(image, chunk * 8 * 512);
    expect(leakProblems(await readCowImage(image))).toEqual([]);
    writeRecord(image.subarray(8 * 512), 2, 12, 5);
    expect(leakProblems(await readCowImage(image))).toEqual([
      "chunk 4 lies below next_free (6) but no record points at it (leaked)",
    ]);
    writeRecord(image.subarray(8 * 512), 2, 12, 3);
    expect(leakProblems(await readCowImage(image)).join("\n")).toMatch(/out of allocation order/);
  });

  it("npm run crash: prints the seed and the summary line, exit status 0", { timeout: 60_000 }, () => {
    const r = spawnSync(
      process.execPath,
      ["--import", "tsx", "test/crash/cli.ts", "--ops", "20", "--seed", "7", "-q"],
      {
        cwd: ROOT,
        encoding: "utf8",
      },
    );
    expect(r.stderr).toBe("");
    expect(r.stdout).toMatch(/^seed 7 \(repeat with --seed 7 --ops 20\)\n/);
    expect(r.stdout).toMatch(/\ncrash points checked: \d+, failures: 0 \(seed 7, ops 20\)\n$/);
    expect(r.status).toBe(0);
    const bad = spawnSync(process.execPath, ["--import", "tsx", "test/crash/cli.ts", "--ops", "x"], {
      cwd: ROOT,
      encoding: "utf8",
    });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--ops: expected a non-negative integer/);
  });
});
