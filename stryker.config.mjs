/**
 * Mutation testing (`npm run mutate`, docs/testing.md "Mutation testing"): StrykerJS changes one
 * operator, condition or constant at a time in the files below and runs the tests that cover it
 * (test/mutation/vitest.config.ts); a mutant no test notices is a behaviour no test pins down.
 * Incremental: results are kept in reports/mutation/stryker-incremental.json, so a rerun only tests
 * mutants in changed code or covered by changed tests. Not part of `npm test` (hours in full).
 * Narrow a run with `npm run mutate -- --mutate targets/snapshot/pending.ts`.
 */
export default {
  testRunner: "vitest",
  vitest: { configFile: "test/mutation/vitest.config.ts" },
  mutate: [
    "targets/snapshot/**/*.ts",
    "core/*.ts",
    "core/devices/shared-devices.ts",
    "core/devices/write-plug.ts",
    // Checks of the Node version, and log text: nothing a block device's behaviour depends on.
    "!core/node-version.ts",
    "!core/logger.ts",
  ],
  coverageAnalysis: "perTest",
  incremental: true,
  incrementalFile: "reports/mutation/stryker-incremental.json",
  reporters: ["clear-text", "progress", "json", "html"],
  jsonReporter: { fileName: "reports/mutation/mutation.json" },
  htmlReporter: { fileName: "reports/mutation/mutation.html" },
  concurrency: 2,
  // A mutant times out after 1.5 × its covering tests' dry-run time plus this: enough for a loaded
  // machine, and each timeout (a mutant that loops or never completes a bio) costs no more.
  timeoutMS: 20_000,
  tempDirName: ".stryker-tmp",
  cleanTempDir: "always",
  ignorePatterns: ["dist", "reports", "node_modules/.cache", "bench/results*", ".stryker-tmp"],
};
