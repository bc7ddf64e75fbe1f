/**
 * Plugins from the command line and from udmd's config file: paths in a --config file are
 * relative to the file's folder, whatever directory udmd starts in.
 */
import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { type RunningDaemon, startDaemon, tempDir, udmsetup } from "../support/daemon.js";
import { writePskFiles } from "../support/tls-credentials.js";

const root = path.resolve(__dirname, "../..");
const fixture = (name: string) => path.resolve(__dirname, "../fixtures/plugins", name);

describe("udmd --config", () => {
  let daemon: RunningDaemon | undefined;
  let dirs: string[] = [];
  afterEach(async () => {
    await daemon?.stop();
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
    daemon = undefined;
    dirs = [];
  });

  it("resolves plugin and credential paths against the config file's folder, not the working directory", async () => {
    const base = tempDir("udm-config-");
    const elsewhere = tempDir("udm-cwd-");
    const runDir = tempDir();
    dirs = [base, elsewhere, runDir];
    fs.mkdirSync(path.join(base, "etc"));
    fs.mkdirSync(path.join(base, "plugins"));
    fs.copyFileSync(fixture("io-stats.mjs"), path.join(base, "plugins/io-stats.mjs"));
    fs.mkdirSync(path.join(base, "node_modules"));
    fs.symlinkSync(root, path.join(base, "node_modules/udm")); // what the plugin imports
    writePskFiles(path.join(base, "etc"), "udm");
    const config = path.join(base, "etc/udmd.json");
    const settings = { plugins: ["../plugins/io-stats.mjs"], tls: "on", tlsPsk: "psk.keys" };
    fs.writeFileSync(config, JSON.stringify(settings));
    daemon = await startDaemon(runDir, ["--config", config], { cwd: elsewhere });
    expect((await udmsetup(runDir, ["targets"])).stdout.split("\n")[0]).toBe("io-stats-js      v0.1.0");
  });

  it("names the config file and the problem when it is not what udmd expects", async () => {
    const base = tempDir("udm-config-");
    dirs = [base];
    const config = path.join(base, "udmd.json");
    fs.writeFileSync(config, JSON.stringify({ plugins: "io-stats.mjs" }));
    await expect(startDaemon(tempDir(), ["--config", config])).rejects.toThrow(
      `udmd: config ${config}: "plugins": expected an array of module names or paths`,
    );
  });
});
