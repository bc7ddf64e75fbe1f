/**
 * The pools of one device mapper (dm-thin.c: dm_thin_pool_table): found by the pool device's name
 * (a thin table names its pool device) or by the metadata device (two pools must not share one).
 * A pool lives as long as any table holds it, so a reload of the pool's table keeps it, open
 * metadata and all.
 *
 * Device names are only unique within one device mapper, so the pools are kept per mapper, keyed
 * by an object every table of that mapper is given: its WorkQueues service.
 */
import type { BlockDevice } from "../../core/devices/block-device.js";
import type { WorkQueues } from "../../core/work-queue.js";
import type { Pool } from "./pool.js";

const tables = new WeakMap<WorkQueues, Set<Pool>>();

function poolsOf(mapper: WorkQueues): Set<Pool> {
  let pools = tables.get(mapper);
  if (!pools) tables.set(mapper, (pools = new Set()));
  return pools;
}

/** __pool_table_lookup */
export function poolByName(mapper: WorkQueues, name: string): Pool | undefined {
  for (const pool of poolsOf(mapper)) if (pool.name === name) return pool;
  return undefined;
}

/** __pool_table_lookup_metadata_dev */
export function poolByMetadata(mapper: WorkQueues, device: BlockDevice): Pool | undefined {
  for (const pool of poolsOf(mapper)) if (pool.metadataDevice === device) return pool;
  return undefined;
}

export function addPool(mapper: WorkQueues, pool: Pool): void {
  poolsOf(mapper).add(pool);
}

/** __pool_dec: the last table to let go closes the metadata (committing what changed). */
export async function releasePool(mapper: WorkQueues, pool: Pool): Promise<void> {
  if (--pool.refs > 0) return;
  poolsOf(mapper).delete(pool);
  pool.shutdown();
  await pool.services.worker.destroy();
  await pool.services.copier.destroy();
  await pool.pmd.close().catch((err: unknown) => {
    pool.services.logger.warn(`${pool.name}: closing the pool metadata failed: ${(err as Error).message}`);
  });
}
