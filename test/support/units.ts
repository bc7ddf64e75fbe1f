/** Sizes in bytes, for tests that write them out. */
export const KiB = 1024;
export const MiB = 1024 * KiB;
export const SECTOR = 512;
