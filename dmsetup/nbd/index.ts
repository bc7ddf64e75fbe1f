/** The NBD export: `NbdServer` serves mapped devices to qemu, nbd-client, libnbd tools... */
export { NbdServer, type NbdServerOptions, deviceMapperExports } from "./server.js";
export type { ExportDevice, ExportProvider } from "./connection.js";
export { MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, nbdErrorFor } from "./connection.js";
export * from "./protocol.js";
