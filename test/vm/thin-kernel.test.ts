/**
 * udm's thin pools against the kernel's dm-thin, in Debian's kernel booted in qemu
 * (test/vm/vm.ts): the same metadata and data files, activated by one and then by the other
 * (issue 19, "checked against tools no one here wrote"). One VM serves both directions.
 *
 * The pool files live in a host folder the guest mounts read-write over 9p (cache=none, so every
 * guest write reaches the host file at once) and attaches to loop devices (buffered, as losetup
 * makes them); the host's udmd opens the same files. Only one side has them open at a time.
 *
 * Both sides run the same list of operations (PoolOp): the host through udmsetup messages and
 * NBD, the guest through dmsetup, dd and blkdiscard. A model applies them too, and every volume
 * each side reads must equal the model's. The written data comes from one pattern file in the
 * shared folder, 4 KiB units read at known offsets, so both sides write the same bytes.
 *
 * 1. udm → kernel: udmd makes the pool (two thin volumes, a snapshot, writes before and after
 *    it, shared blocks broken whole and partly, a discard, a transaction id), commits, removes
 *    it; thin_check passes; the kernel activates it, reads every volume, and its status lines
 *    equal udm's.
 * 2. kernel → udm: the kernel makes a pool the same way (its own operations); thin_check
 *    passes; udmd activates it, reads every volume, and its status lines equal the kernel's;
 *    udm snapshots, writes and deletes a device; thin_check passes; the kernel activates the
 *    pool again and reads what udm left.
 */
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Cmd } from "../../core/nbd-protocol.js";
import { useDaemon } from "../support/daemon.js";
import { WireClient } from "../support/nbd-client.js";
import { missingToolsReason, skipOrFail } from "../support/requirements.js";
import { sh, toolOk } from "../support/tools.js";
import { cli, makeFile } from "../support/udmd-tools.js";
import { type VmImage, ensureVmImage, vmUnavailableReason } from "./image.js";
import { sha256 } from "./io-log.js";
import { Vm } from "./vm.js";

const MiB = 1024 * 1024;
/** The unit of every write and discard below (4 KiB). */
const UNIT = 4096;
/** 64 KiB data blocks: 128 sectors, 16 units. */
const BLOCK_SECTORS = 128;
const BLOCK_UNITS = (BLOCK_SECTORS * 512) / UNIT;
const METADATA_BYTES = 8 * MiB;
const DATA_BYTES = 64 * MiB;
const POOL_SECTORS = DATA_BYTES / 512;
/** Every thin volume: 4 MiB (64 blocks of 64 KiB): small, since the guest hashes each one under TCG. */
const VOLUME_BYTES = 4 * MiB;
const VOLUME_SECTORS = VOLUME_BYTES / 512;
/** The pattern file both sides copy their writes from, in units. */
const PATTERN_UNITS = 2560;
/** Where the guest mounts the shared folder. */
const GUEST_IMAGES = "/img";
/** coreutils dd: busybox sh runs its own applets before PATH. */
const DD = "/usr/bin/dd";

/** One step on a pool, in units of 4 KiB; volumes are thin device ids. */
type PoolOp =
  | { op: "thin"; vol: number }
  | { op: "snap"; vol: number; origin: number }
  | { op: "write"; vol: number; at: number; count: number; from: number }
  | { op: "discard"; vol: number; at: number; count: number }
  | { op: "delete"; vol: number }
  | { op: "transaction"; from: number; to: number };

/** Whole blocks `first`..`first + n - 1`, in units. */
const blocks = (first: number, n = 1) => ({ at: first * BLOCK_UNITS, count: n * BLOCK_UNITS });

/**
 * udm → kernel. Volume 1 maps blocks 0-15 and part of block 20 (the rest of it zeroed by
 * provisioning); volume 2 blocks 3-7 and the last unit of the volume; snapshot 3 of volume 1;
 * then volume 1 overwrites blocks 2-4 whole and one unit of block 5 (a copy of the shared block),
 * the snapshot overwrites block 10, and volume 1 discards blocks 8-9 (the snapshot keeps them).
 */
