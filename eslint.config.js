// ESLint (typescript-eslint) for the whole tree; `npm run lint` runs it with Prettier's check.
import js from "@eslint/js";
import tseslint from "typescript-eslint";

/**
 * A no-restricted-imports rule for `files`: relative imports that climb into one of the top-level
 * folders matched by `folders` (or the root index.ts) are refused; `regex` replaces that test.
 */
function layer(files, message, folders, regex) {
  const pattern = regex ?? `^(\\.\\./)+(${folders}|index\\.js$)`;
  return { files, rules: { "no-restricted-imports": ["error", { patterns: [{ regex: pattern, message }] }] } };
}

export default tseslint.config(
  { ignores: ["dist/**", "node_modules/**", "reports/**", ".stryker-tmp/**"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      // Promises: a dropped rejection is a lost I/O error or a crashed daemon.
      "@typescript-eslint/no-floating-promises": "error",
      "@typescript-eslint/no-misused-promises": "error",
      "@typescript-eslint/await-thenable": "error",
      // A switch over a union (bio ops, target results, NBD commands) must name every member.
      "@typescript-eslint/switch-exhaustiveness-check": ["error", { considerDefaultExhaustiveForUnions: true }],
      "@typescript-eslint/no-unused-vars": [
        "error",
        { argsIgnorePattern: "^_", varsIgnorePattern: "^_", caughtErrors: "none" },
      ],
    },
  },
  // Layering (docs/architecture.md, "A tour of the tree"): each folder imports only from those below it.
  layer(["core/**/*.ts"], "core/ imports only core/", "(targets|nbd|dmsetup|testing|test|bench)/"),
  layer(["core/sys/**/*.ts"], "core/sys/ imports nothing else of udm", null, "^\\.\\./"),
  layer(["targets/**/*.ts"], "targets/ import only core/", "(nbd|dmsetup|testing|test|bench)/"),
  layer(["nbd/**/*.ts"], "nbd/ imports only core/", "(targets|dmsetup|testing|test|bench)/"),
  layer(
    ["dmsetup/**/*.ts"],
    "dmsetup/ does not import tests, the test kit or benchmarks",
    null,
    "^(\\.\\./)+(test|testing|bench)/",
  ),
  // The test kit (udm/testing) ships in the package: the library and its targets, nothing else.
  layer(
    ["testing/**/*.ts"],
    "testing/ imports only core/, targets/ and index.ts",
    null,
    "^(\\.\\./)+(nbd|dmsetup|test|bench)/",
  ),
  {
    // The plugin template's tests: its tsconfig builds src/ only, so they are in no project.
    files: ["examples/*/test/**/*.ts"],
    ...tseslint.configs.disableTypeChecked,
  },
  {
    // Plain JavaScript (plugin fixtures, scripts, this file): not part of any tsconfig project.
    files: ["**/*.js", "**/*.mjs"],
    ...tseslint.configs.disableTypeChecked,
  },
  {
    files: ["**/*.js", "**/*.mjs"],
    languageOptions: { globals: { process: "readonly", console: "readonly", Buffer: "readonly", URL: "readonly" } },
  },
);
