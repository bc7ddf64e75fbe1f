/**
 * udmsetup's daemon-less commands against the real dmsetup (lvm2's, from Debian's dmsetup
 * package): `splitname` reports, the udev cookie commands, `help`. dmsetup runs these without the
 * kernel driver (it only complains about the driver on stderr first), so their stdout and exit
 * status must be the same, byte for byte.
 */
import { execFile } from "node:child_process";
import { describe, expect, it } from "vitest";
import { UDMSETUP } from "../support/daemon.js";
import { missingTools } from "../support/requirements.js";

const missing = missingTools("dmsetup comparison", ["dmsetup"]);

function run(cmd: string, args: string[]): Promise<{ code: number; stdout: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { env: { ...process.env, LANG: "C" } }, (err, stdout) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout }),
    );
  });
}

const CASES = [
  ["splitname", "vg-lv"],
  ["splitname", "vg0-lv--x-layer"],
  ["splitname", "vg-lv", "FOO"],
  ["splitname", "-o", "vg_name,lv_name", "vg--x-lv"],
  ["splitname", "a-b-c-d"],
  ["splitname", "-c", "--noheadings", "vg-lv"],
  ["splitname", "--noheadings", "--separator", ",", "vg-lv-l"],
  ["splitname", "--nameprefixes", "vg-lv-l"],
  ["splitname", "--rows", "vg-lv-l"],
  ["udevflags", "12582912"],
  ["udevflags", "0x10"],
  ...Array.from({ length: 16 }, (_, bit) => ["udevflags", String(((1 << bit) << 16) >>> 0)]),
  ["udevflags", "0xffff0d4d"],
  ["udevcookies"],
  ["udevcomplete_all", "-y"],
  ["udevcomplete_all", "5", "-y"],
];

describe.skipIf(missing.length > 0)("udmsetup and dmsetup print the same", () => {
  it.each(CASES.map((c) => [c.join(" "), c]))("%s", async (_label, args) => {
    const [ours, theirs] = await Promise.all([
      run(process.execPath, [UDMSETUP, "--no-autostart", ...(args as string[])]),
      run("dmsetup", args as string[]),
    ]);
    expect(ours).toEqual(theirs);
  });
});