const UDM_OPS: PoolOp[] = [
  { op: "thin", vol: 1 },
  { op: "thin", vol: 2 },
  { op: "write", vol: 1, ...blocks(0, 16), from: 0 },
  { op: "write", vol: 1, at: 20 * BLOCK_UNITS + 4, count: 2, from: 300 },
  { op: "write", vol: 2, ...blocks(3, 5), from: 400 },
  { op: "write", vol: 2, at: VOLUME_BYTES / UNIT - 1, count: 1, from: 700 },
  { op: "snap", vol: 3, origin: 1 },
  { op: "write", vol: 1, ...blocks(2, 3), from: 1000 },
  { op: "write", vol: 1, at: 5 * BLOCK_UNITS + 7, count: 1, from: 1100 },
  { op: "write", vol: 3, ...blocks(10), from: 1200 },
  { op: "discard", vol: 1, ...blocks(8, 2) },
  { op: "transaction", from: 0, to: 7 },
];
/** Data blocks in use after UDM_OPS: 17 + 6 at first, 4 copies for volume 1, 1 for the snapshot. */
const UDM_DATA_BLOCKS = 28;

/**
 * kernel → udm. Volume 1 maps blocks 0-7 and part of block 30; volume 2 blocks 40-43;
 * snapshot 3 of volume 1; volume 1 overwrites block 1 and two units of block 4, the snapshot
 * blocks 6-7; volume 1 discards blocks 0 and 30 (shared: the snapshot keeps them), volume 2
 * block 41 (unshared: freed).
 */
const KERNEL_OPS: PoolOp[] = [
  { op: "thin", vol: 1 },
  { op: "thin", vol: 2 },
  { op: "write", vol: 1, ...blocks(0, 8), from: 50 },
  { op: "write", vol: 1, at: 30 * BLOCK_UNITS + 3, count: 5, from: 400 },
  { op: "write", vol: 2, ...blocks(40, 4), from: 800 },
  { op: "snap", vol: 3, origin: 1 },
  { op: "write", vol: 1, ...blocks(1), from: 1500 },
  { op: "write", vol: 1, at: 4 * BLOCK_UNITS + 8, count: 2, from: 1600 },
  { op: "write", vol: 3, ...blocks(6, 2), from: 1700 },
  { op: "discard", vol: 1, ...blocks(0) },
  { op: "discard", vol: 1, ...blocks(30) },
  { op: "discard", vol: 2, ...blocks(41) },
  { op: "transaction", from: 0, to: 3 },
];
/** 9 + 4 at first, then 1 + 1 + 2 copies, less the one volume 2 discarded. */
const KERNEL_DATA_BLOCKS = 16;

/** What udm does next on the kernel's pool: a snapshot of volume 2, writes to both, snapshot 3 deleted. */
const UDM_AFTER_KERNEL_OPS: PoolOp[] = [
  { op: "snap", vol: 4, origin: 2 },
  { op: "write", vol: 2, ...blocks(42), from: 2000 },
  { op: "write", vol: 4, at: 60 * BLOCK_UNITS, count: 4, from: 2100 },
  { op: "write", vol: 1, ...blocks(50), from: 2200 },
  { op: "delete", vol: 3 },
  { op: "transaction", from: 3, to: 4 },
];

/** The volumes' contents as the operations define them. */
class PoolModel {
  readonly volumes = new Map<number, Buffer>();

  constructor(private readonly pattern: Buffer) {}

  apply(ops: readonly PoolOp[]): void {
    for (const o of ops) {
      if (o.op === "thin") this.volumes.set(o.vol, Buffer.alloc(VOLUME_BYTES));
      else if (o.op === "snap") this.volumes.set(o.vol, Buffer.from(this.volume(o.origin)));
      else if (o.op === "write")
        this.pattern.copy(this.volume(o.vol), o.at * UNIT, o.from * UNIT, (o.from + o.count) * UNIT);
      else if (o.op === "discard") this.volume(o.vol).fill(0, o.at * UNIT, (o.at + o.count) * UNIT);
      else if (o.op === "delete") this.volumes.delete(o.vol);
    }
  }

