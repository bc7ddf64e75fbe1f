/**
 * More dmsetup commands and options through the real udmsetup against a real udmd: name mangling
 * (`--manglename`, `mangle`), `target-version`, `setgeometry`, `ls --exec`, `--checks`, and, as
 * root with the attach tools, `-U/-G/-M` on an attached device's kernel device.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { ControlClient } from "../../dmsetup/control/client.js";
import { attachedDevicePattern, useAttachEnv } from "../support/attach-env.js";
import { udmsetup, useDaemon } from "../support/daemon.js";
import { rootUnavailableReason, skipOrFail } from "../support/requirements.js";

describe("name mangling", () => {
  const env = useDaemon("udm-mangle-");
  const run = (...args: string[]) => udmsetup(env.dir, args);
  /** The names udmd holds, as the control protocol reports them. */
  const daemonNames = async () => {
    const client = await ControlClient.connect(path.join(env.dir, "control"));
    try {
      return ((await client.request("list", {})) as { name: string }[]).map((d) => d.name);
    } finally {
      client.close();
    }
  };

  it("names go to udmd mangled (auto) and come back unmangled; --manglename none shows them as held", async () => {
    expect((await run("create", "a b", "-u", "U 1", "--table", "0 8 zero")).code).toBe(0);
    expect(await daemonNames()).toEqual(["a\\x20b"]);
    expect((await run("ls")).stdout).toBe("a b\t(253:0)\n");
    expect((await run("table", "a b")).stdout).toBe("0 8 zero \n");
    expect((await run("info", "-c", "--noheadings", "-o", "name,uuid,mangled_name")).stdout).toBe("a b:U 1:a\\x20b\n");
    expect(
      (await run("--manglename", "none", "info", "-c", "--noheadings", "-o", "name,uuid,unmangled_name")).stdout,
    ).toBe("a\\x20b:U\\x201:a b\n");
    // hex mangles backslashes too; DM_DEFAULT_NAME_MANGLING_MODE sets the default, as in libdm.
    expect((await run("--manglename", "hex", "create", "h\\x41", "--table", "0 8 zero")).code).toBe(0);
    expect(await daemonNames()).toEqual(["a\\x20b", "h\\x5cx41"]);
    const viaEnv = await udmsetup(env.dir, ["ls"], undefined, { DM_DEFAULT_NAME_MANGLING_MODE: "none" });
    expect(viaEnv.stdout).toBe("a\\x20b\t(253:0)\nh\\x5cx41\t(253:1)\n");
    // auto refuses a name mixing mangled and unmangled parts, and one mangled twice.
    expect(await run("create", "x\\x20y z", "--table", "0 8 zero")).toEqual({
      code: 1,
      stdout: "",
      stderr:
        'The name "x\\x20y z" contains mixed mangled and unmangled characters or it\'s already mangled improperly.\n' +
        'Failed to mangle device name "x\\x20y z".\nCommand failed.\n',
    });
    expect((await run("ls")).stderr).toBe(
      'The name "h\\x5cx41" seems to be mangled more than once. This is not allowed in auto mode.\nCommand failed.\n',
    );
  });

  it("a name held unmangled makes auto-mode commands fail until `mangle` renames it", async () => {
    expect((await run("--manglename", "none", "create", "c d", "--table", "0 8 zero")).code).toBe(0);
    expect((await run("create", "ok", "--table", "0 8 zero")).code).toBe(0);
    expect(await run("ls")).toEqual({
      code: 1,
      stdout: "",
      stderr: 'The name "c d" should be mangled but it contains blacklisted characters.\nCommand failed.\n',
    });
    expect(await run("mangle")).toEqual({
      code: 0,
      stdout: "c d: renaming to c\\x20d\nok: [no UUID]: name already in correct form\n",
      stderr: "",
    });
    expect((await run("ls")).stdout).toBe("c d\t(253:0)\nok\t(253:1)\n");
    expect(await run("mangle", "c\\x20d")).toEqual({
      code: 0,
      stdout: "c\\x20d: [no UUID]: name already in correct form\n",
      stderr: "",
    });
    // --manglename none asks for names held unmangled.
    expect((await run("--manglename", "none", "mangle", "c\\x20d")).stdout).toBe("c\\x20d: renaming to c d\n");
    expect(await daemonNames()).toEqual(["c d", "ok"]);
  });

  it("mangle refuses a uuid in the wrong form, a name mangled twice or mixed, and a missing device", async () => {
    const none = (...args: string[]) => run("--manglename", "none", ...args);
    expect((await none("create", "e", "-u", "U 1", "--table", "0 8 zero")).code).toBe(0);
    expect((await none("create", "t\\x5cx41", "--table", "0 8 zero")).code).toBe(0);
    expect((await none("create", "m\\x20n o", "--table", "0 8 zero")).code).toBe(0);
    expect(await run("mangle", "e")).toEqual({
      code: 1,
      stdout: "",
      stderr:
        "e: U 1: UUID in incorrect form. \nUnable to change device UUID. The device must be deactivated first.\nCommand failed.\n",
    });
    expect((await run("mangle", "t\\x5cx41")).stderr).toBe(
      'The name "t\\x5cx41" seems to be mangled more than once. Manual intervention required to rename the device.\n' +
        "Command failed.\n",
    );
    expect((await run("mangle", "m\\x20n o")).stderr).toBe(
      'The name "m\\x20n o" contains mixed mangled and unmangled characters or it\'s already mangled improperly.\n' +
        'Failed to mangle device name "m\\x20n o".\nCommand failed.\n',
    );
    expect(await run("mangle", "nosuch")).toEqual({ code: 1, stdout: "", stderr: "Command failed.\n" });
    // Over every device: the others are still done, and the command fails at the end.
    expect((await none("create", "p q", "--table", "0 8 zero")).code).toBe(0);
    const all = await run("mangle");
    expect({ code: all.code, stdout: all.stdout }).toEqual({ code: 1, stdout: "p q: renaming to p\\x20q\n" });
    expect(all.stderr).toMatch(/^e: U 1: UUID in incorrect form\. \n(.*\n)*Command failed\.\n$/);
    expect(await daemonNames()).toEqual(["e", "m\\x20n o", "p\\x20q", "t\\x5cx41"]);
  });
});

