/**
 * udmsetup as scripts use it, where scripts go wrong: output into a pipe whose reader has left
 * (`udmsetup info | head -1`), stacks removed with remove_all, a daemon stopped while a lower
 * device is suspended under I/O.
 */
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { runPaths } from "../../dmsetup/daemon/run-dir.js";
import { UDMSETUP, udmsetup, useDaemon } from "../support/daemon.js";
import { WireClient } from "../support/nbd-client.js";

describe("udmsetup output", () => {
  it("ends quietly with a SIGPIPE status when its reader has gone (EPIPE), like dmsetup", async () => {
    const child = spawn(process.execPath, [UDMSETUP, "--help"], { stdio: ["ignore", "pipe", "pipe"] });
    child.stdout.destroy(); // the only reader of the pipe is gone before anything is written
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const code = await new Promise<number | null>((resolve) => child.on("close", (c) => resolve(c)));
    expect(stderr).toBe("");
    expect(code).toBe(128 + 13);
  });
});

describe("remove_all", () => {
  const env = useDaemon("udm-remove-all-");

  it("removes a stack whatever the listing order: passes until one removes nothing", async () => {
    const file = path.join(env.files, "disk.img");
    fs.writeFileSync(file, Buffer.alloc(1 << 20));
    // "a" lists before "b", which holds it: a single pass fails on "a" and stops short.
    expect((await udmsetup(env.dir, ["create", "a", "--table", `0 2048 linear ${file} 0`])).code).toBe(0);
    expect((await udmsetup(env.dir, ["create", "b", "--table", "0 2048 linear /dev/mapper/a 0"])).code).toBe(0);
    expect((await udmsetup(env.dir, ["create", "c", "--table", "0 2048 linear /dev/mapper/b 0"])).code).toBe(0);
    const r = await udmsetup(env.dir, ["remove_all"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect((await udmsetup(env.dir, ["ls"])).stdout).toBe("No devices found\n");
  });
});

describe("SIGTERM", () => {
  const env = useDaemon("udm-sigterm-");

  it("finishes shutdown while a lower device is suspended with I/O held: I/O fails, files go, exit 0", async () => {
    const file = path.join(env.files, "disk.img");
    fs.writeFileSync(file, Buffer.alloc(1 << 20));
    expect((await udmsetup(env.dir, ["create", "a", "--table", `0 2048 linear ${file} 0`])).code).toBe(0);
    expect((await udmsetup(env.dir, ["create", "b", "--table", "0 2048 linear /dev/mapper/a 0"])).code).toBe(0);
    expect((await udmsetup(env.dir, ["suspend", "a"])).code).toBe(0);
    const client = await WireClient.connect(runPaths(env.dir).nbd, "b");
    const held = client.write(0, Buffer.alloc(4096, 7)); // waits in a's queue
    const code = await env.daemon.stop("SIGTERM");
    expect(code).toBe(0);
    expect(env.daemon.stderr()).toContain('"udmd stopped"');
    expect(fs.readdirSync(env.dir)).toEqual([]);
    const reply = await held.catch((err: Error) => err);
    expect(reply instanceof Error || reply.error !== 0).toBe(true); // failed, or the connection ended
    client.destroy();
  });
});

describe("create is one operation in the daemon", () => {
  const env = useDaemon("udm-create-");

  it("a table over the control protocol's limit (10^6 lines) is refused before anything is created", async () => {
    const file = path.join(env.files, "huge.table");
    fs.writeFileSync(file, Array.from({ length: 1_000_000 }, (_, i) => `${i} 1 zero\n`).join(""));
    const r = await udmsetup(env.dir, ["create", "huge", file]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^create: the request is \d+\.\d MiB; the control protocol takes at most 16\.0 MiB\n/);
    expect((await udmsetup(env.dir, ["ls"])).stdout).toBe("No devices found\n");
  });

  it("10^6 arguments on one line reach the target, which refuses them with its message", async () => {
    const r = await udmsetup(env.dir, ["create", "args", "--table", `0 8 zero ${"x ".repeat(60_000)}`]);
    expect(r.stderr).toBe(
      "zero: No arguments required\ndevice-mapper: reload ioctl on args  failed: Invalid argument\nCommand failed.\n",
    );
    const file = path.join(env.files, "args.table");
    fs.writeFileSync(file, `0 8 zero ${"x ".repeat(1_000_000)}\n`);
    const million = await udmsetup(env.dir, ["create", "args", file]);
    expect(million.stderr).toBe(r.stderr);
    expect((await udmsetup(env.dir, ["ls"])).stdout).toBe("No devices found\n");
  });
});

describe("bad input through udmsetup", () => {
  const env = useDaemon("udm-bad-input-");

  /** Every case fails with exactly these lines, and leaves no device behind. */
  const refused = async (args: string[], stderr: string, stdin?: string) => {
    const r = await udmsetup(env.dir, args, stdin);
    expect({ code: r.code, stderr: r.stderr }, args.join(" ")).toEqual({ code: 1, stderr });
  };

  it("numbers the kernel would not parse, in table positions and in target arguments", async () => {
    const file = path.join(env.files, "disk.img");
    fs.writeFileSync(file, Buffer.alloc(1 << 20));
    const badFormat = "Invalid format on line 1 of table on command line.\nCommand failed.\n";
    for (const n of ["1e3", "-1", "0x10", "9007199254740993", "18446744073709551616"]) {
      await refused(["create", "x", "--table", `0 ${n} zero`], badFormat);
      await refused(
        ["create", "x", "--table", `0 8 linear ${file} ${n}`],
        "linear: Invalid device sector\ndevice-mapper: reload ioctl on x  failed: Invalid argument\nCommand failed.\n",
      );
    }
    expect((await udmsetup(env.dir, ["ls"])).stdout).toBe("No devices found\n");
  });

  it("names: a slash, 128 bytes are refused; unicode, 127 bytes, __proto__ are names like any other", async () => {
    await refused(
      ["create", "a/b", "--table", "0 8 zero"],
      "device name cannot contain '/'\ndevice-mapper: create ioctl on a/b  failed: Invalid argument\nCommand failed.\n",
    );
    const long = "x".repeat(128);
    await refused(
      ["create", long, "--table", "0 8 zero"],
      `Invalid new mapped device name or uuid string supplied.\ndevice-mapper: create ioctl on ${long}  failed: Invalid argument\nCommand failed.\n`,
    );
    for (const name of ["ünï", "x".repeat(127), "__proto__", "constructor"]) {
      expect((await udmsetup(env.dir, ["create", name, "--table", "0 8 zero"])).code, name).toBe(0);
      expect((await udmsetup(env.dir, ["table", name])).stdout, name).toBe("0 8 zero \n");
    }
    expect((await udmsetup(env.dir, ["remove_all"])).code).toBe(0);
  });

  it("tables on stdin with CRLF line ends load; a NUL is part of a word, refused by name", async () => {
    expect((await udmsetup(env.dir, ["create", "crlf"], "0 8 zero\r\n")).code).toBe(0);
    await refused(
      ["create", "nul"],
      "zero\0: unknown target type\ndevice-mapper: reload ioctl on nul  failed: Invalid argument\nCommand failed.\n",
      "0 8 zero\0\n",
    );
  });

  it("a directory, a FIFO, a socket and /dev/null are not devices", async () => {
    const fifo = path.join(env.files, "fifo");
    spawnSync("mkfifo", [fifo]);
    for (const dev of [env.files, fifo, runPaths(env.dir).control, "/dev/null"]) {
      await refused(
        ["create", "x", "--table", `0 8 linear ${dev} 0`],
        `linear: Device lookup failed: ${dev}: not a regular file or block device\n` +
          "device-mapper: reload ioctl on x  failed: No such device\nCommand failed.\n",
      );
    }
  });
});

describe("remove --deferred", () => {
  const env = useDaemon("udm-deferred-");

  it("marks a device an NBD client has open; it goes when the client leaves", async () => {
    expect((await udmsetup(env.dir, ["create", "d", "--table", "0 8 zero"])).code).toBe(0);
    const client = await WireClient.connect(runPaths(env.dir).nbd, "d");
    const busy = await udmsetup(env.dir, ["remove", "d"]);
    expect(busy.code).toBe(1);
    expect(await udmsetup(env.dir, ["remove", "--deferred", "d"])).toMatchObject({ code: 0, stderr: "" });
    expect((await udmsetup(env.dir, ["info", "d"])).stdout).toContain("State:             ACTIVE (DEFERRED REMOVE)\n");
    expect((await client.read(0, 4096)).error).toBe(0); // still works meanwhile
    const events = (await udmsetup(env.dir, ["info", "-c", "--noheadings", "-o", "events", "d"])).stdout.trim();
    await client.disconnect();
    // The removal raises an event: wait returns once it is done (or says the device is gone).
    await udmsetup(env.dir, ["wait", "d", events]);
    const listed = (await udmsetup(env.dir, ["ls"])).stdout;
    expect(listed).toBe("No devices found\n");
  });
});

describe("more dmsetup commands", () => {
  const env = useDaemon("udm-more-cmds-");

  it("--json info with no devices prints an empty list; without --json, dmsetup's line", async () => {
    expect(await udmsetup(env.dir, ["--json", "info"])).toEqual({ code: 0, stdout: "[]\n", stderr: "" });
    expect(await udmsetup(env.dir, ["info"])).toEqual({ code: 0, stdout: "No devices found\n", stderr: "" });
  });

  it("--version is the version command; wipe_table swaps in one error target of the same size", async () => {
    const version = await udmsetup(env.dir, ["--version"]);
    expect(version.stdout).toBe((await udmsetup(env.dir, ["version"])).stdout);
    expect(version.stdout).toMatch(/^Library version: {3}.+\nDriver version: {4}4\.48\.0\n$/);

    const file = path.join(env.files, "disk.img");
    fs.writeFileSync(file, Buffer.alloc(1 << 20));
    expect((await udmsetup(env.dir, ["create", "w", "--table", `0 2048 linear ${file} 0`])).code).toBe(0);
    expect(await udmsetup(env.dir, ["wipe_table", "w"])).toMatchObject({ code: 0, stderr: "" });
    expect((await udmsetup(env.dir, ["table", "w"])).stdout).toBe("0 2048 error \n");
    const client = await WireClient.connect(runPaths(env.dir).nbd, "w");
    expect((await client.read(0, 4096)).error).toBe(5); // EIO
    await client.disconnect();
  });
});
