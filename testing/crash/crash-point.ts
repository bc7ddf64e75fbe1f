/**
 * One crash point: fresh devices with the content a crash at that moment leaves, the stack
 * activated on them again the way LVM would (persistent stores reload with chunk size 0; an
 * interrupted merge comes back as snapshot-merge and must finish), then the checks of
 * docs/testing.md, "Crash-consistency runner".
 */
import { Bio, SECTOR_SIZE, submitAndWait } from "../../core/bio.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { type CowImage, readCowImage } from "../../targets/snapshot/cow-image.js";
import { checkOrigin, checkSnapshot, firstDifference } from "./content-checks.js";
import { leakProblems } from "./cow-checks.js";
import type { NamedDevices, OverlayDevice } from "./devices.js";
import type { IncrementalReplay } from "./incremental-replay.js";
import { existedAt } from "./logged-devices.js";
import { waitForMerge } from "./merge.js";
import { type SnapshotModel, writeData } from "./model.js";
import { readAll } from "./ram-disks.js";
import { Problems, type RunStats } from "./report.js";
import { Rng } from "../rng.js";
import type { CrashPoint } from "./schedule.js";
import type { StackModel } from "./stack-model.js";

/** Ids of writes made while checking a recovered state (never in the model). */
const RECOVERY_ID_BASE = 0x4000_0000;

/** A snapshot brought back at a crash point. */
interface Reactivated {
  snapshot: SnapshotModel;
  /** Its device in the replay device mapper. */
  name: string;
  cow: OverlayDevice;
  /** Its COW image as the crash left it (null: not looked at, on the second reactivation). */
  image: CowImage | null;
}

export class CrashPointChecker {
  private nextRecoveryWriteId = RECOVERY_ID_BASE;

  /**
   * `replays` are the incremental replays of the logged devices, the origin's first, already
   * advanced to the point; `dm` is the device mapper the stacks are reactivated in.
   */
  constructor(
    private readonly dm: DeviceMapper,
    private readonly backing: NamedDevices,
    private readonly model: StackModel,
    private readonly replays: IncrementalReplay[],
    private readonly postRecoveryEnabled: boolean,
    private readonly stats: RunStats,
  ) {}

  private get originSectors(): number {
    return this.model.originSectors;
  }

  /** Check crash point `point` (number `pointNumber`, which names its devices); returns its problems. */
  async check(point: CrashPoint, pointNumber: number): Promise<string[]> {
    const problems = new Problems();
    const crashAt = point.at;
    const prefix = `c${pointNumber}`;
    const rng = point.kind === "random" ? new Rng(point.seed) : null;
    const [originReplay, ...cowReplays] = this.replays;
    const originImage = await originReplay!.crashImage(`${prefix}-o`, rng, point.keep, this.stats);
    this.backing.add(`${prefix}-o`, originImage);
    const alive: Reactivated[] = [];
    let merging: Reactivated | null = null;
    for (const replay of cowReplays) {
      if (!existedAt(replay.device, crashAt)) continue;
      const snapshot = replay.device.snapshot!;
      const cow = await replay.crashImage(`${prefix}-k${snapshot.index}`, rng, point.keep, this.stats);
      this.backing.add(`${prefix}-k${snapshot.index}`, cow);
      const image = await readCowImage(cow);
      const name = snapshot.name;
      for (const problem of image.problems) problems.add(`${name} image`, `${name}: COW image: ${problem}`);
      for (const problem of leakProblems(image)) problems.add(`${name} leak`, `${name}: ${problem}`);
      const reactivated: Reactivated = { snapshot, name: `${prefix}-s${snapshot.index}`, cow, image };
      if (snapshot.mergeStartedAt <= crashAt) merging = reactivated;
      else alive.push(reactivated);
    }
    const created: string[] = [];
    try {
      await this.activate(prefix, alive, merging, created, problems);
      if (problems.empty && merging) {
        // LVM reactivates an interrupted merge: it must run to the end from what is on disk.
        const failure = await waitForMerge(this.dm, `${prefix}-origin`, 10_000);
        if (failure) problems.add("merge", `${merging.snapshot.name}: merge after reactivation: ${failure}`);
        const after = await readCowImage(merging.cow);
        if (after.records.length > 0) {
          problems.add("merge", `${merging.snapshot.name}: ${after.records.length} records left after the merge`);
        }
      }
      if (problems.empty) {
        const originData = await readAll(this.dm.device(`${prefix}-origin`), this.originSectors);
        checkOrigin(this.model.origin, originData, crashAt, problems, merging?.snapshot ?? null);
        const snapshotData = new Map<string, Buffer>();
        for (const reactivated of alive) {
          const data = await readAll(this.dm.device(reactivated.name), this.originSectors);
          snapshotData.set(reactivated.name, data);
          checkSnapshot(this.model.origin, reactivated.snapshot, reactivated.image!, data, crashAt, problems);
        }
        if (problems.empty && !merging && point.kind === "random" && this.postRecoveryEnabled) {
          await this.postRecovery(prefix, alive, created, originData, snapshotData, rng!, problems);
        }
      }
    } finally {
      for (const name of created.reverse()) await this.dm.remove(name).catch(() => undefined);
      this.backing.delete(`${prefix}-o`);
      for (const reactivated of [...alive, ...(merging ? [merging] : [])]) {
        this.backing.delete(`${prefix}-k${reactivated.snapshot.index}`);
      }
    }
    return problems.list;
  }

