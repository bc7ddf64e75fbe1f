/**
 * udmsetup's help (dmsetup/cli/help.ts): every command udmsetup runs has its own help, named in the
 * general usage; the usage names the environment udmsetup and udmd read.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { DAEMON_COMMANDS } from "../../dmsetup/cli/command-table.js";
import { commandHelp, USAGE } from "../../dmsetup/cli/help.js";
import { LOCAL_COMMANDS } from "../../dmsetup/cli/local-commands.js";
import { UDMD_USAGE } from "../../dmsetup/daemon/udmd-options.js";

const commands = [...DAEMON_COMMANDS, ...LOCAL_COMMANDS, "daemon"];

describe("udmsetup help", () => {
  it.each(commands.map((c) => [c]))("%s has its own help, and the usage names it", (command) => {
    const help = commandHelp(command, UDMD_USAGE);
    expect(help).toMatch(new RegExp(`^Usage: udmsetup (\\w+\\|)?${command}\\b`));
    expect(help).toMatch(/\n\n\S/); // a text after the usage
    expect(USAGE).toMatch(new RegExp(`(^ {2}|\\| |\\w\\|)${command}\\b`, "m"));
  });

  it("is undefined for what is no command (not Object's own properties either)", () => {
    for (const word of ["bogus", "constructor", "__proto__", "toString"]) expect(commandHelp(word, "")).toBeUndefined();
  });

  it("names every environment variable the CLI and the daemon read", () => {
    const sources = ["dmsetup/bin/udmsetup.ts", "dmsetup/bin/udmd.ts", "dmsetup/cli", "dmsetup/daemon"].flatMap((p) => {
      const full = path.resolve(__dirname, "../..", p);
      return fs.statSync(full).isDirectory()
        ? fs
            .readdirSync(full, { recursive: true, encoding: "utf8" })
            .filter((f) => f.endsWith(".ts"))
            .map((f) => fs.readFileSync(path.join(full, f), "utf8"))
        : [fs.readFileSync(full, "utf8")];
    });
    const read = new Set(sources.flatMap((s) => [...s.matchAll(/env\.(UDM_\w+|DM_\w+)/g)].map((m) => m[1]!)));
    expect(read.size).toBeGreaterThan(0);
    for (const name of read) expect(USAGE, name).toMatch(new RegExp(`^ {2}${name}\\b`, "m"));
  });

  it("daemon's help lists udmd's options", () => {
    expect(commandHelp("daemon", UDMD_USAGE)).toContain(UDMD_USAGE.replace(/^Usage:.*\n/, ""));
  });
});
