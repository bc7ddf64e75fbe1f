/** The model of the workload's mapped devices: the origin and every snapshot the workload made. */
import { DeviceHistory, type SnapshotModel } from "./model.js";

export class StackModel {
  readonly origin: DeviceHistory;
  /** Every snapshot made, removed and merged ones too, in order of creation (index k is snap<k>). */
  readonly snapshots: SnapshotModel[] = [];

  constructor(readonly originSectors: number) {
    this.origin = new DeviceHistory("origin", originSectors);
  }

  liveSnapshots(): SnapshotModel[] {
    return this.snapshots.filter((snapshot) => snapshot.removedAt === Infinity);
  }

  historyOf(device: string): DeviceHistory {
    if (device === "origin") return this.origin;
    const snapshot = this.snapshots.find((s) => s.name === device);
    if (!snapshot) throw new Error(`no device ${device}`);
    return snapshot.history;
  }

  /** What a live read of `device` must return at `sector` now (a write id; 0: the initial data). */
  expectedNow(device: string, sector: number): number {
    if (device === "origin") {
      const id = this.origin.current[sector]!;
      return id >= 0 ? id : 0;
    }
    const snapshot = this.snapshots.find((s) => s.name === device)!;
    const id = snapshot.history.current[sector]!;
    return id >= 0 ? id : snapshot.pointInTime[sector]!;
  }
}
