/**
 * `udmsetup attach NAME`: expose a mapped device as a kernel block device for mkfs and mount.
 *
 * With the kernel's nbd module (/dev/nbd0 exists) a /dev/nbdN is connected to the device's NBD
 * export (kernel-nbd.ts). Otherwise the export becomes a file through nbdfuse and a loop device
 * is bound to that file (nbdfuse.ts, loop-device.ts). Either way `$devDir/NAME`
 * (default /dev/udm/NAME) is a symlink to the kernel device, so that with devDir=/dev/mapper on a
 * machine without kernel device-mapper, scripts written for dmsetup find their devices.
 *
 * With `auto`, every device is attached when it gets a live table (create, resume) and detached
 * on remove. Detaching refuses with EBUSY while the kernel device is mounted or held (dmsetup's
 * "Device or resource busy"), unless forced: then the kernel finishes lazily when it is let go.
 *
 * The kernel device must behave like /dev/dm-N, so nothing between it and udm's tables may cache:
 * the loop device does direct I/O on the nbdfuse file (no FUSE page cache serving what an older
 * table returned), and udmd does not keep the kernel device open (the kernel drops its page cache
 * on the last close, as for a dm device). Its users are the mapped device's openers: they count
 * in its open count (kernel-openers.ts), attach's own NBD connections do not (attach-exports.ts),
 * and a device marked for deferred removal is detached and removed once they have all gone.
 */
import fs from "node:fs";
import path from "node:path";
import type { DeviceMapper } from "../../core/device-mapper.js";
import { type Devno, decodeDevno } from "../../core/devices/kernel-block-device.js";
import { DmError, STRERROR } from "../../core/errors.js";
import type { Logger } from "../../core/logger.js";
import type { MappedDevice } from "../../core/mapped-device.js";
import { Mutex } from "../../core/mutex.js";
import type { DaemonHooks } from "../control/server.js";
import { connectKernelNbd, kernelNbdAvailable } from "./kernel-nbd.js";
import { kernelOpenerCount } from "./kernel-openers.js";
import {
  clearLoopDevice,
  createLoopDevice,
  loopDeviceUnavailableReason,
  releasedLoopsBackedBy,
} from "./loop-device.js";
import { clearNbdfuseLeftovers, mountNbdfuse } from "./nbdfuse.js";

export interface AttacherOptions {
  dm: DeviceMapper;
  logger: Logger;
  /** The daemon's run directory: nbdfuse mounts live in `fuse/NAME/` there. */
  runDir: string;
  /**
   * The NBD unix socket for attach's own connections (nbdfuse, kernel nbd): one whose
   * connections do not count as opens of the device (attach-exports.ts).
   */
  nbdSocket: string;
  /** Resolves once the export's NBD connections (our own nbdfuse's) have closed. */
  nbdExportIdle(name: string): Promise<boolean>;
  /** Where the NAME → device symlinks go, e.g. /dev/udm or /dev/mapper. */
  devDir: string;
  /** Attach on activation, detach on remove. */
  auto: boolean;
  /**
   * How often a device marked for deferred removal is checked for users while attached (the
   * kernel tells no one when a loop or nbd device's last user closes it). Default 200 ms.
   */
  deferredRemovePollMs?: number;
}

interface Attachment {
  /** The kernel device: /dev/loopN or /dev/nbdN. */
  path: string;
  devno: Devno;
  /** The symlink in devDir. */
  link: string;
  /**
   * The kernel device node's owner and mode when it was attached: `udmsetup -U/-G/-M` change
   * them, and the next device bound to the same /dev/loopN must not inherit that.
   */
  node: { uid: number; gid: number; mode: number };
  /** Undo the kernel side; `force`: lazily, even while it is in use. */
  teardown(force: boolean): Promise<void>;
}

export class Attacher {
  /** By device object rather than name, so a renamed device can still be detached. */
  private readonly attached = new Map<MappedDevice, Attachment>();
  private readonly mutex = new Mutex();
  /** Attached devices marked for deferred removal, waiting for their kernel device's users to go. */
  private readonly deferred = new Set<MappedDevice>();
  private deferredTimer: NodeJS.Timeout | null = null;

