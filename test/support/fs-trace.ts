/**
 * Record which fs calls a device makes, in order, while they still run for real: for tests of
 * what a write, FUA or PREFLUSH turns into.
 */
import fs from "node:fs";
import { vi } from "vitest";

/** Push "write" onto `order` for every fs.write, then do it. Undone by vi.restoreAllMocks(). */
export function traceFsWrites(order: string[]): void {
  const realWrite = fs.write;
  vi.spyOn(fs, "write").mockImplementation(((...args: unknown[]) => {
    order.push("write");
    return (realWrite as (...a: unknown[]) => void)(...args);
  }) as typeof fs.write);
}
