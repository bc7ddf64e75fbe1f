/**
 * Property: for random tables (linear, striped, zero over several RAM disks) and random I/O, the
 * mapped device behaves like a plain model that maps every sector on its own, and no bio reaching
 * a backing device crosses a target or stripe-chunk boundary.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { Bio, type BlockDevice, MemoryDevice, SECTOR_SIZE } from "../../index.js";
import { pattern, testMapper } from "../../testing/memory-backing.js";

const DEVICES = 4;
const DEV_SECTORS = 4096;

type Seg =
  | { kind: "linear"; len: number; dev: number; offset: number }
  | { kind: "striped"; len: number; chunk: number; stripes: { dev: number; offset: number }[] }
  | { kind: "zero"; len: number };

/** Where md sector s lives: a device and sector, or null for zero. One sector at a time, no cleverness. */
function modelLocate(segs: Seg[], s: number): { dev: number; sector: number } | null {
  let begin = 0;
  for (const seg of segs) {
    if (s < begin + seg.len) {
      const off = s - begin;
      if (seg.kind === "zero") return null;
      if (seg.kind === "linear") return { dev: seg.dev, sector: seg.offset + off };
      const chunk = Math.floor(off / seg.chunk);
      const n = seg.stripes.length;
      const st = seg.stripes[chunk % n]!;
      return { dev: st.dev, sector: st.offset + Math.floor(chunk / n) * seg.chunk + (off % seg.chunk) };
    }
    begin += seg.len;
  }
  throw new Error("beyond end");
}

const segArb: fc.Arbitrary<Seg> = fc.oneof(
  fc.record({
    kind: fc.constant("linear" as const),
    len: fc.integer({ min: 1, max: 200 }),
    dev: fc.nat(DEVICES - 1),
    offset: fc.nat(1000),
  }),
  fc.record({ kind: fc.constant("zero" as const), len: fc.integer({ min: 1, max: 100 }) }),
  fc
    .record({
      n: fc.integer({ min: 1, max: 4 }),
      chunk: fc.integer({ min: 1, max: 24 }),
      rows: fc.integer({ min: 1, max: 6 }),
      devs: fc.array(fc.record({ dev: fc.nat(DEVICES - 1), offset: fc.nat(1000) }), { minLength: 4, maxLength: 4 }),
    })
    .map(({ n, chunk, rows, devs }) => ({
      kind: "striped" as const,
      len: n * chunk * rows,
      chunk,
      stripes: devs.slice(0, n),
    })),
);

function tableText(segs: Seg[]): string {
  let begin = 0;
  const lines: string[] = [];
  for (const seg of segs) {
    if (seg.kind === "linear") lines.push(`${begin} ${seg.len} linear d${seg.dev} ${seg.offset}`);
    else if (seg.kind === "zero") lines.push(`${begin} ${seg.len} zero`);
    else
      lines.push(
        `${begin} ${seg.len} striped ${seg.stripes.length} ${seg.chunk} ${seg.stripes.map((s) => `d${s.dev} ${s.offset}`).join(" ")}`,
      );
    begin += seg.len;
  }
  return lines.join("\n");
}

/** Records every bio a backing device receives, to check splitting. */
class Recording extends MemoryDevice {
  readonly seen: { op: string; sector: number; sectors: number }[] = [];
  override submit(bio: Bio): void {
    this.seen.push({ op: bio.op, sector: bio.sector, sectors: bio.sectors });
    super.submit(bio);
  }
}

const ioArb = fc.record({
  write: fc.boolean(),
  at: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }),
  sectors: fc.integer({ min: 1, max: 64 }),
  seed: fc.nat(),
});

describe("mapping property", () => {
  it("random tables and I/O match a per-sector model; clones never cross boundaries", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(segArb, { minLength: 1, maxLength: 6 }),
        fc.array(ioArb, { minLength: 1, maxLength: 30 }),
        async (segs, ios) => {
          const { dm, backing } = testMapper();
          const devs: Recording[] = [];
          for (let i = 0; i < DEVICES; i++)
            devs.push(backing.add(`d${i}`, new Recording(DEV_SECTORS, { tableName: `d${i}` })));
          const size = segs.reduce((a, s) => a + s.len, 0);
          await dm.create("p", { table: tableText(segs) });
          const h = dm.open("p");
          const model = devs.map(() => Buffer.alloc(DEV_SECTORS * SECTOR_SIZE));

          for (const io of ios) {
            const sector = Math.floor(io.at * size);
            const sectors = Math.min(io.sectors, size - sector);
            if (io.write) {
              const data = pattern(io.seed, sectors * SECTOR_SIZE);
              await h.write(sector, data);
              for (let i = 0; i < sectors; i++) {
                const loc = modelLocate(segs, sector + i);
                if (loc) data.copy(model[loc.dev]!, loc.sector * SECTOR_SIZE, i * SECTOR_SIZE, (i + 1) * SECTOR_SIZE);
              }
            } else {
              const got = await h.read(sector, sectors);
              for (let i = 0; i < sectors; i++) {
                const loc = modelLocate(segs, sector + i);
                const want = loc
                  ? model[loc.dev]!.subarray(loc.sector * SECTOR_SIZE, (loc.sector + 1) * SECTOR_SIZE)
                  : Buffer.alloc(SECTOR_SIZE);
                expect(got.subarray(i * SECTOR_SIZE, (i + 1) * SECTOR_SIZE).equals(want)).toBe(true);
              }
            }
          }
          const seen = devs.map((d) => d.seen.slice());
          // The backing devices hold exactly what the model says.
          for (let d = 0; d < DEVICES; d++) expect((await readAll(devs[d]!)).equals(model[d]!)).toBe(true);
          // Every backing bio maps to one contiguous run inside one segment and one stripe chunk.
          for (let d = 0; d < DEVICES; d++) {
            for (const bio of seen[d]!) checkClone(segs, d, bio);
          }
          await h.close();
          await dm.close();
        },
      ),
      { numRuns: 150 },
    );
  });
});

/**
 * A clone on device d at [sector, sector+sectors) must fit inside one linear area or one stripe
 * chunk of some segment (areas of different segments may overlap, so any fitting one will do).
 */
function checkClone(segs: Seg[], d: number, bio: { sector: number; sectors: number }): void {
  const end = bio.sector + bio.sectors;
  const fits = segs.some((seg) => {
    if (seg.kind === "linear") return seg.dev === d && bio.sector >= seg.offset && end <= seg.offset + seg.len;
    if (seg.kind === "zero") return false;
    return seg.stripes.some((st) => {
      if (st.dev !== d) return false;
      const rel = bio.sector - st.offset;
      if (rel < 0 || rel + bio.sectors > seg.len / seg.stripes.length) return false;
      return Math.floor(rel / seg.chunk) === Math.floor((rel + bio.sectors - 1) / seg.chunk);
    });
  });
  if (!fits) throw new Error(`clone ${bio.sector}+${bio.sectors} on d${d} crosses a target or chunk boundary`);
}

async function readAll(dev: BlockDevice): Promise<Buffer> {
  const buf = Buffer.alloc(dev.sizeSectors * SECTOR_SIZE);
  const { submitAndWait, readBio } = await import("../../core/bio.js");
  await submitAndWait(dev, readBio(0, buf));
  return buf;
}
