/**
 * kill -9 of udmd at random moments of create, reload, resume and merge, each followed at once by
 * a new udmd on the same run directory (issue 16): the new daemon always starts, restores every
 * device it recorded (none fails), answers, and every restored device reads. UDM_FUZZ_SEED
 * replays a run (it picks the operations and the moments).
 */
import path from "node:path";
import { describe, expect, it } from "vitest";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { udmsetup, useDaemon } from "../support/daemon.js";
import { WireClient } from "../support/nbd-client.js";
import { Rng, seedFrom } from "../../testing/rng.js";
import { makeFile } from "../support/udmd-tools.js";

const SEED = seedFrom("UDM_FUZZ_SEED");
const ROUNDS = 8;
const MiB = 1024 * 1024;
const SECTORS = (4 * MiB) / 512;

const env = useDaemon("udm-kill-");

describe("kill -9 at random moments, then an immediate restart", () => {
  it(`comes back every time with every recorded device (${ROUNDS} rounds)`, async () => {
    const rng = new Rng(SEED);
    console.log(`kill-restart: seed ${SEED} (replay with UDM_FUZZ_SEED=${SEED})`);
    const f = (n: string) => path.join(env.files, n);
    makeFile(f("origin.img"), 4 * MiB);
    const ops = (round: number): string[][] => {
      const cow = f(`cow${round}`);
      makeFile(cow, 4 * MiB);
      const origin = `0 ${SECTORS} snapshot-origin ${f("origin.img")}`;
      return [
        ["create", "base", "--table", origin],
        ["create", `lin${round}`, "--table", `0 ${SECTORS} linear /dev/mapper/base 0`],
        ["suspend", "base"],
        ["create", `snap${round}`, "--table", `0 ${SECTORS} snapshot ${f("origin.img")} ${cow} P 8`],
        ["resume", "base"],
        ["reload", `lin${round}`, "--table", `0 ${SECTORS / 2} linear /dev/mapper/base 8`],
        ["resume", `lin${round}`],
        ["reload", "base", "--table", `0 ${SECTORS} snapshot-merge ${f("origin.img")} ${cow} P 8`],
        ["suspend", `snap${round}`],
        ["resume", "base"],
      ];
    };
    // One device made before any kill: every restart has at least it to restore.
    const first = await udmsetup(env.dir, [
      "create",
      "base",
      "--table",
      `0 ${SECTORS} snapshot-origin ${f("origin.img")}`,
    ]);
    expect(first.code).toBe(0);
    await env.daemon.stop("SIGKILL");
    let restoredSoFar = 0;
    for (let round = 0; round < ROUNDS; round++) {
      await env.restart();
      expect(env.daemon.stderr(), `round ${round}: restore`).not.toContain("could not be restored");
      const listed = (await udmsetup(env.dir, ["ls"])).stdout;
      if (listed !== "No devices found\n") restoredSoFar++;
      // Every restored device reads, when none is suspended (a device stacked on a suspended
      // one holds its reads until that resumes: the kill can come between suspend and resume).
      const names = listed
        .split("\n")
        .filter((l) => l.includes("\t"))
        .map((l) => l.split("\t")[0]!);
      const attrs = await Promise.all(
        names.map(async (n) => (await udmsetup(env.dir, ["info", "-c", "--noheadings", "-o", "attr", n])).stdout),
      );
      const anySuspended = attrs.some((a) => a.includes("s"));
      for (const [i, name] of names.entries()) {
        if (anySuspended || !attrs[i]!.startsWith("L")) continue; // or no live table
        const client = await WireClient.connect(runPaths(env.dir).nbd, name);
        const r = await client.read(0, 4096);
        expect(r.error === 0 || name.startsWith("snap"), `round ${round}: read of ${name}`).toBe(true);
        await client.disconnect();
      }
      // The next operations, killed after a random number of them and a random delay.
      const plan = ops(round).slice(0, 1 + rng.int(10));
      const running = (async () => {
        for (const op of plan) await udmsetup(env.dir, op);
      })();
      await new Promise((r) => setTimeout(r, rng.range(20, 400)));
      expect(await env.daemon.stop("SIGKILL")).toBe(null);
      await running;
    }
    await env.restart();
    expect(env.daemon.stderr()).not.toContain("could not be restored");
    console.log(`kill-restart: ${ROUNDS} kills, ${restoredSoFar} restarts restored devices, none failed`);
    expect(restoredSoFar).toBe(ROUNDS);
  }, 240_000);
});
