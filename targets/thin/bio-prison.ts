/**
 * The bio prison (dm-bio-prison-v1.c): a cell per range of blocks being worked on, so I/O to a
 * block the pool is provisioning, copying or unmapping waits for it instead of racing it. The
 * first bio into a cell holds it; later ones wait in it, and whoever finishes the work releases
 * them to be mapped again.
 *
 * Keys are ranges ([begin, end) of one thin device's virtual blocks, or of the data device's
 * blocks): a key overlapping a held range lands in that range's cell, as the kernel's rbtree
 * comparison does (cells in the prison never overlap each other).
 */
import type { Bio, BioStatus } from "../../core/bio.js";

/** struct dm_cell_key */
export interface CellKey {
  /** A thin device's virtual blocks (dev = its id) or the pool's data blocks (dev = 0). */
  readonly virtual: boolean;
  readonly dev: number;
  readonly begin: number;
  readonly end: number;
}

export function virtualKey(dev: number, block: number, end = block + 1): CellKey {
  return { virtual: true, dev, begin: block, end };
}

export function dataKey(block: number, end = block + 1): CellKey {
  return { virtual: false, dev: 0, begin: block, end };
}

export class Cell {
  /** Bios that arrived while the cell was held, in arrival order. */
  readonly bios: Bio[] = [];

  constructor(
    readonly key: CellKey,
    /** The bio the cell was made for; null for a cell taken without one (dm_get_cell). */
    public holder: Bio | null,
  ) {}
}

export interface Detained {
  cell: Cell;
  /** The key was already held: the bio now waits in `cell` (true), or it holds a new cell (false). */
  existed: boolean;
}

export class BioPrison {
  /** Cells per (virtual, dev), sorted by `begin`. */
  private readonly groups = new Map<string, Cell[]>();
  private count = 0;

  /** Cells held now. */
  get size(): number {
    return this.count;
  }

  /** dm_bio_detain: wait in the cell holding an overlapping range, or hold a new cell for `key`. */
  detain(key: CellKey, inmate: Bio | null): Detained {
    const group = this.group(key, true)!;
    const i = firstEndingAfter(group, key.begin);
    const cell = group[i];
    if (cell && cell.key.begin < key.end) {
      if (inmate) cell.bios.push(inmate);
      return { cell, existed: true };
    }
    const fresh = new Cell(key, inmate);
    group.splice(i, 0, fresh);
    this.count++;
    return { cell: fresh, existed: false };
  }

  /** dm_cell_release: the holder, then the waiting bios, in order; the cell is gone. */
  release(cell: Cell): Bio[] {
    this.remove(cell);
    return cell.holder ? [cell.holder, ...cell.bios] : [...cell.bios];
  }

  /** dm_cell_release_no_holder: only the waiting bios (the holder is dealt with elsewhere). */
  releaseNoHolder(cell: Cell): Bio[] {
    this.remove(cell);
    return [...cell.bios];
  }

  /** dm_cell_error: complete the holder and every waiting bio with `status`. */
  error(cell: Cell, status: BioStatus): void {
    for (const bio of this.release(cell)) bio.complete(status);
  }

  /**
   * dm_cell_promote_or_release: the first waiting bio becomes the holder (false), or, with none
   * waiting, the cell is released (true).
   */
  promoteOrRelease(cell: Cell): boolean {
    const next = cell.bios.shift();
    if (!next) {
      this.remove(cell);
      return true;
    }
    cell.holder = next;
    return false;
  }

  private group(key: CellKey, create: boolean): Cell[] | undefined {
    const name = `${key.virtual ? "v" : "d"}${key.dev}`;
    let group = this.groups.get(name);
    if (!group && create) this.groups.set(name, (group = []));
    return group;
  }

  private remove(cell: Cell): void {
    const group = this.group(cell.key, false);
    const i = group ? group.indexOf(cell) : -1;
    if (i < 0) throw new Error(`cell ${JSON.stringify(cell.key)} is not in the prison`);
    group!.splice(i, 1);
    this.count--;
    if (group!.length === 0) this.groups.delete(`${cell.key.virtual ? "v" : "d"}${cell.key.dev}`);
  }
}

/** Index of the first cell whose range ends after `block` (cells are disjoint and sorted). */
function firstEndingAfter(group: Cell[], block: number): number {
  let lo = 0;
  let hi = group.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (group[mid]!.key.end <= block) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
