/**
 * udm-replay-log against xfstests' replay-log (src/log-writes/replay-log.c): for each command line
 * in test/fixtures/replay-log/cases.ts, the same stdout, stderr, exit status and replayed bytes as
 * the C tool gave on the same log (recorded in golden.json by record.ts; re-record after changing
 * the cases).
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { main } from "../../dmsetup/bin/replay-log.js";
import { CASES, caseArgs, type GoldenResult, makeLog, REPLAY_BYTES, sha256 } from "../fixtures/replay-log/cases.js";

const golden = JSON.parse(
  fs.readFileSync(path.join(import.meta.dirname, "../fixtures/replay-log/golden.json"), "utf8"),
) as GoldenResult[];
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-replay-compat-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
const log = path.join(dir, "log");
const replay = path.join(dir, "replay");
fs.writeFileSync(log, makeLog());

describe("udm-replay-log matches xfstests' replay-log", () => {
  it("golden.json was recorded from the cases as they are now", () => {
    expect(golden.map((g) => g.args)).toEqual(CASES);
  });

  it.each(golden.map((g) => [g.args.join(" "), g] as const))("%s", async (_name, g) => {
    fs.writeFileSync(replay, Buffer.alloc(REPLAY_BYTES, 0xee));
    let stdout = "";
    let stderr = "";
    const status = await main(caseArgs(g.args, log, replay), {
      out: (t) => (stdout += t),
      err: (t) => (stderr += t),
      system: (command) => (command === "true" ? 0 : 1),
    });
    expect({ stdout, stderr, status }).toEqual({ stdout: g.stdout, stderr: g.stderr, status: g.status });
    if (g.replaySha256) expect(sha256(fs.readFileSync(replay))).toBe(g.replaySha256);
  });
});
