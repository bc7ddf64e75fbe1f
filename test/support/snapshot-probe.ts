/**
 * `snapshot-probe`: the snapshot target wrapped in a Proxy that records every property access
 * made through it (R2, R14). The table, the origin registry and every callback hold the proxy
 * (the constructor returns it), so each `this.x` inside the engine's methods goes through it.
 *
 * Two use-after-free checks, in the kernel's terms:
 * - `afterFree`: accesses after the destructor resolved (the kernel would touch freed memory);
 * - `afterZero`: accesses, in the same synchronous turn, after the count of live pending
 *   exceptions (`alive`) dropped to 0, apart from waking the destructor's waiters
 *   (`aliveWaiters`). The kernel's dtr polls that count from another CPU, so anything done after
 *   the decrement could run after the free (R14). In Node the dtr resumes in a later microtask, so
 *   this is stricter than what Node needs, and it is the kernel's rule (dm-snap.c: snapshot_dtr
 *   waits for pending_exceptions_count to drop to 0, then frees).
 */
import { Services } from "../../core/services.js";
import { target } from "../../core/registry.js";
import type { DeviceLookup } from "../../core/services.js";
import type { Copier } from "../../core/copier.js";
import type { Logger } from "../../core/logger.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { SnapshotTarget } from "../../targets/snapshot/snapshot.js";
import { type SnapshotParams, SnapshotParamsToken } from "../../targets/snapshot/params.js";

export class Probe {
  /** Every access as "get x" / "set x", with a running index. */
  readonly accesses: string[] = [];
  readonly afterFree: string[] = [];
  readonly afterZero: string[] = [];
  readonly events: string[] = [];
  freed = false;
  private zeroTurn = false;

  access(kind: "get" | "set", prop: PropertyKey, value?: unknown): void {
    const what = `${kind} ${String(prop)}`;
    this.accesses.push(what);
    if (this.freed) this.afterFree.push(what);
    if (kind === "set" && prop === "alive") {
      if (value === 0) {
        this.zeroTurn = true;
        this.events.push("alive=0");
        // Runs before any continuation the decrement woke (those are queued after this one).
        queueMicrotask(() => (this.zeroTurn = false));
      } else {
        this.zeroTurn = false;
      }
      return;
    }
    if (this.zeroTurn && prop !== "aliveWaiters") this.afterZero.push(what);
  }
}

const probes = new WeakMap<object, Probe>();

/** The probe of a `snapshot-probe` target instance (the proxy the table holds). */
export function probeOf(t: unknown): Probe {
  const p = probes.get(t as object);
  if (!p) throw new Error("not a snapshot-probe target");
  return p;
}

@target({
  name: "snapshot-probe",
  version: [1, 16, 0],
  inject: [Services.DeviceLookup, Services.Copier, Services.Logger, SnapshotParamsToken],
})
export class ProbeSnapshot extends SnapshotTarget {
  constructor(devices: DeviceLookup, copier: Copier, logger: Logger, params: SnapshotParams) {
    super(devices, copier, logger, params);
    const probe = new Probe();
    const proxy = new Proxy(this, {
      get(t, prop, receiver) {
        probe.access("get", prop);
        return Reflect.get(t, prop, receiver);
      },
      set(t, prop, value, receiver) {
        probe.access("set", prop, value);
        return Reflect.set(t, prop, value, receiver);
      },
    });
    probes.set(proxy, probe);
    return proxy;
  }

  override async dtr(): Promise<void> {
    const probe = probes.get(this)!;
    probe.events.push("dtr start");
    await super.dtr();
    probe.events.push("dtr resolved");
    probe.freed = true;
  }
}

export function registerProbe(dm: DeviceMapper): void {
  if (!dm.registry.get("snapshot-probe")) dm.registry.register(ProbeSnapshot);
}
