/**
 * udm/testing: the test kit for target authors. The controllable test device (hold, reorder and
 * fail single I/Os, a volatile write cache and power cuts), a mapper whose tables name RAM disks,
 * the seeded scheduler (seeded interleavings of a target's I/O), a crash check for any target, and
 * the crash-consistency runners for snapshot-shaped targets and for thin pools. Nothing here
 * depends on a test framework.
 */
import "../core/node-version.js";
export {
  type BioPredicate,
  type CachedWrite,
  ControlledDevice,
  type ControlledDeviceOptions,
  HeldIo,
  type HoldHandle,
  type IoRecord,
} from "./controlled-device.js";
export { NamedBacking, pattern, testMapper } from "./memory-backing.js";
export { Rng, seedFrom } from "./rng.js";
export { type ScheduleStep, SeededScheduler, type SeededSchedulerOptions } from "./scheduler.js";
export { type TargetCrashCheckOptions, type TargetCrashReport, runTargetCrashCheck } from "./target-crash/check.js";
export { type CrashFailure, type CrashRunOptions, type CrashRunReport, runCrashHarness } from "./crash/runner.js";
export {
  BROKEN_POOLS,
  type ThinCrashRunOptions,
  type ThinCrashRunReport,
  runThinCrashHarness,
} from "./thin-crash/runner.js";
