/**
 * Builds the test VM's cache and initramfs ahead of a test run (the VM tests do the same when the
 * cache is missing):
 *
 *   node --import tsx test/vm/build-image.ts [--refresh]
 *
 * --refresh downloads the packages again (a newer kernel, say). UDM_VM_CACHE moves the cache.
 */
import { ensureVmImage, vmUnavailableReason } from "./image.js";

const reason = vmUnavailableReason();
if (reason) {
  console.error(`vm image: cannot build: ${reason}`);
  process.exit(1);
}
const started = Date.now();
const image = ensureVmImage({ refresh: process.argv.includes("--refresh"), log: (line) => console.log(line) });
console.log(`kernel ${image.kernelVersion}: ${image.kernel}`);
console.log(`initramfs: ${image.initramfs}`);
console.log(`ready in ${Date.now() - started} ms`);
