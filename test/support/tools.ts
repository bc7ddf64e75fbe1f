/**
 * Tests that need Debian tools: find what is missing, print why the tests skip, and when
 * UDM_REQUIRE_ROOT_TESTS=1 (CI) register one failing test instead of skipping silently.
 */
import fs from "node:fs";
import path from "node:path";
import { it } from "vitest";

export function onPath(tool: string): boolean {
  return (process.env.PATH ?? "").split(path.delimiter).some((dir) => {
    try {
      fs.accessSync(path.join(dir, tool), fs.constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

/** The tools of `tools` that are not installed (empty when all are). Call at a test file's top level. */
export function missingTools<T extends string>(suite: string, tools: readonly T[], hint = "Debian: libnbd-bin, qemu-utils"): T[] {
  const missing = tools.filter((t) => !onPath(t));
  const required = process.env.UDM_REQUIRE_ROOT_TESTS === "1";
  if (missing.length > 0) {
    console.warn(`${suite} ${required ? "REQUIRED but cannot run" : "skipped"}: ${missing.join(", ")} not on PATH (${hint})`);
    if (required) {
      it(`${suite}: real NBD clients must be installed (UDM_REQUIRE_ROOT_TESTS=1)`, () => {
        throw new Error(`UDM_REQUIRE_ROOT_TESTS=1 but ${missing.join(", ")} not on PATH`);
      });
    }
  }
  return missing;
}
