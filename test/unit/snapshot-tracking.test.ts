/**
 * The snapshot engine's two bookkeeping classes on their own, pinning their contracts where the
 * engine alone does not (mutation testing found these gaps, docs/testing.md "Mutation testing"):
 * TrackedChunks (reads in flight per origin chunk, and who waits for them) and InOrderGate
 * (exceptions reach the store in allocation order).
 */
import { describe, expect, it } from "vitest";
import { InOrderGate, PendingException } from "../../targets/snapshot/pending.js";
import { TrackedChunks } from "../../targets/snapshot/tracked-chunks.js";

/** Whether `p` has settled after the microtasks queued so far have run. */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  void p.then(() => (done = true));
  await new Promise<void>((r) => setImmediate(r));
  return done;
}

describe("TrackedChunks", () => {
  it("whenUntracked resolves at once for a chunk with no read in flight", async () => {
    const t = new TrackedChunks();
    t.track(3);
    expect(await settled(t.whenUntracked(4))).toBe(true);
  });

  it("every waiter on a chunk wakes when its last read is untracked, not before; nothing is left behind", async () => {
    const t = new TrackedChunks();
    t.track(7);
    t.track(7);
    const first = t.whenUntracked(7);
    const second = t.whenUntracked(7);
    t.untrack(7);
    expect(await settled(first)).toBe(false);
    expect(t.waiting).toBe(1);
    t.untrack(7);
    expect(await settled(first)).toBe(true);
    expect(await settled(second)).toBe(true);
    expect(t.size).toBe(0);
    expect(t.waiting).toBe(0);
  });

  it("untracking a chunk that is not tracked is a bug, and says so", () => {
    const t = new TrackedChunks();
    expect(() => t.untrack(5)).toThrow("untrack of chunk 5 that is not tracked");
  });
});

describe("InOrderGate", () => {
  it("passes exceptions on in allocation order whatever order their copies finish in", () => {
    const gate = new InOrderGate();
    const pes = [0, 1, 2, 3].map((seq) => new PendingException(10 + seq, 20 + seq, seq));
    const out: number[] = [];
    const complete = (pe: PendingException) => out.push(pe.sequence);
    gate.copied(pes[2]!, complete);
    gate.copied(pes[1]!, complete);
    expect(out).toEqual([]);
    expect(gate.held).toBe(2);
    gate.copied(pes[0]!, complete);
    expect(out).toEqual([0, 1, 2]);
    gate.copied(pes[3]!, complete);
    expect(out).toEqual([0, 1, 2, 3]);
    expect(gate.held).toBe(0);
  });

  it("the same sequence fed twice while held is a bug, and says so", () => {
    const gate = new InOrderGate();
    const late = new PendingException(1, 2, 1);
    gate.copied(late, () => undefined);
    expect(() => gate.copied(late, () => undefined)).toThrow("two pending exceptions with sequence 1");
  });
});
