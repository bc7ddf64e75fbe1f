/**
 * udmd: holds the mapped devices and their backing devices, answers the control socket and
 * exports every device over NBD. One process per run directory.
 */
import fs from "node:fs";
import path from "node:path";
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
import type { PassedSocket } from "./listen-fds.js";
import { checkListenAddress, parseListen } from "./nbd-listen.js";
import { type AssignedSockets, assignPassedSockets, type UnixListener } from "./passed-sockets.js";
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
  /**
   * Listening sockets a service manager made (systemd socket activation; udmd's command line reads
   * them from LISTEN_FDS, listen-fds.ts). udmd serves on them instead of making its own control
   * and NBD sockets, and leaves their files alone; passed-sockets.ts says which is which.
   */
  passedSockets?: PassedSocket[];
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
  /** The sockets the service manager passed, by use (none passed: all empty). */
  private passed: AssignedSockets = { control: null, nbdUnix: [], nbdTcp: [], nbdListenPassed: false };

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
    // Refused before anything is taken or listens: a plaintext export off this machine, a passed
    // socket udmd cannot serve or cannot tell the use of.
    const tls = this.opts.tls ?? { mode: "off" };
    const tcp = this.opts.nbdListen ? parseListen(this.opts.nbdListen) : null;
    if (tcp) await checkListenAddress(`--nbd-listen ${this.opts.nbdListen}`, tcp, tls.mode);
    const passed = assignPassedSockets(this.opts.passedSockets ?? [], { control: paths.control, nbd: paths.nbd, tcp });
    for (const listener of passed.nbdTcp) await checkListenAddress(listener.label, listener, tls.mode);
    this.passed = passed;
    ensureRunDir(paths.dir);
    // The service manager's socket files are not leftovers: it keeps them across our restarts.
    const ours = (file: string) => !this.passedFiles().includes(file);
    this.unlock = acquireInstanceLock(paths, [paths.control, paths.nbd, paths.attachNbd].filter(ours));
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
      const unixTls = tls.mode === "off" ? "off" : "on";
      for (const listener of passed.nbdUnix) await this.nbd.listenFd(listener.fd, { tls: unixTls });
      // Clients need a path for their URIs: an abstract socket (@name) has none.
      if (!passed.nbdUnix.some(hasFile)) await this.nbd.listenUnix(paths.nbd, { tls: unixTls });
      // Attach's own clients (nbdfuse, kernel nbd) connect here: not opens of the device.
      await this.nbd.listenUnix(paths.attachNbd, { tls: "off", exports: attachExports(this.dm) });
      for (const listener of passed.nbdTcp) await this.nbd.listenFd(listener.fd, { tls: tls.mode });
      // A passed socket on the --nbd-listen address is that listener, already bound.
      if (tcp && !passed.nbdListenPassed) this.tcpAddress = await this.nbd.listenTcp({ ...tcp, tls: tls.mode });
      else if (passed.nbdTcp[0]) this.tcpAddress = { host: passed.nbdTcp[0].host, port: passed.nbdTcp[0].port };
      if ((tcp || passed.nbdTcp.length > 0) && tls.mode !== "require") {
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
      if (passed.control) await this.control.listenFd(passed.control.fd);
      else await this.control.listen(paths.control);
    } catch (err) {
      await this.nbd?.close().catch(() => undefined);
      this.unlock();
      this.unlock = null;
      throw err;
    }
    this.warnAboutPassedSockets();
    const limits = this.nbd.connectionLimits;
    this.logger.info("udmd started", {
      runDir: paths.dir,
      pid: process.pid,
      nbd: this.nbdSocket,
      tcp: this.tcpAddress,
      ...(this.opts.passedSockets?.length ? { passedSockets: this.passedDescription() } : {}),
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

  /**
   * The unix socket NBD clients connect to: the first one passed for NBD with a file (not an
   * abstract address), else RUN_DIR/nbd.sock.
   */
  get nbdSocket(): string {
    return this.passed.nbdUnix.find(hasFile)?.path ?? this.opts.paths.nbd;
  }

  /** The control socket: the one passed, else RUN_DIR/control. */
  get controlSocket(): string {
    return this.passed.control?.path ?? this.opts.paths.control;
  }

  /** The socket files of the passed sockets (abstract addresses have none). */
  private passedFiles(): string[] {
    const { control, nbdUnix } = this.passed;
    return [...(control ? [control] : []), ...nbdUnix].filter(hasFile).map((l) => l.path);
  }

  /** What a socket unit may have got wrong that still lets udmd serve. */
  private warnAboutPassedSockets(): void {
    const { control, nbdUnix } = this.passed;
    if (control && path.resolve(control.path) !== path.resolve(this.opts.paths.control)) {
      // udmsetup finds the daemon by its run directory.
      this.logger.warn("control socket passed outside the run directory: udmsetup looks for its own", {
        socket: control.path,
        udmsetup: this.opts.paths.control,
      });
    }
    for (const { path: file } of nbdUnix) {
      // Connecting needs write permission on the file; the NBD socket checks nobody's credentials.
      const mode = fs.statSync(file, { throwIfNoEntry: false })?.mode;
      if (mode !== undefined && (mode & 0o022) !== 0) {
        this.logger.warn("nbd: passed socket is writable by others: they can read and write every device", {
          socket: file,
          mode: (mode & 0o777).toString(8).padStart(4, "0"),
          fix: "SocketMode=0600",
        });
      }
    }
  }

  /** For the log: which passed socket serves what. */
  private passedDescription(): string[] {
    const { control, nbdUnix, nbdTcp } = this.passed;
    return [
      ...(control ? [`control: fd ${control.fd} ${control.path}`] : []),
      ...nbdUnix.map((l) => `nbd: fd ${l.fd} ${l.path}`),
      ...nbdTcp.map((l) => `nbd: ${l.label}`),
    ];
  }

  nbdUri(name: string): string {
    const q = `socket=${this.nbdSocket}`;
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
      // Only the files this daemon made: a passed socket's file belongs to the service manager.
      for (const f of [this.opts.paths.control, this.opts.paths.nbd]) {
        if (!this.passedFiles().includes(f)) fs.rmSync(f, { force: true });
      }
      this.unlock?.();
      this.logger.info("udmd stopped");
    })();
    return this.stopping;
  }
}

/** A unix socket with a file; an abstract one (`@name`) has none. */
function hasFile(listener: UnixListener): boolean {
  return !listener.path.startsWith("@");
}