describe("target-version, setgeometry, ls --exec, --checks", () => {
  const env = useDaemon("udm-more-");
  const run = (...args: string[]) => udmsetup(env.dir, args);

  it("target-version prints the lines `targets` prints for those targets; an unknown one fails there", async () => {
    const targets = (await run("targets")).stdout.split("\n");
    const line = (name: string) => `${targets.find((l) => l.startsWith(`${name} `))}\n`;
    expect(await run("target-version", "zero", "linear")).toEqual({
      code: 0,
      stdout: line("zero") + line("linear"),
      stderr: "",
    });
    expect(await run("target-version", "striped", "nosuch", "zero")).toEqual({
      code: 1,
      stdout: line("striped"),
      stderr: "device-mapper: target-version ioctl on nosuch  failed: Invalid argument\nCommand failed.\n",
    });
  });

  it("setgeometry keeps the geometry with the device (--json info), checked as the kernel checks it", async () => {
    expect((await run("create", "g", "--table", "0 64 zero")).code).toBe(0);
    const geometry = async (name: string) => JSON.parse((await run("--json", "info", name)).stdout).geometry;
    expect(await geometry("g")).toEqual({ cylinders: 0, heads: 0, sectors: 0, start: "0" });
    expect(await run("setgeometry", "g", "1023", "255", "63", "6")).toEqual({ code: 0, stdout: "", stderr: "" });
    expect(await geometry("g")).toEqual({ cylinders: 1023, heads: 255, sectors: 63, start: "6" });
    const refused = (reason: string, name = "g", errno = "Invalid argument") =>
      `${reason}\ndevice-mapper: setgeometry ioctl on ${name}  failed: ${errno}\nCommand failed.\n`;
    for (const [values, reason] of [
      [["65536", "1", "1", "0"], "Geometry exceeds range limits."],
      [["1", "256", "1", "0"], "Geometry exceeds range limits."],
      [["1", "1", "256", "0"], "Geometry exceeds range limits."],
      [["2", "3", "4", "25"], "Start sector is beyond the geometry limits."],
      [["x", "1", "1", "0"], "Unable to interpret geometry settings."],
      [["+1", "1", "1", "0"], "Unable to interpret geometry settings."],
      [["1", "1", "1", "0 "], "Unable to interpret geometry settings."],
    ] as const) {
      expect(await run("setgeometry", "g", ...values), values.join(" ")).toEqual({
        code: 1,
        stdout: "",
        stderr: refused(reason),
      });
    }
    expect(await geometry("g")).toEqual({ cylinders: 1023, heads: 255, sectors: 63, start: "6" });
    expect((await run("setgeometry", "nosuch", "1", "1", "1", "0")).stderr).toContain(
      "device-mapper: setgeometry ioctl on nosuch  failed: No such device or address\n",
    );
    // It follows a rename; a table of the same size keeps it, one of another size wipes it (__bind).
    expect((await run("rename", "g", "h")).code).toBe(0);
    expect((await run("reload", "h", "--table", "0 64 error")).code).toBe(0);
    expect((await run("resume", "h")).code).toBe(0);
    expect(await geometry("h")).toEqual({ cylinders: 1023, heads: 255, sectors: 63, start: "6" });
    expect((await run("reload", "h", "--table", "0 32 error")).code).toBe(0);
    expect((await run("resume", "h")).code).toBe(0);
    expect(await geometry("h")).toEqual({ cylinders: 0, heads: 0, sectors: 0, start: "0" });
  });

  it("ls --exec runs the command on each device's path in turn; -v lists each first; --target and -S choose", async () => {
    const log = path.join(env.files, "exec.log");
    const script = path.join(env.files, "record.sh");
    fs.writeFileSync(script, `#!/bin/sh\necho "$@" >> ${log}\n`, { mode: 0o755 });
    const exec = (...args: string[]) =>
      udmsetup(env.dir, ["ls", "--exec", `${script}  one\ttwo`, ...args], undefined, {
        UDM_DEV_DIR: "/x/dev",
      });
    const ran = () => {
      const text = fs.existsSync(log) ? fs.readFileSync(log, "utf8") : "";
      fs.rmSync(log, { force: true });
      return text;
    };
    expect(await exec()).toEqual({ code: 0, stdout: "No devices found\n", stderr: "" });
    expect(ran()).toBe("");
    for (const [name, table] of [
      ["a", "0 8 zero"],
      ["b", "0 8 error"],
      ["c d", "0 8 zero"],
    ])
      expect((await udmsetup(env.dir, ["create", name!, "--table", table!])).code).toBe(0);
    expect(await exec()).toEqual({ code: 0, stdout: "", stderr: "" });
    expect(ran()).toBe("one two /x/dev/a\none two /x/dev/b\none two /x/dev/c\\x20d\n");
    expect(await exec("-v", "--target", "zero")).toEqual({
      code: 0,
      stdout: "a\t(253, 0)\nc d\t(253, 2)\n",
      stderr: "",
    });
    expect(ran()).toBe("one two /x/dev/a\none two /x/dev/c\\x20d\n");
    expect((await exec("-S", "name=b")).code).toBe(0);
    expect(ran()).toBe("one two /x/dev/b\n");
    expect(await run("ls", "--exec", " ")).toEqual({ code: 1, stdout: "", stderr: "Command failed.\n" });
  });

  it("suspend --checks refuses a device using an already-suspended one, at any depth", async () => {
    await run("create", "lo", "--table", "0 8 zero");
    await run("create", "mid", "--table", "0 8 linear /dev/mapper/lo 0");
    await run("create", "top", "--table", "0 8 linear /dev/mapper/mid 0");
    expect((await run("suspend", "lo")).code).toBe(0);
    expect(await run("suspend", "--checks", "mid")).toEqual({
      code: 1,
      stdout: "",
      stderr:
        "Internal error: Attempt to suspend device midthat uses already-suspended device (253:0)\nCommand failed.\n",
    });
    expect((await run("suspend", "--checks", "top")).stderr).toBe(
      "Internal error: Attempt to suspend device (253:1) that uses already-suspended device (253:0)\nCommand failed.\n",
    );
    expect((await run("info", "-c", "--noheadings", "-o", "name,attr")).stdout).toBe("lo:L-sw\nmid:L--w\ntop:L--w\n");
    expect((await run("suspend", "--checks", "lo")).code).toBe(0); // itself suspended: not a dependency
    expect((await run("resume", "lo")).code).toBe(0);
    expect(await run("suspend", "--checks", "top")).toEqual({ code: 0, stdout: "", stderr: "" });
    expect((await run("resume", "top")).code).toBe(0);
  });
});

