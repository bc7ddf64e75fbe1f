/**
 * A qemu VM running Debian's kernel with test/vm/init.sh as PID 1, driven from the test through
 * a virtio-serial port: `vm.run(script)` runs a shell script in the guest and resolves with its
 * exit status and output. Nothing leaves the machine: the guest has no network; host unix
 * sockets it must reach (udmd's NBD socket) are virtio-serial ports bound to them, host folders
 * it needs (the checkout) are virtio-9p shares.
 *
 * Every exchange waits for a line from the guest, so nothing here waits a fixed time; qemu's
 * output and the guest's console (kernel messages, /init's) go to files in `workDir`, and their
 * ends are in every error.
 */
import { type ChildProcess, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { which } from "../support/tools.js";
import type { VmImage } from "./image.js";

export interface VmOptions {
  image: VmImage;
  /** Where the console log and the control socket go (must exist). */
  workDir: string;
  memoryMiB?: number;
  cpus?: number;
  /** Host unix sockets the guest reaches as virtio-serial ports (`vport NAME` in the guest gives the device). */
  sockets?: { name: string; path: string }[];
  /** Host folders the guest can mount with `mount -t 9p -o trans=virtio,version=9p2000.L TAG DIR`. */
  shares?: { tag: string; path: string; readOnly: boolean }[];
  /** How long the boot may take up to the agent's READY (default 180 s: TCG on a loaded machine). */
  bootTimeoutMs?: number;
}

export interface GuestResult {
  code: number;
  output: string;
}

const CONTROL_PORT = "udm.ctl";

export class Vm {
  /** The guest's `uname -r`. */
  kernelRelease = "";
  private readonly lines: string[] = [];
  private waiter: ((line: string | null) => void) | null = null;
  private closed = false;
  private busy = false;

  private constructor(
    private readonly proc: ChildProcess,
    private readonly server: net.Server,
    private readonly consoleLog: string,
    private readonly qemuLog: () => string,
    private readonly exited: Promise<number | null>,
  ) {}

  static async boot(opts: VmOptions): Promise<Vm> {
    const qemu = which("qemu-system-x86_64");
    if (!qemu) throw new Error("qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)");
    const consoleLog = path.join(opts.workDir, "console.log");
    const controlSocket = path.join(opts.workDir, "ctl.sock");
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(controlSocket, resolve);
    });
    const connection = new Promise<net.Socket>((resolve) => server.once("connection", resolve));

    const sockets = opts.sockets ?? [];
    const ports = [{ name: CONTROL_PORT, path: controlSocket }, ...sockets];
    const kvm = fs.existsSync("/dev/kvm") && canOpen("/dev/kvm");
    const args = [
      ...["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"],
      ...(kvm ? ["-accel", "kvm", "-cpu", "host"] : ["-accel", "tcg", "-cpu", "max"]),
      ...["-m", String(opts.memoryMiB ?? 1024), "-smp", String(opts.cpus ?? 2)],
      ...["-kernel", opts.image.kernel, "-initrd", opts.image.initramfs],
      ...["-append", `console=ttyS0 panic=-1 loglevel=4 udmvm.ports=${ports.length}`],
      ...["-serial", `file:${consoleLog}`],
      ...["-device", "virtio-serial-pci"],
      // Client sockets: qemu connects at start. Numbered from 1 (0 is kept for virtconsole).
      ...ports.flatMap((p, i) => [
        ...["-chardev", `socket,id=port${i},path=${p.path}`],
        ...["-device", `virtserialport,chardev=port${i},name=${p.name},nr=${i + 1}`],
      ]),
      ...(opts.shares ?? []).flatMap((s) => [
        "-virtfs",
        `local,path=${s.path},mount_tag=${s.tag},security_model=none${s.readOnly ? ",readonly=on" : ""}`,
      ]),
    ];
    const proc = spawn(qemu, args, { stdio: ["ignore", "pipe", "pipe"] });
    let qemuOutput = "";
    proc.stdout!.on("data", (d) => (qemuOutput += d));
    proc.stderr!.on("data", (d) => (qemuOutput += d));
    const exited = new Promise<number | null>((resolve) => proc.once("exit", (code) => resolve(code)));
    // A worker that dies mid-test must not leave a VM behind.
    const killOnExit = () => proc.kill("SIGKILL");
    process.once("exit", killOnExit);
    const vm = new Vm(proc, server, consoleLog, () => qemuOutput, exited);
    void exited.then(() => {
      process.off("exit", killOnExit);
      vm.onClosed();
    });

    const timeoutMs = opts.bootTimeoutMs ?? 180_000;
    const socket = await vm.race(connection, timeoutMs, "qemu did not connect to the control socket");
    vm.attach(socket);
    const ready = await vm.nextLine(timeoutMs, "the guest did not report READY");
    if (!ready.startsWith("READY ")) throw new Error(vm.describe(`unexpected first line from the guest: ${ready}`));
    vm.kernelRelease = ready.slice("READY ".length);
    return vm;
  }

  private socket: net.Socket | null = null;

  private attach(socket: net.Socket): void {
    this.socket = socket;
    let partial = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      const parts = (partial + chunk).split("\n");
      partial = parts.pop()!;
      for (const line of parts) this.push(line);
    });
    socket.on("close", () => this.onClosed());
    socket.on("error", () => undefined);
  }

  private push(line: string): void {
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w(line);
    } else this.lines.push(line);
  }

  private onClosed(): void {
    this.closed = true;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w(null);
    }
  }

  private async nextLine(timeoutMs: number, what: string): Promise<string> {
    const queued = this.lines.shift();
    if (queued !== undefined) return queued;
    const line = await this.race(
      new Promise<string | null>((resolve) => {
        if (this.closed) resolve(null);
        else this.waiter = resolve;
      }),
      timeoutMs,
      what,
    );
    if (line === null) throw new Error(this.describe(`${what}: the VM went away`));
    return line;
  }

  private async race<T>(p: Promise<T>, timeoutMs: number, what: string): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(this.describe(`${what} within ${timeoutMs} ms`))), timeoutMs);
    });
    const gone = this.exited.then((code) => {
      throw new Error(this.describe(`${what}: qemu exited (${code})`));
    });
    try {
      return await Promise.race([p, timeout, gone]);
    } finally {
      clearTimeout(timer);
      this.waiter = null;
    }
  }

  /** Run `script` with sh in the guest (cwd /, stdin /dev/null); its exit status and output. */
  async run(script: string, opts: { timeoutMs?: number } = {}): Promise<GuestResult> {
    if (this.busy) throw new Error("Vm.run: one command at a time");
    if (!this.socket || this.closed) throw new Error(this.describe("Vm.run: the VM is not running"));
    this.busy = true;
    try {
      this.socket.write(Buffer.from(script).toString("base64") + "\n");
      const reply = await this.nextLine(opts.timeoutMs ?? 60_000, `guest command ${JSON.stringify(script)}`);
      const m = /^(\d+) ([A-Za-z0-9+/=]*)$/.exec(reply);
      if (!m) throw new Error(this.describe(`malformed reply from the guest: ${reply.slice(0, 200)}`));
      return { code: Number(m[1]), output: Buffer.from(m[2]!, "base64").toString("utf8") };
    } finally {
      this.busy = false;
    }
  }

  /** Run `script`, which must exit 0; its output. */
  async ok(script: string, opts: { timeoutMs?: number } = {}): Promise<string> {
    const r = await this.run(script, opts);
    if (r.code !== 0) throw new Error(`guest: ${script}\nexit ${r.code}:\n${r.output}`);
    return r.output;
  }

  /** The end of the guest's console and of qemu's own output, for error messages. */
  describe(what: string): string {
    let console = "";
    try {
      console = fs.readFileSync(this.consoleLog, "utf8");
    } catch {
      // Not written yet.
    }
    return `${what}\n--- guest console (end) ---\n${console.slice(-4000)}\n--- qemu ---\n${this.qemuLog().slice(-2000)}`;
  }

  /** Power the guest off (killing qemu if it does not stop within `timeoutMs`); qemu's exit code. */
  async shutdown(timeoutMs = 30_000): Promise<number | null> {
    if (this.socket && !this.closed && !this.busy)
      this.socket.write(Buffer.from("poweroff -f").toString("base64") + "\n");
    // Closing the control port ends the agent's loop too, if the command could not be sent.
    this.socket?.end();
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), timeoutMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
      this.server.close();
    }
  }
}

function canOpen(file: string): boolean {
  try {
    fs.closeSync(fs.openSync(file, "r+"));
    return true;
  } catch {
    return false;
  }
}
