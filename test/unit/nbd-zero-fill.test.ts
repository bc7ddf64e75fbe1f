/**
 * The NBD server's zero fill (nbd/zero-fill.ts), on sinks that record what they are given: the
 * range covered exactly once in chunks, no FUA on the chunks and one flush after them for a FUA
 * request, the first error reported, a cancelled fill stopping, and sinks that complete every
 * bio inside submit (a RAM disk) handled without recursion however long the range.
 */
import { describe, expect, it } from "vitest";
import { Bio, BioFlags, type BioSink, type BioStatus, SECTOR_SIZE } from "../../core/bio.js";
import { ZERO_FILL_CHUNK, submitZeroFill } from "../../nbd/zero-fill.js";

const CHUNK_SECTORS = ZERO_FILL_CHUNK / SECTOR_SIZE;
const ZERO = Buffer.alloc(ZERO_FILL_CHUNK);

/** A sink that completes each bio at once (inside submit) with `status(bio)`, and records it. */
function syncSink(status: (bio: Bio) => BioStatus = () => "ok") {
  const seen: { op: string; sector: number; sectors: number; flags: number; zero: boolean }[] = [];
  const sink: BioSink = {
    submit(bio: Bio) {
      seen.push({
        op: bio.op,
        sector: bio.sector,
        sectors: bio.sectors,
        flags: bio.flags,
        zero: bio.data.equals(ZERO.subarray(0, bio.data.length)),
      });
      bio.complete(status(bio));
    },
  };
  return { sink, seen };
}

function fill(
  sink: BioSink,
  sector: number,
  sectors: number,
  flags = 0,
  cancelled?: () => boolean,
): Promise<BioStatus> {
  return new Promise((resolve) => {
    const bio = new Bio("write-zeroes", sector, sectors, null, flags, { bioDone: (b) => resolve(b.status) });
    bio.markInFlight();
    submitZeroFill(sink, bio, cancelled);
  });
}

describe("nbd zero fill", () => {
  it("covers the range once, in chunks of zeros, without FUA, then one flush for a FUA request", async () => {
    const { sink, seen } = syncSink();
    const sectors = 3 * CHUNK_SECTORS + 5;
    expect(await fill(sink, 7, sectors, BioFlags.FUA)).toBe("ok");
    const writes = seen.filter((s) => s.op === "write");
    expect(writes.map((w) => [w.sector, w.sectors])).toEqual([
      [7, CHUNK_SECTORS],
      [7 + CHUNK_SECTORS, CHUNK_SECTORS],
      [7 + 2 * CHUNK_SECTORS, CHUNK_SECTORS],
      [7 + 3 * CHUNK_SECTORS, 5],
    ]);
    expect(writes.every((w) => w.zero && w.flags === 0)).toBe(true);
    expect(seen.at(-1)).toMatchObject({ op: "flush", flags: BioFlags.PREFLUSH });
    expect(seen.filter((s) => s.op === "flush")).toHaveLength(1);
  });

  it("no flush without FUA", async () => {
    const { sink, seen } = syncSink();
    expect(await fill(sink, 0, 8)).toBe("ok");
    expect(seen.map((s) => s.op)).toEqual(["write"]);
  });

  it("a sink that completes inside submit: 4 GiB in 4,096 chunks, no deep recursion", async () => {
    const { sink, seen } = syncSink();
    expect(await fill(sink, 0, (4 * 1024 * ZERO_FILL_CHUNK) / SECTOR_SIZE)).toBe("ok");
    expect(seen).toHaveLength(4096);
  });

  it("the first error is the request's, no chunk is issued after it, and no flush", async () => {
    const { sink, seen } = syncSink((bio) => (bio.sector === 2 * CHUNK_SECTORS ? "EIO" : "ok"));
    expect(await fill(sink, 0, 10 * CHUNK_SECTORS, BioFlags.FUA)).toBe("EIO");
    expect(seen.map((s) => s.sector)).toEqual([0, CHUNK_SECTORS, 2 * CHUNK_SECTORS]);
  });

  it("stops once cancelled (the connection closed)", async () => {
    let closed = false;
    const { sink, seen } = syncSink((bio) => {
      if (bio.sector === CHUNK_SECTORS) closed = true;
      return "ok";
    });
    expect(await fill(sink, 0, 10 * CHUNK_SECTORS, 0, () => closed)).toBe("ENXIO");
    expect(seen).toHaveLength(2);
  });
});
