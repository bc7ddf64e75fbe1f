/**
 * The target contract (the kernel's `struct target_type` plus `struct dm_target`).
 *
 * One instance of a target class is one table line ("ti"). The core fills in `begin`, `len` and
 * `table` before calling `ctr`; the instance keeps its private state in its own fields. Only `ctr`
 * and `map` are mandatory; every other hook is optional and the core checks for it.
 */
import type { Bio } from "./bio.js";
import type { BlockDevice } from "./devices/block-device.js";

/** What `map` tells the core to do with a clone (DM_MAPIO_*). */
export const MapResult = {
  /** The target owns the clone and will complete (or submit) it itself. */
  SUBMITTED: 0,
  /** The target set `clone.device` / `clone.sector`; the core submits it now. */
  REMAPPED: 1,
  /** Push the original bio back: requeued during a noflush suspend, otherwise EIO. */
  REQUEUE: 2,
  /** Request-based dm only; a bio-based core rejects it (as the kernel would BUG()). */
  DELAY_REQUEUE: 3,
  /** Fail the clone with EIO without issuing it. */
  KILL: 4,
} as const;
export type MapResult = (typeof MapResult)[keyof typeof MapResult];

/** What `endIo` tells the core (DM_ENDIO_*). */
export const EndIoResult = {
  DONE: 0,
  /** The target keeps the clone and will complete it again later (e.g. after a retry). */
  INCOMPLETE: 1,
  REQUEUE: 2,
} as const;
export type EndIoResult = (typeof EndIoResult)[keyof typeof EndIoResult];

/** Target type feature bits (include/linux/device-mapper.h: DM_TARGET_*). */
export const TargetFeatures = {
  NONE: 0,
  SINGLETON: 0x1,
  ALWAYS_WRITEABLE: 0x2,
  IMMUTABLE: 0x4,
  WILDCARD: 0x8,
} as const;

export type TargetVersion = readonly [major: number, minor: number, patch: number];

export type StatusType = "info" | "table";

export interface StatusFlags {
  /** `--noflush`: targets with metadata may skip committing before reporting. */
  noflush?: boolean;
}

/**
 * Thrown by `ctr` (or by any hook that can fail with an errno): the message is the kernel's
 * `ti->error` string, which users see verbatim ("Invalid argument count").
 */
export class TargetError extends Error {
  constructor(
    message: string,
    readonly errno: string = "EINVAL",
  ) {
    super(message);
    this.name = "TargetError";
  }
}

/**
 * Whether `err` is a TargetError, also one thrown by a plugin that carries its own copy of udm
 * (its class is not this one, so `instanceof` alone would miss it).
 */
export function isTargetError(err: unknown): err is TargetError {
  if (err instanceof TargetError) return true;
  return err instanceof Error && err.name === "TargetError" && typeof (err as { errno?: unknown }).errno === "string";
}

/** Called by `iterateDevices` for every underlying device area: start/len in that device's sectors. */
export type DeviceAreaCallback = (device: BlockDevice, start: number, len: number) => boolean | void;

/** What a target can see of the table it belongs to. */
export interface TableContext {
  /** The mapped device's name, for messages. */
  readonly deviceName: string;
  readonly readOnly: boolean;
  /** Signal a target event (dm_table_event): bumps the device's event counter if the table is live. */
  event(): void;
  /** Whether the device this table belongs to is suspended (dm_suspended). */
  readonly suspended: boolean;
  /** The device is being suspended with `--noflush` (dm_noflush_suspending): targets may REQUEUE. */
  readonly noflushSuspending: boolean;
  /**
   * Block new I/O on this table's device and wait for its in-flight I/O, without running any
   * target hooks (dm_internal_suspend_fast). Nests; undo with `internalResume`. Used by snapshot
   * handover to quiesce the origin device around the exception-store swap. With `noflush`
   * (dm_internal_suspend_noflush) the device's live targets' presuspend and postsuspend hooks run
   * around the drain as for a noflush suspend: a thin pool suspends its thin devices so.
   */
  internalSuspend(opts?: { noflush?: boolean }): Promise<void>;
  internalResume(): void;
}

/** What a table needs from the device it belongs to. */
export interface TableOwner {
  readonly suspended: boolean;
  readonly noflushSuspending: boolean;
  internalSuspend(opts?: { noflush?: boolean }): Promise<void>;
  internalResume(): void;
}

export abstract class Target<Context = void> {
  /** First sector of this target inside the mapped device. Set by the core before `ctr`. */
  begin = 0;
  /** Length in sectors. Set by the core before `ctr`. */
  len = 0;
  /** Set by the core before `ctr`. */
  table!: TableContext;

  /** How many duplicates of an empty flush this target wants (0: it never sees flushes). */
  numFlushBios = 0;
  /** Same for discard and write-zeroes; 0 means the op fails with EOPNOTSUPP on this target. */
  numDiscardBios = 0;
  numWriteZeroesBios = 0;
  /** Split reads/writes so none crosses a multiple of this many sectors (0: no limit). */
  maxIoLen = 0;
  /**
   * Split discards and write-zeroes the same way (the kernel's max_discard_sectors from
   * io_hints; snapshot sets its chunk size). 0: no limit.
   */
  maxDiscardSectors = 0;
  /**
   * Set by a target whose `map` only remaps reads (it never reads, fills or changes a read's data,
   * and neither does its `endIo`): its read clones may then be answered with file ranges that the
   * submitter sends without copying (core/file-ranges.ts). The data is then taken from the page
   * cache when it is sent, not when the clone completes, so a target that must hand out data as
   * it was at completion (snapshot reads of a chunk an origin write may overwrite) leaves it off.
   */
  zeroCopyReads = false;

  /** Parse the table line's arguments, open devices. Throw TargetError with the kernel's string. */
  abstract ctr(args: string[]): void | Promise<void>;

  /**
   * Route one clone. Synchronous by contract: the core relies on map not yielding so that table
   * lookups and swaps cannot interleave with it (the kernel's SRCU read section).
   */
  abstract map(clone: Bio, context: Context): MapResult;

  // The optional hooks: a target defines the ones it needs; the core checks for each before
  // calling it.

  /**
   * Per-bio map context (kernel: per_io_data_size). When defined the core calls it once per clone
   * and hands the same object to `map` and `endIo`.
   */
  newMapContext?(): Context;
  /**
   * Sees every clone the target remapped or submitted when it completes. The completion status is
   * in `clone.status`; the target may change it (flakey turns a good read into EIO).
   */
  endIo?(clone: Bio, context: Context): EndIoResult;
  dtr?(): void | Promise<void>;
  presuspend?(): void | Promise<void>;
  presuspendUndo?(): void | Promise<void>;
  postsuspend?(): void | Promise<void>;
  /** May veto a resume by throwing (the device stays suspended). */
  preresume?(): void | Promise<void>;
  resume?(): void | Promise<void>;
  status?(type: StatusType, flags: StatusFlags): string;
  /** Return text for the caller, or undefined for none. Throw TargetError to fail. */
  message?(args: string[]): string | undefined | Promise<string | undefined>;
  iterateDevices?(fn: DeviceAreaCallback): boolean;
}

/** A target class as the registry sees it. */
export type TargetClass = abstract new (...args: never[]) => Target<unknown>;

export interface TargetTypeInfo {
  readonly name: string;
  readonly version: TargetVersion;
  readonly features: number;
}
