/**
 * NBD fuzzing against the built udmd (issue 6): at least 10^5 random and mutated handshake and
 * transmission packets over the unix socket (and some over TCP on 127.0.0.1), pipelined many per
 * connection, with an oracle for every answer that can be predicted (test/support/nbd-fuzz.ts).
 * Meanwhile well-behaved clients do verified I/O on another export and must see no error and no
 * wrong byte; afterwards the daemon is up, logged no internal error, and every fuzz connection
 * has let go of its export.
 *
 * Seeded: the seed is printed; UDM_FUZZ_SEED=<seed> replays the same packets (UDM_FUZZ_SESSION=<n>
 * replays only connection n, and prints what the daemon logged). UDM_FUZZ_PACKETS (default 100000)
 * and UDM_FUZZ_SECONDS (default 45, a cap) bound the run.
 */
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { beforeAll, describe, expect, it, vi } from "vitest";
import { Cmd, NbdErrno, Opt, Rep } from "../../nbd/protocol.js";
import { useDaemon } from "../support/daemon.js";
import { RawConnection, WireClient, optionRequest, u16, u32 } from "../support/nbd-client.js";
import { type FuzzConfig, type FuzzExport, FuzzStats, planSession, runSession } from "../support/nbd-fuzz.js";
import { Rng, seedFrom } from "../../testing/rng.js";
import { alive, cli, control, createSnapshot, makeFile, nbdTcpPort, rssKiB } from "../support/udmd-tools.js";
import { BLOCK, type DeviceModel, IoStats, SECTOR, runWorker, stamp } from "../support/verified-io.js";

const MiB = 1024 * 1024;
const SEED = seedFrom("UDM_FUZZ_SEED");
const PACKETS = Number(process.env.UDM_FUZZ_PACKETS ?? 100_000);
const SECONDS = Number(process.env.UDM_FUZZ_SECONDS ?? 45);
const CONCURRENCY = 6;

const env = useDaemon("udm-fuzz-nbd-", { args: ["--nbd-listen", "127.0.0.1:0"], per: "file" });
const GOOD_SIZE = 4 * MiB;
let goodInitial: Buffer;

/** The fuzz targets: every kind of table, read-only, failing, huge, and a snapshot pair. */
const exports: FuzzExport[] = [
  { name: "fz-zero", sizeBytes: BigInt(Number.MAX_SAFE_INTEGER) * 512n, readOnly: false, zeroes: true, failsIo: false },
  { name: "fz-small", sizeBytes: 2048n * 512n, readOnly: false, zeroes: true, failsIo: false },
  { name: "fz-lin", sizeBytes: 16384n * 512n, readOnly: false, zeroes: false, failsIo: false },
  { name: "fz-ro", sizeBytes: 8192n * 512n, readOnly: true, zeroes: false, failsIo: false },
  { name: "fz-err", sizeBytes: 4096n * 512n, readOnly: false, zeroes: false, failsIo: true },
  { name: "fz-mixed", sizeBytes: 8192n * 512n, readOnly: false, zeroes: false, failsIo: true },
  { name: "fz-origin", sizeBytes: 8192n * 512n, readOnly: false, zeroes: false, failsIo: false },
  { name: "fz-snap", sizeBytes: 8192n * 512n, readOnly: false, zeroes: false, failsIo: false },
];

beforeAll(async () => {
  const f = (name: string) => path.join(env.files, name);
  goodInitial = stamp(0, 0, GOOD_SIZE / SECTOR);
  makeFile(f("good.img"), goodInitial);
  makeFile(f("lin.img"), 8 * MiB);
  makeFile(f("origin.img"), 4 * MiB);
  makeFile(f("cow.img"), 8 * MiB);
  await cli(env.dir, "create", "good", "--table", `0 ${GOOD_SIZE / SECTOR} linear ${f("good.img")} 0`);
  await cli(env.dir, "create", "fz-zero", "--table", `0 ${Number.MAX_SAFE_INTEGER} zero`);
  await cli(env.dir, "create", "fz-small", "--table", "0 2048 zero");
  await cli(env.dir, "create", "fz-lin", "--table", `0 16384 linear ${f("lin.img")} 0`);
  await cli(env.dir, "create", "fz-ro", "-r", "--table", `0 8192 linear ${f("lin.img")} 8192`);
  await cli(env.dir, "create", "fz-err", "--table", "0 4096 error");
  await cli(
    env.dir,
    "create",
    "fz-mixed",
    "--table",
    `0 2048 zero\n2048 2048 error\n4096 4096 linear ${f("lin.img")} 0`,
  );
  await cli(env.dir, "create", "fz-origin", "--table", `0 8192 snapshot-origin ${f("origin.img")}`);
  await createSnapshot(env.dir, "fz-origin", "fz-snap", `0 8192 snapshot ${f("origin.img")} ${f("cow.img")} P 8`);
});