const SUITE = "udmsetup -U/-G/-M on attached devices";
const skipReason = rootUnavailableReason([]);
skipOrFail(SUITE, skipReason);

describe.skipIf(skipReason !== null)(SUITE, () => {
  const env = useAttachEnv("udm-owner-");

  it("create on an auto-attaching udmd and attach give the kernel device the owner and mode asked for", async () => {
    await env.start(["--dev-dir", env.devDir, "--auto-attach"]);
    const table = `0 2048 linear ${env.img} 0`;
    const changed: string[] = [];
    try {
      const created = await env.run("create", "-U", "1234", "-G", "5678", "-M", "0640", env.name, "--table", table);
      expect(created).toMatchObject({ code: 0, stderr: "" });
      const dev = fs.readlinkSync(path.join(env.devDir, env.name));
      changed.push(dev);
      expect(dev).toMatch(attachedDevicePattern);
      const st = fs.statSync(dev);
      expect([st.uid, st.gid, st.mode & 0o7777]).toEqual([1234, 5678, 0o640]);

      expect((await env.run("detach", env.name)).code).toBe(0);
      const attached = await env.run("attach", "-M", "0600", "-G", "42", env.name);
      expect(attached).toMatchObject({ code: 0, stderr: "" });
      changed.push(attached.stdout.trim());
      const again = fs.statSync(attached.stdout.trim());
      expect([again.gid, again.mode & 0o7777]).toEqual([42, 0o600]);
    } finally {
      // Kernel devices outlive attachments: give them back the owner and mode of their untouched siblings.
      restoreLikeSiblings(changed);
    }
  });
});

function restoreLikeSiblings(nodes: readonly string[]): void {
  for (const node of nodes) {
    const kind = path.basename(node).replace(/\d+$/, "");
    const sibling = fs
      .readdirSync("/dev")
      .map((n) => path.join("/dev", n))
      .find((p) => new RegExp(`^/dev/${kind}\\d+$`).test(p) && !nodes.includes(p));
    const like = sibling ? fs.statSync(sibling) : { uid: 0, gid: 0, mode: 0o600 };
    fs.chownSync(node, like.uid, like.gid);
    fs.chmodSync(node, like.mode & 0o7777);
  }
}
