/**
 * udmd: holds the mapped devices and their backing devices, answers the control socket and
 * exports every device over NBD. One process per run directory.
 */
import fs from "node:fs";
import { createDeviceMapper } from "../../index.js";
import type { DeviceMapper } from "../../core/device-mapper.js";
import type { IoOptions } from "../../core/devices/block-device.js";
import { DmError } from "../../core/errors.js";
import { type LineLogger, lineLogger, type LogFormat, type LogLevel } from "../../core/logger.js";
import { attachExports } from "../attach/attach-exports.js";
import { Attacher } from "../attach/attacher.js";
import { ControlServer, type DaemonHooks } from "../control/server.js";
import { NbdServer, type NbdTlsOptions } from "../../nbd/server.js";
import { acquireInstanceLock } from "./instance-lock.js";
import { checkListenAddress, parseListen } from "./nbd-listen.js";
import { captureState, restoreDevices, StateFile } from "./device-state.js";
import { ensureRunDir, type RunPaths } from "./run-dir.js";

export interface DaemonOptions {
  paths: RunPaths;
  plugins?: string[];
  logLevel?: LogLevel;
  /** JSON lines (the default) or text lines for a person (core/logger.ts). */
  logFormat?: LogFormat;
  /**
   * `[HOST:]PORT` for an extra TCP NBD listener (default host 127.0.0.1). Anything but a loopback
   * address needs `tls.mode` "require".
   */
  nbdListen?: string;
  /**
   * NBD TLS (STARTTLS): the TCP listener's mode and credentials. The unix socket offers TLS
   * whenever the mode is not "off" but never requires it (it is mode 0600; attach uses it plain).
   */
  tls?: NbdTlsOptions;
  /** Close NBD connections still in the handshake after this long (default 10 s; 0: never). */
  nbdHandshakeTimeoutMs?: number;
  /** NBD connections at once, all sockets (default 1024, capped below RLIMIT_NOFILE). */
  nbdMaxConnections?: number;
  /** NBD connections at once from one TCP client address (default 16). */
  nbdMaxClientConnections?: number;
  logStream?: { write(line: string): unknown };
  /** Where `attach` puts its NAME → kernel device symlinks (default /dev/udm). */
  devDir?: string;
  /** Attach every device when it gets a live table; detach it on remove. */
  autoAttach?: boolean;
  /** How backing devices do their I/O (DeviceMapperOptions.io). */
  io?: IoOptions;
  /** Large NBD READ replies by sendfile (NbdServerOptions.zeroCopy; default on where supported). */
  zeroCopy?: boolean;
  /**
   * Re-create the devices a previous daemon on this run directory left (it was killed or crashed;
   * a daemon that stops cleanly removes its devices and their record). Default true.
   */
  restore?: boolean;
  /** Extra hooks (attach/detach) provided by the attach module. */
  hooks?: (daemon: Daemon) => Partial<DaemonHooks>;
}

export class Daemon {
  readonly dm: DeviceMapper;
  readonly logger: LineLogger;
  private control!: ControlServer;
  nbd!: NbdServer;
  attacher!: Attacher;
  private unlock: (() => void) | null = null;
  private stateFile!: StateFile;
  private stopping: Promise<void> | null = null;
  tcpAddress: { host: string; port: number } | null = null;

  constructor(readonly opts: DaemonOptions) {
    const format = opts.logFormat ?? "json";
    // Every JSON line says whose it is; a person at udmd's terminal knows.
    const base = format === "json" ? { component: "udmd" } : {};
    this.logger = lineLogger(format, opts.logLevel ?? "info", opts.logStream ?? process.stderr, base);
    this.dm = createDeviceMapper({ logger: this.logger, io: opts.io });
  }

