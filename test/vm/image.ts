/**
 * The test VM's kernel and initramfs: Debian's own kernel (the image package linux-image-amd64
 * depends on), downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into a cache
 * folder, never installed, so the host's /boot and /lib/modules stay untouched. The initramfs
 * is busybox plus the few binaries the guest tests run, their shared libraries, the kernel
 * modules the host lacks (nbd, dm-mod, dm-thin-pool, virtio-serial, 9p, ext4) and test/vm/init.sh
 * as /init.
 *
 * The cache (default node_modules/.cache/udm-vm, or $UDM_VM_CACHE) holds the downloaded .debs
 * and the unpacked tree; it is filled when missing (or with `node --import tsx test/vm/build-image.ts --refresh`).
 * The initramfs is rebuilt from it on every call: that takes a second or two, and the host
 * binaries it copies may have changed since.
 */
import { execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { missingToolsReason } from "../support/requirements.js";
import { which } from "../support/tools.js";
import { type CpioEntry, cpioArchive } from "./cpio.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, "../..");

export const DEFAULT_CACHE_DIR = path.join(repoRoot, "node_modules/.cache/udm-vm");

/** Node 24 from the dev dependencies: the guest runs it from the shared checkout, so only its libraries go in. */
export const CHECKOUT_NODE = path.join(repoRoot, "node_modules/node/bin/node");

/**
 * Packages downloaded besides the kernel: the userspace NBD client, a unix socket ⇄ virtio port
 * bridge, and lvm2's dmsetup to run the same commands on the kernel's dm.
 */
const GUEST_PACKAGES = ["nbd-client", "socat", "dmsetup"];

/**
 * Kernel modules loaded by /init, with their dependencies (in `modprobe --show-depends` order).
 * dm-thin-pool (thin-pool and thin) brings dm-persistent-data, dm-bio-prison and dm-bufio.
 */
const GUEST_MODULES = [
  "virtio_pci",
  "virtio_console",
  "nbd",
  "ext4",
  "dm-mod",
  "dm-thin-pool",
  "loop",
  "9pnet_virtio",
  "9p",
];

/** Host tools the image build and the VM need, with the Debian packages that have them. */
const HOST_TOOLS: Record<string, string> = {
  "qemu-system-x86_64": "qemu-system-x86",
  busybox: "busybox-static",
  "apt-get": "apt",
  "apt-cache": "apt",
  "dpkg-deb": "dpkg",
  "dpkg-query": "dpkg",
  depmod: "kmod",
  modprobe: "kmod",
  ldd: "libc-bin",
  mke2fs: "e2fsprogs",
  e2fsck: "e2fsprogs",
  debugfs: "e2fsprogs",
  dd: "coreutils",
};

export interface VmImage {
  kernel: string;
  initramfs: string;
  kernelVersion: string;
  cacheDir: string;
}

interface CacheStamp {
  kernelVersion: string;
  /** GUEST_PACKAGES when the cache was filled: a change fills it again. */
  guestPackages: string[];
  /** The .deb files unpacked. */
  packages: string[];
}

/** Why the VM cannot be built or run here (missing tools and the packages that have them), or null. */
export function vmUnavailableReason(): string | null {
  if (process.platform !== "linux" || process.arch !== "x64")
    return `needs Linux on x86-64 (this is ${process.platform}/${process.arch})`;
  const missing = missingToolsReason(Object.keys(HOST_TOOLS));
  if (missing) {
    const absent = Object.keys(HOST_TOOLS).filter((t) => !which(t));
    const packages = [...new Set(absent.map((t) => HOST_TOOLS[t]!))];
    return `${absent.join(", ")} not installed (Debian: apt-get install ${packages.join(" ")})`;
  }
  if (!fs.existsSync(CHECKOUT_NODE)) return `${CHECKOUT_NODE} is missing (npm install)`;
  return null;
}

function run(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): string {
  return execFileSync(which(cmd) ?? cmd, args, {
    cwd: opts.cwd,
    env: { ...process.env, LANG: "C", ...opts.env },
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    maxBuffer: 64 * 1024 * 1024,
  });
}

function installedOnHost(pkg: string): boolean {
  try {
    return run("dpkg-query", ["-W", "-f=${db:Status-Abbrev}", pkg]).startsWith("ii");
  } catch {
    return false;
  }
}

/** `Depends:` of `pkg` that are libraries (virtual packages, alternatives and debconf left out). */
function libraryDepends(pkg: string): string[] {
  return [...run("apt-cache", ["depends", pkg]).matchAll(/^ {2}Depends: (lib[^\s<>]+)$/gm)].map((m) => m[1]!);
}

/** The image package linux-image-amd64 depends on, e.g. linux-image-6.1.0-57-amd64. */
function kernelPackage(): string {
  const m = /^ {2}Depends: (linux-image-\S+)$/m.exec(run("apt-cache", ["depends", "linux-image-amd64"]));
  if (!m) throw new Error("apt-cache depends linux-image-amd64 names no linux-image-* package (apt-get update?)");
  return m[1]!;
}

/**
 * The packages to unpack: the kernel, GUEST_PACKAGES and, transitively, every library package
 * they need that the host does not have (ldd then finds those in the unpacked tree).
 */
function packagesToDownload(kernelPkg: string): string[] {
  const wanted = [kernelPkg, ...GUEST_PACKAGES];
  const seen = new Set(wanted);
  for (let i = 1; i < wanted.length; i++) {
    for (const dep of libraryDepends(wanted[i]!)) {
      if (seen.has(dep)) continue;
      seen.add(dep);
      if (!installedOnHost(dep)) wanted.push(dep);
    }
  }
  return wanted;
}

function fillCache(cacheDir: string, log: (line: string) => void): CacheStamp {
  const kernelPkg = kernelPackage();
  const packages = packagesToDownload(kernelPkg);
  const tmp = fs.mkdtempSync(path.join(path.dirname(cacheDir), ".udm-vm-"));
  try {
    const debs = path.join(tmp, "debs");
    const root = path.join(tmp, "root");
    fs.mkdirSync(debs);
    fs.mkdirSync(root);
    log(`apt-get download ${packages.join(" ")}`);
    try {
      run("apt-get", ["download", ...packages], { cwd: debs });
    } catch (err) {
      throw new Error(`apt-get download failed (run apt-get update?): ${(err as { stderr?: string }).stderr ?? err}`);
    }
    for (const deb of fs.readdirSync(debs)) run("dpkg-deb", ["-x", path.join(debs, deb), root]);
    const modulesDir = path.join(root, "lib/modules");
    const kernelVersion = fs
      .readdirSync(modulesDir)
      .find((v) => fs.existsSync(path.join(root, "boot", `vmlinuz-${v}`)));
    if (!kernelVersion) throw new Error(`no vmlinuz-* matching ${modulesDir}/* in ${kernelPkg}`);
    // The package's postinst would run depmod; modprobe --show-depends needs modules.dep.
    run("depmod", ["-b", root, kernelVersion]);
    const stamp: CacheStamp = { kernelVersion, guestPackages: GUEST_PACKAGES, packages: fs.readdirSync(debs).sort() };
    fs.writeFileSync(path.join(tmp, "stamp.json"), JSON.stringify(stamp, null, 2) + "\n");
    fs.rmSync(cacheDir, { recursive: true, force: true });
    fs.renameSync(tmp, cacheDir);
    return stamp;
  } catch (err) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
}

function readStamp(cacheDir: string): CacheStamp | null {
  try {
    const stamp = JSON.parse(fs.readFileSync(path.join(cacheDir, "stamp.json"), "utf8")) as CacheStamp;
    if (JSON.stringify(stamp.guestPackages) !== JSON.stringify(GUEST_PACKAGES)) return null;
    return fs.existsSync(path.join(cacheDir, "root/boot", `vmlinuz-${stamp.kernelVersion}`)) ? stamp : null;
  } catch {
    return null;
  }
}

/** `.ko` files to load for GUEST_MODULES, dependencies first, each once. */
function moduleFiles(root: string, kernelVersion: string): string[] {
  const files: string[] = [];
  for (const mod of GUEST_MODULES) {
    const out = run("modprobe", ["-d", root, "-S", kernelVersion, "--show-depends", mod]);
    for (const m of out.matchAll(/^insmod (\S+)/gm)) if (!files.includes(m[1]!)) files.push(m[1]!);
  }
  return files;
}

/** A module's bytes, uncompressed (busybox insmod takes plain .ko files). */
function moduleBytes(file: string): Buffer {
  if (file.endsWith(".ko")) return fs.readFileSync(file);
  const tool = file.endsWith(".xz") ? "xz" : file.endsWith(".zst") ? "zstd" : file.endsWith(".gz") ? "gzip" : null;
  if (!tool) throw new Error(`${file}: unknown module compression`);
  return execFileSync(which(tool) ?? tool, ["-dc", file], { maxBuffer: 256 * 1024 * 1024 });
}

/** Shared libraries `binary` loads (soname → file), resolved on the host or in the unpacked tree. */
function sharedLibraries(binary: string, libDirs: string[]): Map<string, string> {
  let out: string;
  try {
    out = run("ldd", [binary], { env: { LD_LIBRARY_PATH: libDirs.join(":") } });
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string };
    if (/not a dynamic executable/.test(`${e.stdout}${e.stderr}`)) return new Map();
    throw err;
  }
  const libs = new Map<string, string>();
  for (const line of out.split("\n")) {
    const missing = /^\s*(\S+) => not found/.exec(line);
    if (missing) throw new Error(`${binary}: ${missing[1]} not found on the host or in the downloaded packages`);
    const found = /^\s*(\S+) => (\/\S+)/.exec(line) ?? /^\s*(\/\S+) \(/.exec(line);
    if (found) libs.set(found[1]!, found[2] ?? found[1]!);
  }
  return libs;
}

/** Build (or reuse) the cache and write the initramfs; resolves with what qemu needs. */
export function ensureVmImage(
  opts: { cacheDir?: string; refresh?: boolean; log?: (line: string) => void } = {},
): VmImage {
  const cacheDir = opts.cacheDir ?? process.env.UDM_VM_CACHE ?? DEFAULT_CACHE_DIR;
  const log = opts.log ?? (() => undefined);
  fs.mkdirSync(path.dirname(cacheDir), { recursive: true });
  const stamp = (!opts.refresh && readStamp(cacheDir)) || fillCache(cacheDir, log);
  const root = path.join(cacheDir, "root");
  const kver = stamp.kernelVersion;

  const entries: CpioEntry[] = [];
  const dirs = new Set<string>();
  const addDir = (dir: string) => {
    const parts = dir.split("/").filter(Boolean);
    for (let i = 1; i <= parts.length; i++) {
      const d = parts.slice(0, i).join("/");
      if (!dirs.has(d)) entries.push({ type: "dir", path: d });
      dirs.add(d);
    }
  };
  const addFile = (dest: string, data: Buffer, mode = 0o644) => {
    addDir(path.dirname(dest));
    entries.push({ type: "file", path: dest, data, mode });
  };
  for (const d of ["proc", "sys", "dev", "tmp", "run", "mnt", "udm", "bin", "sbin", "usr/bin", "usr/sbin"]) addDir(d);
  entries.push({ type: "chardev", path: "dev/console", major: 5, minor: 1 });
  entries.push({ type: "chardev", path: "dev/null", major: 1, minor: 3, mode: 0o666 });

  // Binaries: busybox for everything else (its applets are linked by /init), coreutils dd
  // because busybox dd has no oflag=dsync (the FUA write), e2fsprogs for mkfs and fsck.
  const libDirs = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"].map((d) => path.join(root, d));
  const libraries = new Map<string, string>();
  const binaries: [string, string][] = [
    [which("busybox")!, "bin/busybox"],
    [which("dd")!, "usr/bin/dd"],
    [which("mke2fs")!, "usr/sbin/mke2fs"],
    [which("e2fsck")!, "usr/sbin/e2fsck"],
    [path.join(root, "sbin/nbd-client"), "usr/sbin/nbd-client"],
    [path.join(root, "usr/bin/socat"), "usr/bin/socat"],
    [path.join(root, "sbin/dmsetup"), "usr/sbin/dmsetup"],
  ];
  for (const [from, to] of binaries) {
    addFile(to, fs.readFileSync(from), 0o755);
    for (const [name, file] of sharedLibraries(from, libDirs)) libraries.set(name, file);
  }
  entries.push({ type: "symlink", path: "usr/sbin/mkfs.ext4", target: "mke2fs" });
  entries.push({ type: "symlink", path: "usr/sbin/fsck.ext4", target: "e2fsck" });
  // Node runs from the shared checkout; only its libraries have to be here.
  for (const [name, file] of sharedLibraries(CHECKOUT_NODE, libDirs)) libraries.set(name, file);
  for (const [name, file] of [...libraries].sort(([a], [b]) => a.localeCompare(b))) {
    const dest = name.startsWith("/") ? name.slice(1) : `lib/x86_64-linux-gnu/${name}`;
    addFile(dest, fs.readFileSync(file), 0o755);
  }
  if (fs.existsSync("/etc/mke2fs.conf")) addFile("etc/mke2fs.conf", fs.readFileSync("/etc/mke2fs.conf"));

  const modules = moduleFiles(root, kver).map((file) => {
    const rel = path.relative(path.join(root, "lib/modules", kver), file).replace(/\.(xz|zst|gz)$/, "");
    addFile(`lib/modules/${kver}/${rel}`, moduleBytes(file));
    return rel;
  });
  addFile("etc/udm-vm/modules", Buffer.from(modules.join("\n") + "\n"));
  addFile("init", fs.readFileSync(path.join(here, "init.sh")), 0o755);

  const archive = cpioArchive(entries);
  const initramfs = path.join(
    cacheDir,
    `initramfs-${crypto.createHash("sha256").update(archive).digest("hex").slice(0, 16)}.cpio`,
  );
  if (!fs.existsSync(initramfs)) {
    const tmp = `${initramfs}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, archive);
    fs.renameSync(tmp, initramfs);
    // Older ones were built from other host binaries; qemu reads the file only when it starts.
    for (const f of fs.readdirSync(cacheDir))
      if (/^initramfs-[0-9a-f]+\.cpio$/.test(f) && path.join(cacheDir, f) !== initramfs)
        fs.rmSync(path.join(cacheDir, f));
  }
  return { kernel: path.join(root, "boot", `vmlinuz-${kver}`), initramfs, kernelVersion: kver, cacheDir };
}
