/**
 * dm-snapshot's module parameters (dm-snap.c: `module_param_named(snapshot_cow_threshold, ...)`).
 * The kernel has one set per module; udm has one per device mapper, given to
 * `createDeviceMapper({ snapshot: { ... } })` and injected into the snapshot targets.
 */
export interface SnapshotParams {
  /** Chunks being copied per snapshot above which new writes wait (`cow_threshold`). */
  cowThreshold: number;
}

/** Injection token for the device mapper's SnapshotParams. */
export const SnapshotParamsToken = Symbol.for("udm.snapshot.params");

export const defaultSnapshotParams: Readonly<SnapshotParams> = { cowThreshold: 2048 };