describe("NBD fuzzing", () => {
  it(
    `survives >= ${PACKETS} random and mutated packets; other clients' verified I/O is unaffected`,
    { timeout: 60_000 },
    async () => {
      console.log(`fuzz-nbd: seed ${SEED} (replay with UDM_FUZZ_SEED=${SEED})`);
      const unixSocket = path.join(env.dir, "nbd.sock");
      const port = nbdTcpPort(env.daemon);
      const unixConfig: FuzzConfig = { exports, connect: () => net.connect(unixSocket) };
      const tcpConfig: FuzzConfig = { exports, connect: () => net.connect(port, "127.0.0.1") };

      // Well-behaved clients: verified I/O on "good" for the whole run (blocks 3, 7, ... never written).
      const model: DeviceModel = { name: "good", expected: Buffer.from(goodInitial) };
      const blocks = GOOD_SIZE / BLOCK;
      const still = Array.from({ length: blocks }, (_, i) => i).filter((i) => i % 4 === 3);
      const goodStats = new IoStats();
      const goodClients = await Promise.all(
        [true, true, false].map((structured) => WireClient.connect(unixSocket, "good", { structured })),
      );
      let stopGood = false;
      const goodRng = new Rng(SEED ^ 0x5a5a5a5a);
      const goodRuns = goodClients.map((client, k) =>
        runWorker(
          {
            client,
            model,
            own: Array.from({ length: blocks }, (_, i) => i).filter((i) => i % 4 === k),
            still,
            queueDepth: 4,
            rng: goodRng.fork(),
          },
          goodStats,
          () => stopGood,
        ),
      );

      // The fuzz: sessions planned from the seed, CONCURRENCY at a time, until PACKETS are sent.
      const stats = new FuzzStats();
      const rssBefore = rssKiB(env.daemon.proc.pid!);
      const deadline = Date.now() + SECONDS * 1000;
      const only = process.env.UDM_FUZZ_SESSION === undefined ? null : Number(process.env.UDM_FUZZ_SESSION);
      let nextSession = only ?? 0;
      const worker = async () => {
        while (stats.packets < PACKETS && Date.now() < deadline && (only === null || nextSession === only)) {
          const index = nextSession++;
          const rng = new Rng((SEED + Math.imul(index, 0x9e3779b9)) >>> 0);
          const handshake = rng.chance(0.3);
          const packets = planSession(
            rng,
            exports,
            handshake ? "handshake" : "transmission",
            handshake ? rng.range(10, 200) : rng.range(100, 700),
            { framing: 0.3, fields: 0.15 },
          );
          const tcp = rng.chance(0.1);
          stats.sessions++;
          if (handshake) stats.handshakeSessions++;
          else stats.transmissionSessions++;
          if (tcp) stats.tcpSessions++;
          await runSession(
            tcp ? tcpConfig : unixConfig,
            packets,
            stats,
            `seed ${SEED} session ${index}${tcp ? " (tcp)" : ""}`,
          );
        }
      };
      const started = Date.now();
      await Promise.all(Array.from({ length: CONCURRENCY }, worker));
      const elapsed = (Date.now() - started) / 1000;

      stopGood = true;
      await Promise.all(goodRuns);
      const rssAfter = rssKiB(env.daemon.proc.pid!);

      console.log(
        `fuzz-nbd: seed ${SEED}: ${stats.packets} packets (${stats.mutatedPackets} mutated, ${stats.framingMutations} of them breaking the framing; ${(stats.bytesSent / MiB).toFixed(1)} MiB) ` +
          `in ${stats.sessions} connections (${stats.handshakeSessions} handshake, ${stats.transmissionSessions} transmission, ${stats.tcpSessions} over TCP) ` +
          `in ${elapsed.toFixed(1)} s; ${stats.optionReplies} option replies and ${stats.requestReplies} request replies, ` +
          `${stats.predicted} checked against the oracle; ${stats.closedByServer} connections closed by the server`,
      );
      console.log(
        `fuzz-nbd: well-behaved clients: ${goodStats.writes} writes, ${goodStats.reads} reads (${goodStats.verifiedReads} verified, ` +
          `${(goodStats.verifiedBytes / MiB).toFixed(1)} MiB), ${goodStats.flushes} flushes, ${goodStats.mismatchCount} mismatches, ${goodStats.errorCount} errors; ` +
          `udmd RSS ${rssBefore} KiB before, ${rssAfter} KiB after`,
      );

      if (only !== null) {
        // Replaying one session: show what the daemon made of it.
        const log = env.daemon
          .stderr()
          .split("\n")
          .filter((l) => /"nbd |"level":"(warn|error)"/.test(l));
        console.log(`fuzz-nbd: udmd log for session ${only}:\n${log.slice(-40).join("\n")}`);
      } else if (stats.failures.length) {
        // Keep udmd's whole log for the post-mortem (failure messages carry their time).
        const saved = path.join(os.tmpdir(), `udm-fuzz-nbd-${SEED}-udmd.log`);
        fs.writeFileSync(saved, env.daemon.stderr());
        console.log(`fuzz-nbd: udmd's log is in ${saved}`);
      }
      expect(stats.failures, `oracle failures (seed ${SEED})`).toEqual([]);
      expect(goodStats.mismatches).toEqual([]);
      expect(goodStats.errors).toEqual([]);
      if (only === null) expect(goodStats.verifiedReads).toBeGreaterThan(100);
      if (only === null) expect(stats.packets).toBeGreaterThanOrEqual(PACKETS);

      // The daemon is up and answers; every fuzz connection has let go of its export.
      expect(alive(env.daemon)).toBe(true);
      const client = await control(env.dir);
      try {
        await vi.waitFor(
          async () => {
            for (const e of exports)
              expect((await client.request("info", { name: e.name })) as { openCount: number }).toMatchObject({
                openCount: 0,
              });
          },
          { timeout: 10_000, interval: 100 },
        );
        await Promise.all(goodClients.map((c) => c.disconnect()));
        await vi.waitFor(
          async () => expect(await client.request("info", { name: "good" })).toMatchObject({ openCount: 0 }),
          { timeout: 5000 },
        );
      } finally {
        client.close();
      }
      expect(await cli(env.dir, "ls")).toMatch(/^fz-err\t/m);
      expect(await cli(env.dir, "status", "fz-snap")).toMatch(/^0 8192 snapshot \d+\/16384 \d+\n$/);
      const internal = env.daemon
        .stderr()
        .split("\n")
        .filter((l) => l.includes('"level":"error"'));
      expect(internal, "udmd logged internal errors").toEqual([]);
    },
  );
});

// Found by the fuzzer above (seeds 1 and 12345 before the fixes) and fixed in nbd/.
describe("NBD bugs the fuzzer found", () => {
  it("an unaligned offset above 2^53 bytes is refused, not rounded onto a sector boundary (parser.ts)", async () => {
    const c = await WireClient.connect(path.join(env.dir, "nbd.sock"), "fz-zero");
    const at = 1n << 61n; // inside the 2^62-byte export, where doubles are 512 apart
    for (const offset of [at + 1n, at + 255n, at - 1n, (1n << 53n) + 1n]) {
      expect((await c.request(Cmd.READ, offset, 512)).error, `read at ${offset}`).toBe(NbdErrno.EINVAL);
      expect((await c.request(Cmd.WRITE, offset, 512, { data: Buffer.alloc(512) })).error, `write at ${offset}`).toBe(
        NbdErrno.EINVAL,
      );
    }
    const aligned = await c.request(Cmd.READ, at, 512); // aligned and inside: served
    expect(aligned.error).toBe(0);
    expect(aligned.data!.equals(Buffer.alloc(512))).toBe(true);
    await c.disconnect();
  });

  it("replies to options pipelined before a fatal one go out before the close (connection.ts)", async () => {
    const raw = await RawConnection.open(path.join(env.dir, "nbd.sock"));
    const info = Buffer.concat([u32(6), Buffer.from("nosuch"), u16(0)]);
    raw.socket.write(
      Buffer.concat([
        u32(3),
        optionRequest(Opt.LIST, Buffer.alloc(0)),
        optionRequest(Opt.INFO, info),
        optionRequest(Opt.STRUCTURED_REPLY, Buffer.alloc(0)),
        optionRequest(Opt.EXPORT_NAME, Buffer.from("nosuch")), // fatal: the server must drop us
      ]),
    );
    const replies: [number, number][] = [];
    for (;;) {
      const r = await raw.optionReply();
      replies.push([r.option, r.type]);
      if (r.option === Opt.STRUCTURED_REPLY) break;
    }
    expect(replies.filter(([, t]) => t !== Rep.SERVER)).toEqual([
      [Opt.LIST, Rep.ACK],
      [Opt.INFO, Rep.ERR_UNKNOWN],
      [Opt.STRUCTURED_REPLY, Rep.ACK],
    ]);
    await raw.closedByServer();
  });
});
