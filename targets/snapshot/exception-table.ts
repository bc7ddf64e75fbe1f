/**
 * The complete-exception table of one snapshot: origin chunk (old) → COW chunk (new).
 * (dm-snap.c: dm_exception_table_init, dm_insert_exception, dm_consecutive_chunk_count; races R5,
 * R22 and bug B2 in docs/snapshot.md).
 *
 * Stored as aligned blocks in one open-addressing hash table over a typed array, not as the
 * kernel's chained hash of runs; docs/snapshot.md ("The exception table") explains the layout
 * and why.
 */

/** Highest block level: 2^8 = 256 chunks, the kernel's DM_CHUNK_CONSECUTIVE_BITS. */
const MAX_LEVEL = 8;
const GROUP_MASK = (1 << MAX_LEVEL) - 1;
/** Old chunks must be below this so that K = 2s + 2^j stays an exact double (< 2^53). */
export const MAX_OLD_CHUNK = 2 ** 52 - 1;
/** New chunks are exact doubles; the kernel's are 56-bit, which JS numbers cannot hold exactly. */
export const MAX_NEW_CHUNK = Number.MAX_SAFE_INTEGER;

const EMPTY = 0;
const NARROW_MAX = 0xffffffff;
const MAX_LOAD = 0.85;
const GROWTH = 1.5;
const MIN_CAPACITY = 64;
/** Hint-derived initial size is capped like the kernel's (2 MiB of buckets): 2^18 narrow slots. */
const MAX_INITIAL_CAPACITY = 262144;
/** clear() on a table with at least this many entries gives the event loop a turn (R22). */
const CLEAR_YIELD_ENTRIES = 65536;
/** Re-sort the probe order by level coverage after this many mutations (it only affects speed). */
const ORDER_REFRESH_MUTATIONS = 4096;

export interface ExceptionTableOptions {
  /**
   * Size of the COW device in chunks. Like the kernel's bucket count it sets the initial table size
   * and depends on the COW size only (B2: never on the origin, which LVM loads with size 0). The
   * table grows past it as needed, so it is only a hint.
   */
  cowChunks?: number;
}

