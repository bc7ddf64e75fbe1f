/**
 * The daemon side of the control protocol: one request → one DeviceMapper operation → one
 * response. A bad request gets an error response; it never takes the daemon down.
 */
import fs from "node:fs";
import net from "node:net";
import type { DeviceMapper, DeviceInfo } from "../../core/device-mapper.js";
import { DmError } from "../../core/errors.js";
import { peerCredentials, socketFd } from "../../core/sys/socket.js";
import type { Logger } from "../../core/logger.js";
import { GeometryStore, parseGeometry } from "./geometry.js";
import { type RemoteDeviceInfo, remoteDevices } from "./remote-devices.js";
import {
  type CreateStep,
  type Request,
  type Response,
  LineSplitter,
  MAX_REQUEST_BYTES,
  parseRequest,
  ProtocolError,
  PROTOCOL_VERSION,
} from "./protocol.js";

export const DRIVER_VERSION = "4.48.0";
export const LIBRARY_VERSION = "1.02.214-udm (2026-11-21)";

/** What the daemon adds to the core: NBD URIs, attach/detach, forced disconnects. */
export interface DaemonHooks {
  nbdUri?(name: string): string | undefined;
  /** Called before a device is removed (e.g. to end NBD connections on a forced remove). */
  beforeRemove?(name: string, force: boolean): Promise<void>;
  /** `remove --deferred` marked the device, in use: its last user will remove it. */
  deferredRemoveMarked?(name: string): void;
  attach?(name: string): Promise<{ path: string }>;
  detach?(name: string, force: boolean): Promise<void>;
  attachedPath?(name: string): string | undefined;
  /** Called after a create with a table and after every resume: the device has a live table. */
  activated?(name: string): Promise<void>;
  /** Called after a rename: what is keyed by the device's name (exports, symlinks) follows it. */
  renamed?(oldName: string, newName: string): Promise<void>;
  /** Called after every request that may have changed a device (its outcome does not matter). */
  changed?(): void;
}

/** Requests that can change a device's name, tables, state or attachment. */
const CHANGING_OPS: ReadonlySet<string> = new Set([
  "create",
  "load",
  "clear",
  "suspend",
  "resume",
  "remove",
  "remove-all",
  "rename",
  "attach",
  "detach",
]);

export class ControlServer {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private readonly geometries = new GeometryStore();

  constructor(
    private readonly dm: DeviceMapper,
    private readonly logger: Logger,
    private readonly hooks: DaemonHooks = {},
    /** Peers allowed besides root: the daemon's own uid. */
    private readonly allowedUid = process.getuid?.() ?? 0,
  ) {
    this.server = net.createServer((socket) => this.accept(socket));
  }

  listen(path: string): Promise<void> {
    return this.listenWith((cb) => this.server.listen(path, cb)).then(() => fs.chmodSync(path, 0o600));
  }

  /**
   * Serve on a unix socket that already listens, made by someone else (systemd's socket
   * activation). Its file and mode are its maker's: nothing here changes or removes them.
   */
  listenFd(fd: number): Promise<void> {
    return this.listenWith((cb) => this.server.listen({ fd }, cb));
  }