  /** Load plugins, take the run directory, start listening. Fails without side effects left behind. */
  async start(): Promise<void> {
    const { paths } = this.opts;
    // Plugins first: a daemon that cannot load one must not start half-configured.
    for (const plugin of this.opts.plugins ?? []) {
      const names = await this.dm.loadPlugin(plugin);
      this.logger.info("plugin loaded", { plugin, targets: names });
    }
    // Refused before anything is taken or listens: a plaintext export off this machine.
    const tls = this.opts.tls ?? { mode: "off" };
    const tcp = this.opts.nbdListen ? parseListen(this.opts.nbdListen) : null;
    if (tcp) await checkListenAddress(this.opts.nbdListen!, tcp, tls.mode);
    ensureRunDir(paths.dir);
    this.unlock = acquireInstanceLock(paths, [paths.control, paths.nbd, paths.attachNbd]);
    try {
      this.nbd = new NbdServer(
        { list: () => this.dm.list(), get: (name) => (this.dm.has(name) ? this.dm.device(name) : undefined) },
        {
          logger: this.logger,
          zeroCopy: this.opts.zeroCopy,
          tls,
          handshakeTimeoutMs: this.opts.nbdHandshakeTimeoutMs,
          maxConnections: this.opts.nbdMaxConnections,
          maxConnectionsPerClient: this.opts.nbdMaxClientConnections,
        },
      );
      await this.nbd.listenUnix(paths.nbd, { tls: tls.mode === "off" ? "off" : "on" });
      // Attach's own clients (nbdfuse, kernel nbd) connect here: not opens of the device.
      await this.nbd.listenUnix(paths.attachNbd, { tls: "off", exports: attachExports(this.dm) });
      if (tcp) this.tcpAddress = await this.nbd.listenTcp({ ...tcp, tls: tls.mode });
      if (tcp && tls.mode !== "require") {
        // Loopback is not private: every local user can connect to it (docs/security.md).
        this.logger.warn("nbd: TCP listener without --tls=require: every local user can read and write every device");
      }
      this.attacher = new Attacher({
        dm: this.dm,
        logger: this.logger,
        runDir: paths.dir,
        nbdSocket: paths.attachNbd,
        nbdExportIdle: (name) => this.nbd.exportIdle(name),
        devDir: this.opts.devDir ?? "/dev/udm",
        auto: this.opts.autoAttach ?? false,
      });
      const hooks: DaemonHooks = {
        nbdUri: (name) => this.nbdUri(name),
        ...this.attacher.hooks(),
        beforeRemove: async (name, force) => {
          await this.attacher.beforeRemove(name, force);
          const clients = this.nbd.connectionCount(name);
          if (clients > 0 && !force) throw new DmError("EBUSY", `${name}: ${clients} NBD client(s) connected`);
          if (force) await this.nbd.closeExport(name);
        },
        renamed: async (oldName, newName) => {
          // Before the attacher: detach waits for the export's connections by its new name.
          this.nbd.renameExport(oldName, newName);
          await this.attacher.renamed(oldName, newName);
        },
        changed: () => this.saveState(),
        ...this.opts.hooks?.(this),
      };
      await this.attacher.recoverLeftovers();
      this.stateFile = new StateFile(paths.state);
      await this.restoreState();
      this.control = new ControlServer(this.dm, this.logger, hooks);
      await this.control.listen(paths.control);
    } catch (err) {
      await this.nbd?.close().catch(() => undefined);
      this.unlock();
      this.unlock = null;
      throw err;
    }
    const limits = this.nbd.connectionLimits;
    this.logger.info("udmd started", {
      runDir: paths.dir,
      pid: process.pid,
      nbd: paths.nbd,
      tcp: this.tcpAddress,
      tls: tls.mode,
      nbdMaxConnections: limits.total,
      nbdMaxClientConnections: limits.perClient,
    });
  }

  /** Bring back what the previous daemon left (unless told not to), then record the devices now held. */
  private async restoreState(): Promise<void> {
    let state = null;
    if (this.opts.restore ?? true) {
      try {
        state = this.stateFile.load();
      } catch (err) {
        const aside = `${this.stateFile.file}.unreadable`;
        fs.renameSync(this.stateFile.file, aside);
        this.logger.error("device state unreadable, starting without devices", {
          error: (err as Error).message,
          movedTo: aside,
        });
      }
    }
    if (state && state.devices.length > 0) {
      const result = await restoreDevices(this.dm, state, this.logger, (name) =>
        this.attacher.attach(name).then(() => {}),
      );
      this.logger.info("devices restored", { restored: result.restored, failed: result.failed });
    }
    this.saveState();
  }

  /** Record the devices (after every change): what a daemon restarted after a crash re-creates. */
  saveState(): void {
    try {
      this.stateFile.save(captureState(this.dm, (name) => this.attacher.attachedPath(name) !== undefined));
    } catch (err) {
      this.logger.error("device state could not be saved", {
        file: this.stateFile.file,
        error: (err as Error).message,
      });
    }
  }

  nbdUri(name: string): string {
    const q = `socket=${this.opts.paths.nbd}`;
    return `nbd+unix:///${encodeURIComponent(name)}?${q}`;
  }

  /** Stop accepting, flush every device, remove them (closing backing files), release the run dir. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.logger.info("udmd stopping");
      await this.control?.close().catch(() => undefined);
      await this.attacher?.detachAll(); // while the NBD server still serves their last writes
      // I/O held by a suspended device would hold up everything stacked above it (their flushes,
      // their removal) and the NBD requests waiting on it: it fails instead.
      this.dm.failQueuedIo();
      await this.nbd?.close().catch(() => undefined);
      for (const name of this.dm.list()) {
        const md = this.dm.device(name);
        if (md.live && !md.suspended) {
          const h = this.dm.open(name);
          await h
            .flush()
            .catch((err) => this.logger.error("flush failed at shutdown", { device: name, error: String(err) }));
          await h.close();
        }
      }
      await this.dm.close();
      // The devices were removed on purpose: nothing for a next daemon to restore.
      this.stateFile?.remove();
      for (const f of [this.opts.paths.control, this.opts.paths.nbd]) fs.rmSync(f, { force: true });
      this.unlock?.();
      this.logger.info("udmd stopped");
    })();
    return this.stopping;
  }
}