  constructor(private readonly opts: AttacherOptions) {}

  /** The hooks the control server calls. */
  hooks(): Pick<DaemonHooks, "attach" | "detach" | "attachedPath" | "activated" | "deferredRemoveMarked"> {
    return {
      deferredRemoveMarked: (name) => this.watchDeferredRemove(name),
      attach: (name) => this.attach(name),
      detach: (name, force) => this.detach(name, force),
      attachedPath: (name) => this.attachedPath(name),
      activated: async (name) => {
        if (!this.opts.auto || this.attachedPath(name)) return;
        // As udev: a failure to make the node does not fail the create; it is logged.
        await this.attach(name).catch((err: Error) =>
          this.opts.logger.error("auto-attach failed", { device: name, error: err.message }),
        );
      },
    };
  }

  attachedPath(name: string): string | undefined {
    return this.opts.dm.has(name) ? this.attached.get(this.opts.dm.device(name))?.path : undefined;
  }

  /** Attach `name` (or return where it already is). */
  attach(name: string): Promise<{ path: string }> {
    return this.mutex.run(async () => {
      const md = this.opts.dm.device(name);
      const existing = this.attached.get(md);
      if (existing) return { path: existing.path };
      if (!md.live || md.sizeSectors === 0) throw new DmError("EINVAL", `${name}: no live table to attach`);
      const dev = await asDmError(kernelNbdAvailable() ? this.viaKernelNbd(name) : this.viaNbdfuse(md));
      const link = path.join(this.opts.devDir, name);
      let node: Attachment["node"];
      try {
        const st = fs.statSync(dev.path);
        node = { uid: st.uid, gid: st.gid, mode: st.mode & 0o7777 };
        this.makeLink(link, dev.path);
      } catch (err) {
        await dev.teardown(true);
        throw err;
      }
      this.attached.set(md, { ...dev, link, node });
      md.setOutsideOpeners(() => kernelOpenerCount(dev.path, dev.devno));
      this.opts.logger.info("attached", { device: name, path: dev.path, link });
      return { path: dev.path };
    });
  }

  /** The device is now `newName`: its symlink follows (the kernel device stays the same). */
  renamed(oldName: string, newName: string): Promise<void> {
    return this.mutex.run(async () => {
      const a = this.opts.dm.has(newName) ? this.attached.get(this.opts.dm.device(newName)) : undefined;
      if (!a) return;
      const link = path.join(this.opts.devDir, newName);
      try {
        this.makeLink(link, a.path);
      } catch (err) {
        // As udev: the rename itself has happened; a symlink that cannot follow is logged.
        this.opts.logger.error("attached device renamed, but its symlink could not follow", {
          device: newName,
          link,
          error: (err as Error).message,
        });
        return;
      }
      removeLink(a.link, a.path);
      a.link = link;
      this.opts.logger.info("attached device renamed", { from: oldName, device: newName, path: a.path, link });
    });
  }

  /** Undo attach. EBUSY while the kernel device is mounted or held, unless `force`. */
  detach(name: string, force = false): Promise<void> {
    return this.mutex.run(async () => {
      const md = this.opts.dm.device(name);
      const a = this.attached.get(md);
      if (!a) throw new DmError("EINVAL", `${name}: not attached`);
      const busy = await busyReason(a.path);
      if (busy && !force) throw new DmError("EBUSY", `${name}: ${a.path} ${busy}`);
      if (busy)
        this.opts.logger.warn("forced detach of a busy device: finishing lazily", { device: name, path: a.path, busy });
      removeLink(a.link, a.path);
      md.setOutsideOpeners(null);
      await asDmError(a.teardown(force));
      this.attached.delete(md);
      restoreNode(a.path, a.node);
      // So that a `remove` right after finds the export free (and the device closed).
      await this.opts.nbdExportIdle(md.name);
      this.opts.logger.info("detached", { device: md.name, path: a.path });
    });
  }

