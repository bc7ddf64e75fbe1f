/**
 * `udmsetup plugin load MODULE` and `udmsetup plugin list`: the control protocol's load-plugin
 * and list-plugins. A relative path or a package name is resolved from udmsetup's working
 * directory, not udmd's. Each plugin prints as `FILE: TARGET...` (`--json`: the objects).
 */
import type { ControlClient } from "../control/client.js";
import type { Io } from "./commands.js";
import { type CliOptions, UsageError } from "./options.js";

interface PluginInfo {
  file: string;
  targets: string[];
}

export const PLUGIN_USAGE = "plugin load MODULE | plugin list";

export async function runPluginCommand(client: ControlClient, args: string[], opts: CliOptions, io: Io): Promise<void> {
  const [sub, ...rest] = args;
  const print = (result: PluginInfo | PluginInfo[]) => {
    if (opts.json) io.out(`${JSON.stringify(result, null, 2)}\n`);
    else for (const p of [result].flat()) io.out(`${p.file}: ${p.targets.join(" ")}\n`);
  };
  if (sub === "load" && rest.length === 1) {
    print((await client.request("load-plugin", { module: rest[0]!, baseDir: process.cwd() })) as PluginInfo);
  } else if (sub === "list" && rest.length === 0) {
    print((await client.request("list-plugins", {})) as PluginInfo[]);
  } else {
    throw new UsageError(`Usage: udmsetup ${PLUGIN_USAGE}`);
  }
}
