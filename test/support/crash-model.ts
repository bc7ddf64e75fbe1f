/**
 * What a crash may and may not lose, for test/integration/crash-daemon.test.ts.
 *
 * Writes to a block are issued one at a time (one lane per block), so the writes covering a
 * sector form a sequence in issue order. A write is durable once acknowledged with FUA, or once a
 * FLUSH on the same export, sent after the write's acknowledgement, has itself been acknowledged
 * (NBD: a flush covers every write completed before it was sent, on any connection). After the
 * crash each sector must hold the last durable write covering it or any later one (acknowledged
 * or still in flight: they may or may not have landed, also partly); a sector no durable write
 * covers may still hold what it held before.
 */
import { BLOCK, SECTOR, decodeStamp } from "./verified-io.js";

export interface WriteRecord {
  id: number;
  device: string;
  firstSector: number;
  sectors: number;
  fua: boolean;
  state: "in flight" | "acked" | "failed";
  /** Position in the history when the acknowledgement arrived. */
  ackTick: number;
}

export interface CrashReport {
  sectorsChecked: number;
  /** Durable writes found intact (every sector holds it or a later write). */
  durableWritesChecked: number;
  problems: string[];
}

export class WriteHistory {
  private tick = 0;
  /** Per device: writes acknowledged before this tick are durable (an acknowledged flush was sent then). */
  private readonly flushedBefore = new Map<string, number>();
  /** Per device and block: writes in issue order. */
  private readonly blocks = new Map<string, Map<number, WriteRecord[]>>();
  readonly all: WriteRecord[] = [];

  issue(device: string, id: number, firstSector: number, sectors: number, fua: boolean): WriteRecord {
    const w: WriteRecord = { id, device, firstSector, sectors, fua, state: "in flight", ackTick: 0 };
    let perDevice = this.blocks.get(device);
    if (!perDevice) this.blocks.set(device, (perDevice = new Map()));
    const block = Math.floor((firstSector * SECTOR) / BLOCK);
    let list = perDevice.get(block);
    if (!list) perDevice.set(block, (list = []));
    list.push(w);
    this.all.push(w);
    return w;
  }

  acked(w: WriteRecord): void {
    w.state = "acked";
    w.ackTick = ++this.tick;
  }

  failed(w: WriteRecord): void {
    w.state = "failed";
  }

  /** A FLUSH is being sent: returns its tick, to pass to flushAcked. */
  flushSent(): number {
    return ++this.tick;
  }

  flushAcked(device: string, sentTick: number): void {
    this.flushedBefore.set(device, Math.max(this.flushedBefore.get(device) ?? 0, sentTick));
  }

  durable(w: WriteRecord): boolean {
    return w.state === "acked" && (w.fua || w.ackTick < (this.flushedBefore.get(w.device) ?? 0));
  }

  counts(device?: string): { issued: number; acked: number; durable: number; inFlight: number; failed: number } {
    const ws = device ? this.all.filter((w) => w.device === device) : this.all;
    return {
      issued: ws.length,
      acked: ws.filter((w) => w.state === "acked").length,
      durable: ws.filter((w) => this.durable(w)).length,
      inFlight: ws.filter((w) => w.state === "in flight").length,
      failed: ws.filter((w) => w.state === "failed").length,
    };
  }

  /**
   * Check a device's content after the crash. `before` is what it held before these writes (the
   * whole device); sectors no write covers must still hold exactly that.
   */
  verify(device: string, content: Buffer, before: Buffer): CrashReport {
    const report: CrashReport = { sectorsChecked: 0, durableWritesChecked: 0, problems: [] };
    const perDevice = this.blocks.get(device) ?? new Map<number, WriteRecord[]>();
    const brokenWrites = new Set<WriteRecord>();
    const problem = (what: string) => {
      if (report.problems.length < 20) report.problems.push(`${device}: ${what}`);
      else report.problems.length++;
    };
    for (let s = 0; s < content.length / SECTOR; s++) {
      const got = content.subarray(s * SECTOR, (s + 1) * SECTOR);
      const was = before.subarray(s * SECTOR, (s + 1) * SECTOR);
      const writes = (perDevice.get(Math.floor((s * SECTOR) / BLOCK)) ?? []).filter(
        (w) => w.firstSector <= s && s < w.firstSector + w.sectors,
      );
      report.sectorsChecked++;
      if (writes.length === 0) {
        if (!got.equals(was)) problem(`sector ${s}, never written, changed: ${show(got)} instead of ${show(was)}`);
        continue;
      }
      let lastDurable = -1;
      writes.forEach((w, i) => {
        if (this.durable(w)) lastDurable = i;
      });
      const allowed = writes.slice(Math.max(0, lastDurable));
      const stampOf = decodeStamp(got);
      const fromWrite =
        stampOf && stampOf.intact && stampOf.sector === s ? allowed.find((w) => w.id === stampOf.writeId) : undefined;
      if (fromWrite) continue;
      if (lastDurable < 0 && got.equals(was)) continue;
      const lost = lastDurable >= 0 ? writes[lastDurable]! : null;
      if (lost) brokenWrites.add(lost);
      problem(
        `sector ${s} holds ${show(got)}; allowed: ${lastDurable < 0 ? "its old content or " : ""}writes ${allowed.map((w) => `#${w.id}(${w.state}${this.durable(w) ? ", durable" : ""})`).join(" ")}`,
      );
    }
    for (const list of perDevice.values()) {
      for (const w of list) if (this.durable(w) && !brokenWrites.has(w)) report.durableWritesChecked++;
    }
    return report;
  }
}

function show(sector: Buffer): string {
  const s = decodeStamp(sector);
  return s
    ? `write #${s.writeId} of sector ${s.sector}${s.intact ? "" : " (torn)"}`
    : `unstamped ${sector.subarray(0, 16).toString("hex")}`;
}