  /**
   * Before a remove: refuse while attached, unless forced or in auto mode (where remove undoes
   * what create did); then detach (which still refuses while busy, unless forced).
   */
  async beforeRemove(name: string, force: boolean): Promise<void> {
    const attachedAt = this.attachedPath(name);
    if (!attachedAt) return;
    if (!force && !this.opts.auto) throw new DmError("EBUSY", `${name}: attached as ${attachedAt} (detach it first)`);
    await this.detach(name, force);
  }

  /**
   * `remove --deferred` marked attached device `name`: once its kernel device has no users left,
   * detach it and let the core remove it (dm_blk_close's deferred removal).
   */
  watchDeferredRemove(name: string): void {
    const md = this.opts.dm.device(name);
    if (!this.attached.has(md)) return;
    this.deferred.add(md);
    this.deferredTimer ??= setInterval(() => void this.checkDeferred(), this.opts.deferredRemovePollMs ?? 200);
    void this.checkDeferred();
  }

  private async checkDeferred(): Promise<void> {
    for (const md of [...this.deferred]) {
      const a = this.attached.get(md);
      if (!a || md.removed || !md.deferredRemove) {
        this.deferred.delete(md); // detached, removed, or the mark was cancelled
        continue;
      }
      if (kernelOpenerCount(a.path, a.devno) > 0 || (await busyReason(a.path)) !== null) continue;
      this.deferred.delete(md);
      try {
        await this.detach(md.name);
      } catch (err) {
        // Opened again meanwhile: keep waiting.
        if (err instanceof DmError && err.errno === "EBUSY") this.deferred.add(md);
        else
          this.opts.logger.error("deferred removal: detach failed", { device: md.name, error: (err as Error).message });
        continue;
      }
      await md.outsideOpenersClosed();
    }
    if (this.deferred.size === 0 && this.deferredTimer) {
      clearInterval(this.deferredTimer);
      this.deferredTimer = null;
    }
  }

  /**
   * Before anything is attached: clear what a killed daemon left in the run directory. Its loop
   * devices stay bound to its nbdfuse files (udmd does not hold them open, so the kernel does not
   * unbind them when it dies), and its FUSE mounts stay behind.
   */
  async recoverLeftovers(): Promise<void> {
    const fuseRoot = path.join(this.opts.runDir, "fuse");
    for (const loop of releasedLoopsBackedBy(fuseRoot)) {
      await clearLoopDevice(loop).catch((err: Error) =>
        this.opts.logger.warn("could not unbind a loop device left by a previous daemon", {
          path: loop,
          error: err.message,
        }),
      );
      this.opts.logger.info("unbound a loop device left by a previous daemon", { path: loop });
    }
    if (!fs.existsSync(fuseRoot)) return;
    for (const name of fs.readdirSync(fuseRoot)) await clearNbdfuseLeftovers(path.join(fuseRoot, name));
    tryQuietly(() => fs.rmdirSync(fuseRoot));
  }

  /** At daemon shutdown: detach everything, lazily where busy. */
  async detachAll(): Promise<void> {
    if (this.deferredTimer) clearInterval(this.deferredTimer);
    this.deferredTimer = null;
    this.deferred.clear();
    for (const md of [...this.attached.keys()]) {
      await this.detach(md.name, true).catch((err: Error) =>
        this.opts.logger.error("detach failed", { device: md.name, error: err.message }),
      );
    }
  }

