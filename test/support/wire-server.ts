/**
 * An in-process NBD server on a unix socket in a fresh directory, over a test device mapper whose
 * backing devices the test adds (RAM disks, files), with a MemoryLogger; plus the WireClients a
 * test opens, destroyed at stop. Shared by the wire-level NBD tests.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { MemoryLogger } from "../../core/logger.js";
import { NbdServer, deviceMapperExports } from "../../nbd/server.js";
import { type NamedBacking, testMapper } from "../../testing/memory-backing.js";
import { type ConnectOptions, WireClient } from "./nbd-client.js";

export interface WireServer {
  dir: string;
  sock: string;
  dm: DeviceMapper;
  backing: NamedBacking;
  server: NbdServer;
  logger: MemoryLogger;
  /** Open clients, destroyed by stopWireServer (tests may add their own). */
  clients: WireClient[];
  connect(name: string, opts?: ConnectOptions): Promise<WireClient>;
}

export async function startWireServer(prefix: string): Promise<WireServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const sock = path.join(dir, "nbd.sock");
  const { dm, backing } = testMapper();
  const logger = new MemoryLogger();
  const server = new NbdServer(deviceMapperExports(dm), { logger, closeGraceMs: 500 });
  await server.listenUnix(sock);
  const clients: WireClient[] = [];
  const connect = async (name: string, opts: ConnectOptions = {}): Promise<WireClient> => {
    const c = await WireClient.connect(sock, name, opts);
    clients.push(c);
    return c;
  };
  return { dir, sock, dm, backing, server, logger, clients, connect };
}

export async function stopWireServer(w: WireServer): Promise<void> {
  for (const c of w.clients.splice(0)) c.destroy();
  await w.server.close();
  await w.dm.close();
  for (const dev of w.backing.devices.values()) await dev.close();
  fs.rmSync(w.dir, { recursive: true, force: true });
}