  private listenWith(start: (cb: () => void) => void): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once("error", reject);
      start(() => {
        this.server.off("error", reject);
        resolve();
      });
    });
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  private accept(socket: net.Socket): void {
    // Tracked from the start, refused ones included, so close() never waits on a connection.
    this.sockets.add(socket);
    socket.on("close", () => this.sockets.delete(socket));
    socket.on("error", () => undefined);
    try {
      const cred = peerCredentials(socketFd(socket) ?? -1);
      if (cred.uid !== 0 && cred.uid !== this.allowedUid) {
        this.logger.warn("control client refused", { uid: cred.uid, pid: cred.pid });
        socket.end(
          JSON.stringify({
            id: 0,
            ok: false,
            errno: "EACCES",
            message: "Permission denied: not the daemon's user or root",
          }) + "\n",
        );
        return;
      }
    } catch (err) {
      this.logger.error("cannot read control client credentials", { error: (err as Error).message });
      socket.destroy();
      return;
    }
    const splitter = new LineSplitter();
    socket.on("data", (chunk: Buffer) => {
      let lines: string[];
      try {
        lines = splitter.push(chunk);
      } catch (err) {
        this.reply(socket, { id: 0, ok: false, errno: "EINVAL", message: (err as Error).message });
        socket.end();
        return;
      }
      for (const line of lines) if (line.trim() !== "") void this.handleLine(socket, line);
    });
  }

  private async handleLine(socket: net.Socket, line: string): Promise<void> {
    let id = 0;
    try {
      const req = parseRequest(line);
      id = req.id;
      let result: unknown;
      try {
        result = await this.execute(req);
      } finally {
        if (CHANGING_OPS.has(req.op)) this.hooks.changed?.();
      }
      this.reply(socket, { id, ok: true, result: result ?? null });
    } catch (err) {
      const errno =
        err instanceof DmError
          ? err.errno
          : err instanceof ProtocolError
            ? "EINVAL"
            : ((err as { code?: string }).code ?? "EIO");
      if (err instanceof ProtocolError) id = err.id;
      if (!(err instanceof DmError) && !(err instanceof ProtocolError)) {
        this.logger.error("control request failed unexpectedly", { error: (err as Error).stack ?? String(err) });
      }
      const step = (err as { step?: CreateStep }).step;
      this.reply(socket, { id, ok: false, errno, message: (err as Error).message, ...(step ? { step } : {}) });
    }
  }

  private reply(socket: net.Socket, response: Response): void {
    if (socket.destroyed) return;
    let line = JSON.stringify(response) + "\n";
    if (Buffer.byteLength(line) > MAX_REQUEST_BYTES) {
      const message = `response of ${Buffer.byteLength(line)} bytes is over the control protocol's limit of ${MAX_REQUEST_BYTES} bytes`;
      line = JSON.stringify({ id: response.id, ok: false, errno: "E2BIG", message }) + "\n";
    }
    socket.write(line);
  }

  /** Run one request. Public for in-process use and tests. */
  async execute(req: Request): Promise<unknown> {
    const dm = this.dm;
    const name = (req as { name?: string }).name as string;
    this.logger.debug("control request", { op: req.op, name });
    switch (req.op) {
      case "version":
        return { driver: DRIVER_VERSION, library: LIBRARY_VERSION, protocol: PROTOCOL_VERSION };
      case "create": {
        // Device, table and resume in one request: the daemon undoes a failed create itself, so
        // nothing is left behind whatever happens to the client (DM_DEV_CREATE, DM_TABLE_LOAD,
        // resume as `dmsetup create` issues them).
        const r = req as Request<"create">;
        await atStep("create", dm.create(r.name, { uuid: r.uuid }));
        if (r.table) {
          try {
            await atStep("load", dm.load(r.name, r.table, { readOnly: r.readOnly }));
            await atStep("resume", dm.resume(r.name));
          } catch (err) {
            await dm.remove(r.name, { force: true }).catch(() => undefined);
            throw err;
          }
        }
        this.logger.info("create", { device: r.name });
        if (r.table) await this.hooks.activated?.(r.name);
        return this.info(r.name);
      }
      case "load": {
        const r = req as Request<"load">;
        await dm.load(r.name, r.table, { readOnly: r.readOnly });
        return this.info(r.name);
      }
      case "clear":
        await dm.clear(name);
        return this.info(name);
      case "suspend": {
        const r = req as Request<"suspend">;
        await dm.suspend(r.name, { noflush: r.noflush });
        return this.info(r.name);
      }
      case "resume": {
        const r = req as Request<"resume">;
        await dm.resume(r.name, { noflush: r.noflush });
        this.geometries.resumed(dm.device(r.name));
        await this.hooks.activated?.(r.name);
        return this.info(r.name);
      }
      case "remove": {
        const r = req as Request<"remove">;
        // An idle device goes at once, with or without --deferred (through beforeRemove, which
        // detaches it). A busy one is marked: its last opener (an NBD client, a table, a user of
        // the attached kernel device) removes it.
        if (r.deferred && !r.force && dm.device(r.name).inUse) {
          await dm.remove(r.name, { deferred: true });
          this.hooks.deferredRemoveMarked?.(r.name);
          this.logger.info("remove", { device: r.name, deferred: true });
          return {};
        }
        dm.device(r.name);
        await this.hooks.beforeRemove?.(r.name, r.force ?? false);
        await dm.remove(r.name, { force: r.force });
        this.logger.info("remove", { device: r.name });
        return {};
      }
      case "remove-all": {
        const r = req as Request<"remove-all">;
        // Passes until one removes nothing (libdm's _remove_all, the kernel's dm_hash_remove_all
        // retry): a device held by another goes once its holder has gone in an earlier pass.
        let left = dm.list();
        for (;;) {
          for (const name of left) {
            try {
              await this.execute({ id: req.id, op: "remove", name, force: r.force } as Request);
            } catch {
              // still held, or gone meanwhile: the next pass looks again
            }
          }
          const now = dm.list();
          if (now.length === 0 || now.length >= left.length) return { left: now.length };
          left = now;
        }
      }
      case "rename": {
        const r = req as Request<"rename">;
        if (r.newUuid !== undefined) {
          await dm.setUuid(r.name, r.newUuid);
          return this.info(r.name);
        }
        if (r.newName === undefined) throw new DmError("EINVAL", "rename: newName or newUuid required");
        await dm.rename(r.name, r.newName);
        await this.hooks.renamed?.(r.name, r.newName);
        return this.info(r.newName);
      }
      case "list": {
        const r = req as Request<"list">;
        return dm
          .list()
          .filter((name) => !r.target || dm.table(name).some((l) => l.type === r.target))
          .map((name) => {
            const i = dm.info(name);
            return { name, uuid: i.uuid, major: i.major, minor: i.minor, eventNr: i.eventNr, deps: this.deps(name) };
          });
      }
      case "info":
        return this.info(name, (req as Request<"info">).inactive);
      case "table":
        return dm.table(name, { inactive: (req as Request<"table">).inactive });
      case "status": {
        const r = req as Request<"status">;
        return dm.status(r.name, { inactive: r.inactive, noflush: r.noflush });
      }
      case "message": {
        const r = req as Request<"message">;
        return { output: (await dm.message(r.name, r.sector, r.message)) ?? null };
      }
      case "targets":
        return dm.targets().map((t) => ({ name: t.name, version: t.version }));
      case "deps":
        return this.deps(name, (req as Request<"deps">).inactive);
      case "wait": {
        // As DM_DEV_WAIT: the device is found by name once; it may be renamed while we wait.
        const r = req as Request<"wait">;
        const md = dm.device(r.name);
        await md.waitEvent(r.eventNr);
        if (md.removed) throw new DmError("ENXIO", `${r.name}: device was removed`);
        return { info: this.info(md.name), status: dm.status(md.name) };
      }
      case "setgeometry": {
        const r = req as Request<"setgeometry">;
        const md = dm.device(r.name);
        this.geometries.set(md, parseGeometry(r.geometry));
        return {};
      }
      case "geometry":
        return this.geometries.get(dm.device(name));
      case "load-plugin": {
        const r = req as Request<"load-plugin">;
        const targets = await dm.loadPlugin(r.module, r.baseDir);
        return { targets, file: dm.plugins().find((p) => p.targets.includes(targets[0]!))!.file };
      }
      case "list-plugins":
        return dm.plugins();
      case "attach": {
        if (!this.hooks.attach) throw new DmError("EOPNOTSUPP", "this daemon cannot attach devices");
        return this.hooks.attach(name);
      }
      case "detach": {
        if (!this.hooks.detach) throw new DmError("EOPNOTSUPP", "this daemon cannot detach devices");
        await this.hooks.detach(name, (req as Request<"detach">).force ?? false);
        return {};
      }
    }
  }

  private info(
    name: string,
    inactive?: boolean,
  ): DeviceInfo & { nbdUri?: string; attached?: string; remote?: RemoteDeviceInfo[] } {
    const info = this.dm.info(name, { inactive });
    // The NBD exports the table uses, with their connection state (absent when it uses none).
    const remote = remoteDevices(this.dm.deps(name, { inactive }));
    return {
      ...info,
      nbdUri: this.hooks.nbdUri?.(name),
      attached: this.hooks.attachedPath?.(name),
      ...(remote.length > 0 ? { remote } : {}),
    };
  }

  private deps(
    name: string,
    inactive?: boolean,
  ): ({ major: number; minor: number; name?: string } | { path: string })[] {
    return this.dm.deps(name, { inactive }).map((d) => {
      if (!d.devno) return { path: d.tableName };
      const md = this.dm
        .list()
        .find((n) => this.dm.info(n).minor === d.devno!.minor && d.devno!.major === this.dm.info(n).major);
      return md ? { ...d.devno, name: md } : { ...d.devno };
    });
  }
}

/** `op`, with a failure marked as that of `step`. */
async function atStep<T>(step: CreateStep, op: Promise<T>): Promise<T> {
  try {
    return await op;
  } catch (err) {
    throw Object.assign(err as Error, { step });
  }
}