  /**
   * The origin device over the crash image (snapshot-origin, or snapshot-merge reading the
   * merging snapshot's metadata), then every snapshot (reloading its store), then the origin's
   * resume (which starts the merge, once the other snapshots are there to preserve their chunks).
   * Checks that each store loads with the status its image implies.
   */
  private async activate(
    prefix: string,
    alive: Reactivated[],
    merging: Reactivated | null,
    created: string[],
    problems: Problems,
  ): Promise<void> {
    const originName = `${prefix}-origin`;
    await this.dm.create(originName);
    created.push(originName);
    const originTable = merging
      ? `0 ${this.originSectors} snapshot-merge ${prefix}-o ${prefix}-k${merging.snapshot.index} P 0`
      : `0 ${this.originSectors} snapshot-origin ${prefix}-o`;
    try {
      await this.dm.load(originName, originTable);
    } catch (err) {
      problems.add("load", `${merging ? `${merging.snapshot.name} (merging)` : "origin"}: ${(err as Error).message}`);
      return;
    }
    for (const reactivated of alive) {
      const name = reactivated.snapshot.name;
      try {
        await this.dm.create(reactivated.name, {
          table: `0 ${this.originSectors} snapshot ${prefix}-o ${prefix}-k${reactivated.snapshot.index} P 0`,
        });
        created.push(reactivated.name);
      } catch (err) {
        problems.add(`${name} load`, `${name}: exceptions do not load: ${(err as Error).message}`);
        continue;
      }
      // Before the origin resumes: a merge would make the snapshot copy chunks.
      const status = this.dm.status(reactivated.name)[0]?.params ?? "";
      const image = reactivated.image;
      if (image === null) {
        if (!/^\d+\/\d+ \d+$/.test(status)) problems.add(`${name} status`, `${name}: status "${status}"`);
      } else if (image.state === "valid") {
        const usage = image.usage;
        const want = `${usage.allocated}/${usage.total} ${usage.metadata}`;
        if (status !== want) {
          problems.add(`${name} status`, `${name}: status after reload is "${status}", the image implies "${want}"`);
        }
      } else if (image.state !== "new" || /^[A-Z]/.test(status)) {
        problems.add(`${name} status`, `${name}: COW image ${image.state}, status "${status}"`);
      }
    }
    try {
      await this.dm.resume(originName);
    } catch (err) {
      problems.add("load", `resume of the origin: ${(err as Error).message}`);
    }
  }

  /**
   * After recovery, the stack must go on working: origin writes must copy only chunks the
   * snapshots have not recorded (into chunks the reloaded stores allocate after next_free),
   * snapshot writes land in their own chunks, and a second reactivation shows the same data.
   */
  private async postRecovery(
    prefix: string,
    alive: Reactivated[],
    created: string[],
    originData: Buffer,
    snapshotData: Map<string, Buffer>,
    rng: Rng,
    problems: Problems,
  ): Promise<void> {
    const originName = `${prefix}-origin`;
    const expectOrigin = Buffer.from(originData);
    const expectSnapshot = new Map([...snapshotData].map(([name, data]) => [name, Buffer.from(data)]));
    const writes = rng.range(2, 6);
    for (let i = 0; i < writes; i++) {
      const onSnapshot = alive.length > 0 && rng.chance(0.3) ? rng.pick(alive) : null;
      const length = rng.pick([1, 4, 8, 16, 32]);
      const sector = rng.int(this.originSectors - length + 1);
      const data = writeData(this.nextRecoveryWriteId++, sector, length);
      const name = onSnapshot ? onSnapshot.name : originName;
      try {
        await submitAndWait(this.dm.device(name), new Bio("write", sector, length, data, 0, null));
      } catch (err) {
        problems.add("post", `after recovery: write to ${name} ${sector}+${length} failed: ${(err as Error).message}`);
        return;
      }
      data.copy(onSnapshot ? expectSnapshot.get(onSnapshot.name)! : expectOrigin, sector * SECTOR_SIZE);
    }
    const verify = async (when: string) => {
      const origin = await readAll(this.dm.device(originName), this.originSectors);
      if (!origin.equals(expectOrigin)) {
        problems.add(
          "post",
          `${when}: the origin differs from what was written (${firstDifference(origin, expectOrigin)})`,
        );
      }
      for (const reactivated of alive) {
        const got = await readAll(this.dm.device(reactivated.name), this.originSectors);
        const want = expectSnapshot.get(reactivated.name)!;
        if (!got.equals(want)) {
          problems.add("post", `${when}: ${reactivated.snapshot.name} changed (${firstDifference(got, want)})`);
        }
      }
    };
    await verify("after writes to the recovered devices");
    // Reactivate once more: what was committed after recovery must load as well.
    for (const name of [...created].reverse()) await this.dm.remove(name);
    created.length = 0;
    const again = new Problems();
    await this.activate(
      prefix,
      alive.map((reactivated) => ({ ...reactivated, image: null })),
      null,
      created,
      again,
    );
    for (const problem of again.list) problems.add("post", `second reactivation: ${problem}`);
    if (created.length === alive.length + 1) await verify("after a second reactivation");
  }
}