  volume(id: number): Buffer {
    const v = this.volumes.get(id);
    if (!v) throw new Error(`model: no volume ${id}`);
    return v;
  }

  /** sha256 of every volume, by id. */
  digests(): Record<number, string> {
    return Object.fromEntries([...this.volumes].map(([id, v]) => [id, sha256(v)]));
  }
}

/** A pseudo-random pattern (xorshift32), different in every unit. */
function makePattern(units: number): Buffer {
  const b = Buffer.alloc(units * UNIT);
  let x = 0x2545f491;
  for (let i = 0; i < b.length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b;
}

const poolTable = (metadata: string, data: string) =>
  `0 ${POOL_SECTORS} thin-pool ${metadata} ${data} ${BLOCK_SECTORS} 0`;
const thinTable = (pool: string, id: number) => `0 ${VOLUME_SECTORS} thin /dev/mapper/${pool} ${id}`;

/** What one side saw of a pool: its status lines (pool and each volume) and each volume's sha256. */
interface PoolView {
  pool: string;
  thins: Record<number, string>;
  digests: Record<number, string>;
}

/** A pool in the host's udmd, driven with udmsetup and NBD. Devices are named POOL and POOL-ID. */
class HostPool {
  private readonly clients = new Map<number, WireClient>();

  constructor(
    private readonly dir: string,
    private readonly name: string,
    private readonly pattern: Buffer,
  ) {}

  async create(metadata: string, data: string): Promise<void> {
    await cli(this.dir, "create", this.name, "--table", poolTable(metadata, data));
  }

  /** Activate thin device `id` and connect to it. */
  async open(id: number): Promise<void> {
    await cli(this.dir, "create", `${this.name}-${id}`, "--table", thinTable(this.name, id));
    this.clients.set(id, await WireClient.connect(path.join(this.dir, "nbd.sock"), `${this.name}-${id}`));
  }

  async close(id: number): Promise<void> {
    await this.clients.get(id)?.disconnect();
    this.clients.delete(id);
    await cli(this.dir, "remove", `${this.name}-${id}`);
  }

  private message(...words: (string | number)[]): Promise<string> {
    return cli(this.dir, "message", this.name, "0", ...words.map(String));
  }

  private client(id: number): WireClient {
    const c = this.clients.get(id);
    if (!c) throw new Error(`${this.name}: volume ${id} is not open`);
    return c;
  }

  async apply(ops: readonly PoolOp[]): Promise<void> {
    for (const o of ops) {
      if (o.op === "thin") {
        await this.message("create_thin", o.vol);
        await this.open(o.vol);
      } else if (o.op === "snap") {
        // The origin is suspended around the message, as the kernel's documentation asks.
        await cli(this.dir, "suspend", `${this.name}-${o.origin}`);
        await this.message("create_snap", o.vol, o.origin);
        await cli(this.dir, "resume", `${this.name}-${o.origin}`);
        await this.open(o.vol);
      } else if (o.op === "write") {
        const data = this.pattern.subarray(o.from * UNIT, (o.from + o.count) * UNIT);
        expect((await this.client(o.vol).write(o.at * UNIT, data)).error).toBe(0);
      } else if (o.op === "discard") {
        expect((await this.client(o.vol).request(Cmd.TRIM, o.at * UNIT, o.count * UNIT)).error).toBe(0);
      } else if (o.op === "delete") {
        if (this.clients.has(o.vol)) await this.close(o.vol);
        await this.message("delete", o.vol);
      } else {
        await this.message("set_transaction_id", o.from, o.to);
      }
    }
    for (const c of this.clients.values()) expect((await c.flush()).error).toBe(0);
  }

  async read(id: number): Promise<Buffer> {
    const chunk = MiB;
    const parts: Buffer[] = [];
    for (let at = 0; at < VOLUME_BYTES; at += chunk) {
      const r = await this.client(id).read(at, chunk);
      expect(r.error).toBe(0);
      parts.push(r.data!);
    }
    return Buffer.concat(parts);
  }

  /** Commit (a suspend and resume of the pool), then the status lines and every open volume's sha256. */
  async view(): Promise<PoolView> {
    await cli(this.dir, "suspend", this.name);
    await cli(this.dir, "resume", this.name);
    const view: PoolView = { pool: (await cli(this.dir, "status", this.name)).trim(), thins: {}, digests: {} };
    for (const id of [...this.clients.keys()].sort((a, b) => a - b)) {
      view.thins[id] = (await cli(this.dir, "status", `${this.name}-${id}`)).trim();
      view.digests[id] = sha256(await this.read(id));
    }
    return view;
  }

  /** Remove the volumes, then the pool (which commits). */
  async remove(): Promise<void> {
    for (const id of [...this.clients.keys()]) await this.close(id);
    await cli(this.dir, "remove", this.name);
  }
}

/** The same steps as shell lines for the guest's dmsetup, on loop devices $lm (metadata) and $ld (data). */
class GuestPool {
  constructor(private readonly name: string) {}

  /** Attach the files to loop devices and create the pool. */
  create(metadata: string, data: string): string[] {
    return [
      `lm=$(losetup -f) && losetup $lm ${GUEST_IMAGES}/${metadata}`,
      `ld=$(losetup -f) && losetup $ld ${GUEST_IMAGES}/${data}`,
      `dmsetup create ${this.name} --table "${poolTable("$lm", "$ld")}"`,
    ];
  }

  open(id: number): string {
    return `dmsetup create ${this.name}-${id} --table "${thinTable(this.name, id)}"`;
  }

  private message(...words: (string | number)[]): string {
    return `dmsetup message ${this.name} 0 "${words.join(" ")}"`;
  }

  apply(ops: readonly PoolOp[]): string[] {
    const dev = (id: number) => `/dev/mapper/${this.name}-${id}`;
    return ops.flatMap((o) => {
      if (o.op === "thin") return [this.message("create_thin", o.vol), this.open(o.vol)];
      if (o.op === "snap")
        return [
          `dmsetup suspend ${this.name}-${o.origin}`,
          this.message("create_snap", o.vol, o.origin),
          `dmsetup resume ${this.name}-${o.origin}`,
          this.open(o.vol),
        ];
      if (o.op === "write")
        return [
          `${DD} if=${GUEST_IMAGES}/pattern.bin of=${dev(o.vol)} bs=${UNIT} skip=${o.from} seek=${o.at} count=${o.count} iflag=direct oflag=direct conv=notrunc status=none`,
        ];
      if (o.op === "discard") return [`blkdiscard -o ${o.at * UNIT} -l ${o.count * UNIT} ${dev(o.vol)}`];
      if (o.op === "delete") return [`dmsetup remove ${this.name}-${o.vol}`, this.message("delete", o.vol)];
      return [this.message("set_transaction_id", o.from, o.to)];
    });
  }

  /** Lines printing "pool STATUS", then per volume "thin ID STATUS" and "sha ID DIGEST" (after a commit). */
  view(ids: readonly number[]): string[] {
    return [
      `dmsetup suspend ${this.name} && dmsetup resume ${this.name}`,
      `echo "pool $(dmsetup status ${this.name})"`,
      ...ids.flatMap((id) => [
        `echo "thin ${id} $(dmsetup status ${this.name}-${id})"`,
        `echo "sha ${id} $(${DD} if=/dev/mapper/${this.name}-${id} bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)"`,
      ]),
    ];
  }

  /** Remove the volumes and the pool, detach the loop devices. */
  remove(ids: readonly number[]): string[] {
    return [
      ...ids.map((id) => `dmsetup remove ${this.name}-${id}`),
      `dmsetup remove ${this.name}`,
      "losetup -d $lm && losetup -d $ld",
    ];
  }
}

function parseView(output: string): PoolView {
  const view: PoolView = { pool: "", thins: {}, digests: {} };
  for (const line of output.split("\n")) {
    let m: RegExpExecArray | null;
    if ((m = /^pool (.*)$/.exec(line))) view.pool = m[1]!.trim();
    else if ((m = /^thin (\d+) (.*)$/.exec(line))) view.thins[Number(m[1])] = m[2]!.trim();
    else if ((m = /^sha (\d+) ([0-9a-f]{64})$/.exec(line))) view.digests[Number(m[1])] = m[2]!;
  }
  return view;
}

/** The pool status line's fields: transaction id, metadata used/total, data used/total, ... */
function poolFields(status: string): string[] {
  const m = /^0 \d+ thin-pool (.*)$/.exec(status);
  if (!m) throw new Error(`not a thin-pool status line: ${status}`);
  return m[1]!.trim().split(" ");
}

/**
 * A pool status line as the guest's kernel prints it for the same pool: its data device, a loop
 * device over a 9p file, cannot discard (9p has no fallocate), so the kernel turns discard
 * passdown off (dm-thin.c disable_passdown_if_not_supported logs "Data device (loopN) discard
 * unsupported: Disabling discard passdown.") where udm's data file can punch holes.
 */
const withoutPassdown = (status: string) => status.replace(" discard_passdown ", " no_discard_passdown ");

const skipReason = vmUnavailableReason() ?? missingToolsReason(["thin_check", "thin_dump"]);
skipOrFail("VM kernel dm-thin tests", skipReason);

describe.skipIf(skipReason !== null)("Debian's kernel in qemu: dm-thin and udm on the same pool files", () => {
  const env = useDaemon("udm-vm-thin-", { per: "file" });
  let image: VmImage;
  let vm: Vm | undefined;
  let pattern: Buffer;
  /** Run guest lines with `set -e`, dmsetup without udev; logs how long they took. */
  const guest = async (lines: string[]) => {
    const t = Date.now();
    const out = await vm!.ok(["set -e", "export DM_DISABLE_UDEV=1", ...lines].join("\n"), { timeoutMs: 300_000 });
    console.log(`vm thin: ${lines.length} guest lines in ${Date.now() - t} ms`);
    return out;
  };

  beforeAll(async () => {
    pattern = makePattern(PATTERN_UNITS);
    makeFile(path.join(env.files, "pattern.bin"), pattern);
    let t = Date.now();
    image = ensureVmImage({ log: (line) => console.log(`vm image: ${line}`) });
    console.log(`vm image: ${image.kernelVersion}, ready in ${Date.now() - t} ms`);
    t = Date.now();
    vm = await Vm.boot({
      image,
      workDir: env.files,
      shares: [{ tag: "img", path: env.files, readOnly: false }],
    });
    console.log(`vm: booted ${vm.kernelRelease} in ${Date.now() - t} ms`);
    await guest([
      `mkdir -p ${GUEST_IMAGES}`,
      `mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=262144 img ${GUEST_IMAGES}`,
    ]);
  }, 600_000);

  afterAll(async () => {
    await vm?.shutdown();
  });

  it("udm → kernel: the kernel's dm-thin activates a pool udm made and reads the same volumes", async () => {
    const started = Date.now();
    const metadata = makeFile(path.join(env.files, "meta1.img"), METADATA_BYTES);
    const data = makeFile(path.join(env.files, "data1.img"), DATA_BYTES);
    const model = new PoolModel(pattern);
    model.apply(UDM_OPS);

    const host = new HostPool(env.dir, "u1", pattern);
    await host.create(metadata, data);
    await host.apply(UDM_OPS);
    const udm = await host.view();
    await host.remove();
    expect(udm.digests).toEqual(model.digests());
    expect(poolFields(udm.pool).slice(0, 3)).toEqual([
      "7",
      expect.stringMatching(/^\d+\/2048$/),
      `${UDM_DATA_BLOCKS}/1024`,
    ]);
    await toolOk("thin_check", [metadata]);
    console.log(`vm thin udm → kernel: udm's pool ${udm.pool}`);

    const ids = [1, 2, 3];
    const kpool = new GuestPool("u1");
    const out = await guest([
      ...kpool.create("meta1.img", "data1.img"),
      ...ids.map((id) => kpool.open(id)),
      ...kpool.view(ids),
      ...kpool.remove(ids),
    ]);
    const kernel = parseView(out);
    console.log(`vm thin udm → kernel: the kernel's pool ${kernel.pool}`);
    const dmesg = await vm!.ok("dmesg | grep -i -E 'thin|device-mapper|persistent' || true");
    expect(kernel.digests).toEqual(model.digests());
    expect(kernel.thins, dmesg).toEqual(udm.thins);
    expect(dmesg).toMatch(
      /device-mapper: thin: Data device \(loop\d+\) discard unsupported: Disabling discard passdown/,
    );
    expect(kernel.pool, dmesg).toBe(withoutPassdown(udm.pool));
    // The kernel committed on its suspend and removal: what it left still passes.
    await toolOk("thin_check", [metadata]);
    console.log(`vm thin udm → kernel: ${Date.now() - started} ms`);
  }, 600_000);

  it("kernel → udm: udm activates a pool the kernel's dm-thin made, reads the same volumes, changes it, the kernel reads the changes", async () => {
    const started = Date.now();
    const metadata = makeFile(path.join(env.files, "meta2.img"), METADATA_BYTES);
    const data = makeFile(path.join(env.files, "data2.img"), DATA_BYTES);
    const model = new PoolModel(pattern);
    model.apply(KERNEL_OPS);

    const kpool = new GuestPool("k2");
    const out = await guest([
      ...kpool.create("meta2.img", "data2.img"),
      ...kpool.apply(KERNEL_OPS),
      ...kpool.view([1, 2, 3]),
      ...kpool.remove([1, 2, 3]),
    ]);
    const kernel = parseView(out);
    console.log(`vm thin kernel → udm: the kernel's pool ${kernel.pool}`);
    expect(kernel.digests).toEqual(model.digests());
    expect(poolFields(kernel.pool).slice(0, 3)).toEqual([
      "3",
      expect.stringMatching(/^\d+\/2048$/),
      `${KERNEL_DATA_BLOCKS}/1024`,
    ]);
    await toolOk("thin_check", [metadata]);

    const host = new HostPool(env.dir, "k2", pattern);
    await host.create(metadata, data);
    for (const id of [1, 2, 3]) await host.open(id);
    const udm = await host.view();
    console.log(`vm thin kernel → udm: udm's pool ${udm.pool}`);
    expect(udm.digests).toEqual(model.digests());
    expect(udm.thins).toEqual(kernel.thins);
    expect(withoutPassdown(udm.pool)).toBe(kernel.pool);

    // udm changes the kernel's pool; thin_check passes; the kernel reads what udm wrote.
    model.apply(UDM_AFTER_KERNEL_OPS);
    await host.apply(UDM_AFTER_KERNEL_OPS);
    const changed = await host.view();
    await host.remove();
    expect(changed.digests).toEqual(model.digests());
    await toolOk("thin_check", [metadata]);
    const dump = await sh("thin_dump", metadata);
    expect(dump).toMatch(/<superblock [^>]*transaction="4" /);
    expect(dump).not.toMatch(/dev_id="3"/);

    const ids = [1, 2, 4];
    const final = await guest([
      ...kpool.create("meta2.img", "data2.img"),
      ...ids.map((id) => kpool.open(id)),
      ...kpool.view(ids),
      // The device udm deleted is gone for the kernel too.
      `if ${kpool.open(3)} 2>&1; then echo "opened 3"; fi`,
      ...kpool.remove(ids),
    ]);
    const again = parseView(final);
    const dmesg = await vm!.ok("dmesg | grep -i -E 'thin|device-mapper|persistent' || true");
    expect(final).not.toMatch(/opened 3/);
    expect(dmesg).toMatch(/Couldn't open thin internal device/);
    expect(again.digests, dmesg).toEqual(model.digests());
    expect(again.thins, dmesg).toEqual(changed.thins);
    expect(again.pool, dmesg).toBe(withoutPassdown(changed.pool));
    await toolOk("thin_check", [metadata]);
    console.log(`vm thin kernel → udm: ${Date.now() - started} ms`);
  }, 600_000);
});
