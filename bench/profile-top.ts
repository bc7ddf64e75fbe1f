/**
 * Summarise a V8 .cpuprofile (from `node --cpu-prof`): the functions with the most self time,
 * and self time per source file. Percentages are of the busy time: a daemon's profile (udmd under
 * `npm run bench -- --matrix --profile DIR`) is mostly "(idle)" between jobs, which is left out.
 *
 *   node --import tsx --cpu-prof --cpu-prof-dir=var/prof bench/run.ts --only "random write"
 *   node --import tsx bench/profile-top.ts var/prof/CPU.*.cpuprofile [count]
 */
import fs from "node:fs";

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

export function selfTimes(profile: Profile): {
  byFunction: Map<string, number>;
  byFile: Map<string, number>;
  totalMs: number;
} {
  const nodes = new Map(profile.nodes.map((n) => [n.id, n]));
  const byFunction = new Map<string, number>();
  const byFile = new Map<string, number>();
  let totalMs = 0;
  profile.samples.forEach((id, i) => {
    const ms = (profile.timeDeltas[i] ?? 0) / 1000;
    const { functionName, url, lineNumber } = nodes.get(id)!.callFrame;
    const file =
      functionName === "(idle)"
        ? "(idle)"
        : url.replace(/^file:\/\//, "").replace(process.cwd() + "/", "") || "(native)";
    const fn = `${functionName || "(anonymous)"}  ${file}${url ? `:${lineNumber + 1}` : ""}`;
    byFunction.set(fn, (byFunction.get(fn) ?? 0) + ms);
    byFile.set(file, (byFile.get(file) ?? 0) + ms);
    totalMs += ms;
  });
  return { byFunction, byFile, totalMs };
}

const IDLE = /^\(idle\)/;

function top(map: Map<string, number>, total: number, count: number): string[] {
  return [...map]
    .filter(([name]) => !IDLE.test(name))
    .sort((a, b) => b[1] - a[1])
    .slice(0, count)
    .map(([name, ms]) => `${ms.toFixed(0).padStart(8)} ms ${((100 * ms) / total).toFixed(1).padStart(5)}%  ${name}`);
}

if (import.meta.main) {
  const [file, count = "25"] = process.argv.slice(2);
  if (!file) throw new Error("usage: profile-top.ts <file.cpuprofile> [count]");
  const { byFunction, byFile, totalMs } = selfTimes(JSON.parse(fs.readFileSync(file, "utf8")) as Profile);
  const idleMs = [...byFunction].filter(([name]) => IDLE.test(name)).reduce((sum, [, ms]) => sum + ms, 0);
  const busyMs = totalMs - idleMs;
  console.log(
    `total sampled: ${totalMs.toFixed(0)} ms, busy (not idle): ${busyMs.toFixed(0)} ms; percentages are of the busy time\n\nself time by function:`,
  );
  for (const l of top(byFunction, busyMs, Number(count))) console.log(l);
  console.log("\nself time by file:");
  for (const l of top(byFile, busyMs, 15)) console.log(l);
}
