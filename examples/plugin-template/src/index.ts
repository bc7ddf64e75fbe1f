// The plugin's entry (package.json "exports"): udmd --plugin registers every target class it exports.
export { CountingTarget } from "./counting.js";
