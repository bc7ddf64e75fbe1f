/**
 * The tests `npm run mutate` runs against each mutant (stryker.config.mjs): the unit, race and
 * property tests of the mutated code, nothing that needs root, tools, a daemon or a VM (those run
 * in `npm test`; a mutant they alone would catch is counted as a survivor and looked at). The
 * crash runner (test/integration/crash-runner.test.ts) is left out too: it needs none of those, but
 * it runs for minutes, and every mutant of the exception stores dies without it (docs/testing.md).
 * Vitest's related-files mode (the runner's default) runs only the files that import the mutated
 * one, so the device-mapper tests below cost nothing in a run on targets/snapshot/.
 */
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: [
      "test/unit/snapshot-*.test.ts",
      "test/unit/cow-image.test.ts",
      "test/unit/exception-table.test.ts",
      "test/unit/copier.test.ts",
      "test/unit/work-queue.test.ts",
      "test/unit/mapped-device.test.ts",
      "test/unit/device-lifecycle.test.ts",
      "test/unit/deferred-remove.test.ts",
      "test/unit/table-validation.test.ts",
      "test/unit/stacking.test.ts",
      "test/unit/targets.test.ts",
      "test/unit/file-ranges.test.ts",
      "test/unit/write-plug.test.ts",
      "test/unit/fua-fallback.test.ts",
      "test/unit/controlled-device.test.ts",
      "test/races/*.test.ts",
      "test/properties/snapshot-scheduler.test.ts",
      "test/properties/suspend.test.ts",
      "test/properties/mapping.test.ts",
    ],
    setupFiles: ["test/support/setup.ts"],
    // Instrumented code runs slower than in `npm test`; a timeout here is a failed dry run.
    testTimeout: 180_000,
    hookTimeout: 180_000,
  },
});