/** murmur3's 32-bit finaliser over the low word, with the high word folded in for wide keys. */
function hash32(key: number): number {
  let h = key >>> 0;
  if (key > NARROW_MAX) h ^= Math.imul((key / 4294967296) >>> 0, 0x9e3779b1);
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Level of a stored key: the index of its lowest set bit (≤ 8, so the low 9 bits suffice). */
function keyLevel(key: number): number {
  const low = key & 0x1ff; // ToInt32 is modular, so this is exact for wide keys too
  return 31 - Math.clz32(low & -low);
}

function keyStart(key: number, level: number): number {
  return (key - (1 << level)) / 2;
}

export class ExceptionTable {
  /** Slot i holds its key at [2i] and its value (new chunk of the block's first chunk) at [2i + 1]. */
  private slots: Uint32Array | Float64Array;
  private cap: number;
  /** cap / 2^32: home slot = floor(hash · scale), always < cap (see home()). */
  private scale: number;
  private wide = false;
  private entries = 0;
  private mapped = 0;
  /** Bumped on every mutation, so forEach can refuse to continue over a table changed under it. */
  private version = 0;
  private readonly initialCap: number;

  /** Number of blocks per level, and the levels worth probing, most chunks covered first. */
  private readonly levelCounts = new Float64Array(MAX_LEVEL + 1);
  private readonly order = new Uint8Array(MAX_LEVEL + 1);
  private orderLength = 0;
  private orderStale = false;
  private sinceOrder = 0;

  /** Set by locate(): first old chunk and level of the block found. Avoids allocating a result. */
  private hitStart = 0;
  private hitLevel = 0;

  constructor(options: ExceptionTableOptions = {}) {
    this.initialCap = ExceptionTable.initialCapacity(options.cowChunks ?? 0);
    this.cap = this.initialCap;
    this.scale = this.cap / 4294967296;
    this.slots = new Uint32Array(2 * this.cap);
  }

  /** The slot count a table starts with for a COW device of `cowChunks` chunks (B2). */
  static initialCapacity(cowChunks: number): number {
    const n = Number.isFinite(cowChunks) ? Math.floor(cowChunks) : 0;
    return Math.min(MAX_INITIAL_CAPACITY, Math.max(MIN_CAPACITY, n));
  }

  /** Number of old chunks mapped. */
  get size(): number {
    return this.mapped;
  }

  /** Number of stored blocks (what the memory is spent on); ≤ size, far below it for sequential COW. */
  get entryCount(): number {
    return this.entries;
  }

  /** Number of slots. */
  get capacity(): number {
    return this.cap;
  }

  /** Bytes held by the table's storage (the typed array; the object itself is a few hundred bytes). */
  get memoryBytes(): number {
    return this.slots.byteLength;
  }

  /** The COW chunk holding the snapshot's copy of `oldChunk`, or -1. */
  lookup(oldChunk: number): number {
    const i = this.locate(oldChunk);
    return i < 0 ? -1 : this.slots[2 * i + 1]! + (oldChunk - this.hitStart);
  }

  /**
   * Record a complete exception. Merges it with consecutive neighbours (in old and new numbering,
   * inside its 256-chunk group). Inserting a chunk that is already mapped throws: the caller must
   * look up the complete table again after any yield before creating an exception (race R5).
   */
  insert(oldChunk: number, newChunk: number): void {
    if (!(Number.isInteger(oldChunk) && oldChunk >= 0 && oldChunk <= MAX_OLD_CHUNK)) {
      throw new RangeError(`ExceptionTable: old chunk ${oldChunk} is not an integer in [0, 2^52)`);
    }
    if (!(Number.isInteger(newChunk) && newChunk >= 0 && newChunk <= MAX_NEW_CHUNK)) {
      throw new RangeError(`ExceptionTable: new chunk ${newChunk} is not a safe non-negative integer`);
    }
    if (this.locate(oldChunk) >= 0) {
      throw new Error(`ExceptionTable: chunk ${oldChunk} already has an exception (to ${this.lookup(oldChunk)})`);
    }
    // Climb while the sibling block is present and continues (or precedes) us in new numbering.
    let start = oldChunk;
    let target = newChunk;
    let level = 0;
    const low = oldChunk & GROUP_MASK;
    while (level < MAX_LEVEL) {
      const len = 1 << level;
      const weAreRightHalf = ((low >> level) & 1) === 1;
      const sibling = weAreRightHalf ? start - len : start + len;
      const i = this.find(2 * sibling + len);
      if (i < 0) break;
      const siblingTarget = this.slots[2 * i + 1]!;
      if (weAreRightHalf ? siblingTarget + len !== target : target + len !== siblingTarget) break;
      this.deleteSlot(i);
      this.countLevel(level, -1);
      if (weAreRightHalf) {
        start = sibling;
        target = siblingTarget;
      }
      level++;
    }
    this.put(2 * start + (1 << level), target);
    this.countLevel(level, 1);
    this.mapped++;
    this.version++;
  }

  /**
   * Drop the exception of one chunk after it was merged back into the origin (step 4 of a merge batch, docs/snapshot.md "The merge loop"). Only
   * the first or last chunk of a run may go; anything else means the in-memory table and the
   * on-disk order disagree, reported with the kernel's wording. An unmapped chunk is the kernel's
   * "on disk but not in memory" corruption.
   */
  remove(oldChunk: number): void {
    const i = this.locate(oldChunk);
    if (i < 0) {
      throw new Error(`Corruption detected: exception for block ${oldChunk} is on disk but not in memory`);
    }
    const start = this.hitStart;
    const level = this.hitLevel;
    const target = this.slots[2 * i + 1]!;
    const mine = target + (oldChunk - start);
    const low = oldChunk & GROUP_MASK;
    const blockLast = start + (1 << level) - 1;
    // Neighbours inside the same block are linked by construction; others need a lookup.
    // (mine > 0: with mine = 0, "lookup(c - 1) === mine - 1" would mistake a miss for a link.)
    const linkedLeft = low !== 0 && (oldChunk > start || (mine > 0 && this.lookup(oldChunk - 1) === mine - 1));
    const linkedRight = low !== GROUP_MASK && (oldChunk < blockLast || this.lookup(oldChunk + 1) === mine + 1);
    if (linkedLeft && linkedRight) {
      const first = this.runFirst(oldChunk, mine);
      const last = this.runLast(oldChunk, mine);
      throw new Error(`Attempt to merge block ${oldChunk} from the middle of a chunk range [${first} - ${last}]`);
    }
    // lookup() only reads, so slot i still holds our block.
    this.deleteSlot(i);
    this.countLevel(level, -1);
    // Split: at each level below ours keep the half that does not contain oldChunk. These pieces
    // are consecutive with each other but never siblings, so the result is canonical again.
    const offset = oldChunk - start;
    for (let l = level - 1; l >= 0; l--) {
      const pieceOffset = ((offset >> l) ^ 1) << l;
      this.put(2 * (start + pieceOffset) + (1 << l), target + pieceOffset);
      this.countLevel(l, 1);
    }
    this.mapped--;
    this.version++;
  }

  /**
   * Call `cb(oldFirst, newFirst, count)` once per run (maximal, inside one 256-chunk group), in no
   * particular order. The table must not be changed from inside the callback (throws if it is).
   */
  forEach(cb: (oldChunk: number, newChunk: number, count: number) => void): void {
    const version = this.version;
    const slots = this.slots;
    for (let i = 0; i < this.cap; i++) {
      const key = slots[2 * i]!;
      if (key === EMPTY) continue;
      const level = keyLevel(key);
      const start = keyStart(key, level);
      const target = slots[2 * i + 1]!;
      // Only the block that starts a run reports it.
      if ((start & GROUP_MASK) !== 0 && target > 0 && this.lookup(start - 1) === target - 1) continue;
      const last = this.runLast(start, target);
      cb(start, target, last - start + 1);
      if (this.version !== version) throw new Error("ExceptionTable changed during forEach");
    }
  }

  /**
   * Release everything. The table is empty (and usable) as soon as this is called. Freeing typed
   * arrays is O(1) on the main thread (V8 frees backing stores off-thread), so there is no long
   * loop to slice up as in the kernel's fix for R22; a large table still gives the event loop one
   * turn before the promise resolves, so that tearing down a huge snapshot never runs back to back
   * with the rest of the caller's work.
   */
  async clear(): Promise<void> {
    const large = this.entries >= CLEAR_YIELD_ENTRIES;
    this.cap = this.initialCap;
    this.scale = this.cap / 4294967296;
    this.slots = new Uint32Array(2 * this.cap);
    this.wide = false;
    this.entries = 0;
    this.mapped = 0;
    this.levelCounts.fill(0);
    this.orderLength = 0;
    this.orderStale = false;
    this.version++;
    if (large) await new Promise<void>((resolve) => setImmediate(resolve));
  }

  // ---- block search -------------------------------------------------------------------------

  /**
   * Slot of the block holding `chunk`, or -1; sets hitStart/hitLevel. Blocks are disjoint, so at
   * most one level matches. Negative, fractional or too large chunks produce keys no slot holds.
   */
  private locate(chunk: number): number {
    if (this.orderStale) this.refreshOrder();
    const low = chunk & GROUP_MASK;
    for (let t = 0; t < this.orderLength; t++) {
      const level = this.order[t]!;
      const start = chunk - (low & ((1 << level) - 1));
      const i = this.find(2 * start + (1 << level));
      if (i >= 0) {
        this.hitStart = start;
        this.hitLevel = level;
        return i;
      }
    }
    return -1;
  }

  /** First chunk of the run holding `chunk` (mapped to `target`), walking back block by block. */
  private runFirst(chunk: number, target: number): number {
    while ((chunk & GROUP_MASK) !== 0) {
      const i = this.locate(chunk - 1);
      if (i < 0) break;
      const t = this.slots[2 * i + 1]!;
      if (t + (chunk - 1 - this.hitStart) !== target - 1) break;
      target = t;
      chunk = this.hitStart;
    }
    return chunk;
  }

  /** Last chunk of the run holding `chunk` (mapped to `target`), walking on block by block. */
  private runLast(chunk: number, target: number): number {
    while ((chunk & GROUP_MASK) !== GROUP_MASK) {
      const i = this.locate(chunk + 1);
      if (i < 0) break;
      const t = this.slots[2 * i + 1]!;
      if (t + (chunk + 1 - this.hitStart) !== target + 1) break;
      const lastOffset = (1 << this.hitLevel) - 1;
      chunk = this.hitStart + lastOffset;
      target = t + lastOffset;
    }
    return chunk;
  }

  private countLevel(level: number, delta: number): void {
    const before = this.levelCounts[level]!;
    this.levelCounts[level] = before + delta;
    // A level becoming (non-)empty changes which levels must be probed; otherwise re-sort rarely.
    if (before === 0 || before + delta === 0 || ++this.sinceOrder >= ORDER_REFRESH_MUTATIONS) this.orderStale = true;
  }

  /** Probe only non-empty levels, those covering the most chunks first (hits then stop early). */
  private refreshOrder(): void {
    const counts = this.levelCounts;
    const order = this.order;
    let n = 0;
    for (let level = 0; level <= MAX_LEVEL; level++) {
      if (counts[level] === 0) continue;
      const weight = counts[level]! * (1 << level);
      let k = n++;
      while (k > 0 && counts[order[k - 1]!]! * (1 << order[k - 1]!) < weight) {
        order[k] = order[k - 1]!;
        k--;
      }
      order[k] = level;
    }
    this.orderLength = n;
    this.orderStale = false;
    this.sinceOrder = 0;
  }

  // ---- open addressing ----------------------------------------------------------------------

  /**
   * Home slot of a key. hash < 2^32 and scale = cap / 2^32, so the product is below cap by at least
   * cap / 2^32, far more than its rounding error: the result is always a valid slot.
   */
  private home(key: number): number {
    return (hash32(key) * this.scale) | 0;
  }

  /** Slot of `key`, or -1. Robin Hood order: stop once we are further from home than the occupant. */
  private find(key: number): number {
    const slots = this.slots;
    const cap = this.cap;
    let i = this.home(key);
    for (let dist = 0; ; dist++) {
      const k = slots[2 * i]!;
      if (k === key) return i;
      if (k === EMPTY) return -1;
      let theirs = i - this.home(k);
      if (theirs < 0) theirs += cap;
      if (theirs < dist) return -1;
      if (++i === cap) i = 0;
    }
  }

  /** Add a key known to be absent, growing or widening the storage first if needed. */
  private put(key: number, value: number): void {
    if (!this.wide && (key > NARROW_MAX || value > NARROW_MAX)) this.rehash(this.cap, true);
    if (this.entries + 1 > this.cap * MAX_LOAD) this.rehash(Math.ceil(this.cap * GROWTH), this.wide);
    this.place(key, value);
    this.entries++;
  }

  /** Robin Hood insertion: take the slot of any occupant closer to its home than we are to ours. */
  private place(key: number, value: number): void {
    const slots = this.slots;
    const cap = this.cap;
    let i = this.home(key);
    let dist = 0;
    for (;;) {
      const k = slots[2 * i]!;
      if (k === EMPTY) {
        slots[2 * i] = key;
        slots[2 * i + 1] = value;
        return;
      }
      let theirs = i - this.home(k);
      if (theirs < 0) theirs += cap;
      if (theirs < dist) {
        const v = slots[2 * i + 1]!;
        slots[2 * i] = key;
        slots[2 * i + 1] = value;
        key = k;
        value = v;
        dist = theirs;
      }
      if (++i === cap) i = 0;
      dist++;
    }
  }

  /** Backward-shift deletion: pull the following displaced entries one slot back, no tombstones. */
  private deleteSlot(i: number): void {
    const slots = this.slots;
    const cap = this.cap;
    let j = i + 1 === cap ? 0 : i + 1;
    for (;;) {
      const k = slots[2 * j]!;
      if (k === EMPTY || this.home(k) === j) break;
      slots[2 * i] = k;
      slots[2 * i + 1] = slots[2 * j + 1]!;
      i = j;
      if (++j === cap) j = 0;
    }
    slots[2 * i] = EMPTY;
    slots[2 * i + 1] = 0;
    this.entries--;
  }

  private rehash(capacity: number, wide: boolean): void {
    const old = this.slots;
    const oldCap = this.cap;
    this.cap = capacity;
    this.scale = capacity / 4294967296;
    this.wide = wide;
    this.slots = wide ? new Float64Array(2 * capacity) : new Uint32Array(2 * capacity);
    for (let i = 0; i < oldCap; i++) {
      const k = old[2 * i]!;
      if (k !== EMPTY) this.place(k, old[2 * i + 1]!);
    }
  }
}
