/** The NBD export: `NbdServer` serves mapped devices to qemu, nbd-client, libnbd tools... */
import "../core/node-version.js";
export { NbdServer, type NbdServerOptions, type NbdTlsMode, type NbdTlsOptions, TLS_MODES } from "./server.js";
export { parsePskFile } from "./tls.js";
export {
  type ExportDevice,
  type ExportProvider,
  MIN_BLOCK_SIZE,
  PREFERRED_BLOCK_SIZE,
  deviceMapperExports,
  nbdErrorFor,
} from "./exports.js";
export * from "./protocol.js";