  private async viaNbdfuse(md: MappedDevice): Promise<Omit<Attachment, "link" | "node">> {
    const { name, readOnly } = md;
    const unavailable = loopDeviceUnavailableReason();
    if (unavailable)
      throw new DmError(process.getuid?.() === 0 ? "ENODEV" : "EPERM", `cannot attach ${name}: ${unavailable}`);
    const fuseRoot = path.join(this.opts.runDir, "fuse");
    const removeFuseRoot = () => fs.rmdirSync(fuseRoot); // only once empty: others may be mounted there
    let fuse, loop;
    try {
      const uri = `nbd+unix:///${encodeURIComponent(name)}?socket=${this.opts.nbdSocket}`;
      fuse = await mountNbdfuse(path.join(fuseRoot, name), name, uri, {
        readOnly,
        onUnexpectedExit: (message) => this.opts.logger.error("nbdfuse exited", { device: name, message }),
      });
      // Direct I/O: no FUSE page cache below the kernel device (see the header). The loop device's
      // logical block size is the mapped device's, as /dev/dm-N's would be.
      const blockSize = md.logicalBlockSize <= 4096 ? md.logicalBlockSize : 0;
      loop = await createLoopDevice(fuse.file, { readOnly, directIo: true, holdOpen: false, blockSize });
      if (!loop.directIo)
        this.opts.logger.warn("the loop device could not do direct I/O on nbdfuse's file: reads may be cached", {
          device: name,
          path: loop.path,
        });
    } catch (err) {
      await fuse?.unmount({ lazy: true });
      tryQuietly(removeFuseRoot);
      throw err;
    }
    return {
      path: loop.path,
      devno: loop.devno,
      teardown: async (force) => {
        await loop.detach();
        await fuse.unmount({ lazy: force });
        tryQuietly(removeFuseRoot);
      },
    };
  }

  private async viaKernelNbd(name: string): Promise<Omit<Attachment, "link" | "node">> {
    // The block size /dev/dm-N would have: the mapped device's logical block size.
    const md = this.opts.dm.device(name);
    const nbd = await connectKernelNbd(this.opts.nbdSocket, name, { blockSize: md.logicalBlockSize });
    const devno = decodeDevno(fs.statSync(nbd.path, { bigint: true }).rdev);
    return { path: nbd.path, devno, teardown: () => nbd.disconnect() };
  }

  private makeLink(link: string, target: string): void {
    if (fs.mkdirSync(this.opts.devDir, { recursive: true, mode: 0o755 }) !== undefined)
      fs.chmodSync(this.opts.devDir, 0o755);
    const old = fs.lstatSync(link, { throwIfNoEntry: false });
    if (old && !old.isSymbolicLink()) throw new DmError("EEXIST", `${link} exists and is not a symlink`);
    if (old) {
      this.opts.logger.warn("replacing a stale symlink", { link, was: fs.readlinkSync(link) });
      fs.unlinkSync(link);
    }
    fs.symlinkSync(target, link);
  }
}

/** Why the kernel device `dev` cannot be detached now, or null. */
async function busyReason(dev: string): Promise<string | null> {
  for (const line of fs.readFileSync("/proc/mounts", "utf8").split("\n")) {
    const [source, target] = line.split(" ");
    if (source === dev)
      return `is mounted on ${target!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)))}`;
  }
  const devno = decodeDevno(fs.statSync(dev, { bigint: true }).rdev);
  const openers = kernelOpenerCount(dev, devno);
  if (openers > 0) return `is in use (open count ${openers})`;
  // Mounts (also in other mount namespaces), swap, dm/md holders and O_EXCL openers claim the
  // device exclusively: an exclusive open then fails with EBUSY.
  try {
    await (await fs.promises.open(dev, fs.constants.O_RDONLY | fs.constants.O_EXCL)).close();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EBUSY") return "is in use (mounted or held open exclusively)";
  }
  return null;
}

function restoreNode(dev: string, node: Attachment["node"]): void {
  tryQuietly(() => {
    fs.chownSync(dev, node.uid, node.gid);
    fs.chmodSync(dev, node.mode);
  });
}

function removeLink(link: string, target: string): void {
  try {
    if (fs.readlinkSync(link) === target) fs.unlinkSync(link);
  } catch {
    // Already gone, or replaced by someone else: leave it.
  }
}

/** Errors from syscalls and tools as DmErrors, so the CLI prints them as dmsetup would. */
async function asDmError<T>(p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (err) {
    if (err instanceof DmError) throw err;
    const code = (err as { code?: unknown }).code;
    throw new DmError(typeof code === "string" && code in STRERROR ? code : "EIO", (err as Error).message);
  }
}

function tryQuietly(fn: () => void): void {
  try {
    fn();
  } catch {
    // best effort
  }
}
