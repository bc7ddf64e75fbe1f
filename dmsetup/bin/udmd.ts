#!/usr/bin/env node
/**
 * udmd: the udm daemon. `udmd [--run-dir DIR] [--plugin MODULE]... [--config FILE]
 * [--log-level LEVEL] [--log-format text|json] [--nbd-listen [HOST:]PORT] [--tls=off|on|require]
 * [--tls-certificates DIR] [--tls-psk FILE] [--nbd-handshake-timeout SECONDS] [--nbd-max-connections N]
 * [--nbd-max-client-connections N] [--auto-attach] [--dev-dir DIR] [--demo [--state-dir DIR]]
 * [--run CMD [--device NAME=TABLE_FILE]...] [--exit-with-parent]
 * [--no-inline-reads] [--no-write-plug] [--no-zero-copy]`
 *
 * The environment and the flags are read here, once, and passed down as options; that includes
 * the sockets systemd passes with socket activation (LISTEN_FDS, daemon/listen-fds.ts).
 */
import "../../core/node-version.js";
import "reflect-metadata";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { LOG_FORMATS, type LogFormat, type LogLevel } from "../../core/logger.js";
import { type NbdTlsMode, type NbdTlsOptions, TLS_MODES } from "../../nbd/server.js";
import { type DaemonConfig, readConfig } from "../daemon/config.js";
import { Daemon } from "../daemon/daemon.js";
import { setUpDemo } from "../daemon/demo.js";
import { exitWithParent } from "../../core/sys/resource.js";
import {
  type CaptiveDevice,
  captiveEnv,
  createCaptiveDevices,
  parseCaptiveDevice,
  runCaptive,
} from "../daemon/captive.js";
import { AlreadyRunningError } from "../daemon/instance-lock.js";
import { LISTEN_ENV, type PassedSocket, passedSocketsFromEnv } from "../daemon/listen-fds.js";
import { defaultRunDir, runPaths } from "../daemon/run-dir.js";
import { UDMD_OPTIONS, UDMD_USAGE } from "../daemon/udmd-options.js";

export async function main(argv = process.argv.slice(2)): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: UDMD_OPTIONS,
    }));
  } catch (err) {
    process.stderr.write(`udmd: ${(err as Error).message}\n${UDMD_USAGE}`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(UDMD_USAGE);
    return 0;
  }
  let captive: CaptiveDevice[] = [];
  try {
    captive = (values.device ?? []).map(parseCaptiveDevice);
  } catch (err) {
    process.stderr.write(`udmd: ${(err as Error).message}\n`);
    return 2;
  }
  if (captive.length > 0 && values.run === undefined) {
    process.stderr.write("udmd: --device needs --run\n");
    return 2;
  }
  if (values.run !== undefined && values.demo) {
    process.stderr.write("udmd: --run and --demo exclude each other\n");
    return 2;
  }
  // Socket activation: read once and removed, so that no process udmd starts takes the sockets
  // for its own (as sd_listen_fds(3) with unset_environment).
  let passedSockets: PassedSocket[];
  try {
    passedSockets = passedSocketsFromEnv(process.env, process.pid);
  } catch (err) {
    process.stderr.write(`udmd: socket activation: ${(err as Error).message}\n`);
    return 1;
  } finally {
    for (const name of LISTEN_ENV) delete process.env[name];
  }
  // First, so that a parent that dies while udmd starts is noticed too.
  if (values["exit-with-parent"] && !exitWithParent(os.constants.signals.SIGTERM, process.ppid)) return 1;
  let config: DaemonConfig = {};
  if (values.config) {
    try {
      config = readConfig(values.config);
    } catch (err) {
      process.stderr.write(`udmd: config ${values.config}: ${(err as Error).message}\n`);
      return 1;
    }
  }
  const level = (values["log-level"] ?? config.logLevel ?? "info") as LogLevel;
  if (!["debug", "info", "warn", "error"].includes(level)) {
    process.stderr.write(`udmd: --log-level: expected debug, info, warn or error\n`);
    return 2;
  }
  const logFormat = values["log-format"] ?? (process.stderr.isTTY ? "text" : "json");
  if (!(LOG_FORMATS as readonly string[]).includes(logFormat)) {
    process.stderr.write(`udmd: --log-format: expected text or json\n`);
    return 2;
  }
  let nbd: NbdFlags;
  try {
    nbd = nbdFlags(values, config);
  } catch (err) {
    process.stderr.write(`udmd: ${(err as Error).message}\n`);
    return 2;
  }
  const daemon = new Daemon({
    paths: runPaths(values["run-dir"] ?? defaultRunDir()),
    plugins: [...(config.plugins ?? []), ...(values.plugin ?? [])],
    logLevel: level,
    logFormat: logFormat as LogFormat,
    nbdListen: values["nbd-listen"] ?? config.nbdListen,
    ...nbd,
    passedSockets,
    autoAttach: values["auto-attach"] ?? process.env.UDM_AUTO_ATTACH === "1",
    restore: !values["no-restore"],
    devDir: path.resolve(values["dev-dir"] ?? (process.env.UDM_DEV_DIR || "/dev/udm")),
    // Unset unless turned off: the defaults depend on the platform.
    io: {
      inlineReads: values["no-inline-reads"] ? false : undefined,
      writePlug: values["no-write-plug"] ? false : undefined,
    },
    zeroCopy: values["no-zero-copy"] ? false : undefined,
  });
  // The handlers go in before start: a SIGTERM that arrives while udmd starts (a service manager
  // stopping a unit it just started, a client that read "udmd started" before start() returned
  // here) would otherwise meet Node's default action and kill udmd mid-way, with devices and
  // sockets left behind. Such a signal stops udmd as soon as it has started.
  let started = false;
  let signalledDuringStart: NodeJS.Signals | null = null;
  const onSignal = (signal: NodeJS.Signals) => {
    if (started) stop(signal);
    else if (signalledDuringStart === null) {
      signalledDuringStart = signal;
      daemon.logger.info("signal while starting: stopping once started", { signal });
    } else {
      // A second signal while the start still runs (restoring devices from unreachable remote
      // backings can take a while): give up at once; the next udmd cleans up what is left.
      process.stderr.write(`udmd: ${signal} again while starting: exiting without a clean stop\n`);
      process.exit(128 + os.constants.signals[signal]);
    }
  };
  process.on("SIGTERM", () => onSignal("SIGTERM"));
  process.on("SIGINT", () => onSignal("SIGINT"));
  try {
    await daemon.start();
  } catch (err) {
    const msg = err instanceof AlreadyRunningError ? err.message : `cannot start: ${(err as Error).message}`;
    process.stderr.write(`udmd: ${msg}\n`);
    // npm start a second time: say how to end the first.
    if (err instanceof AlreadyRunningError && values.demo)
      process.stderr.write(`udmd: stop it with: UDM_RUN_DIR=${daemon.opts.paths.dir} npx udmsetup daemon stop\n`);
    return 1;
  }
  let stopping = false;
  // With --run, a signal is not CMD's success: udmd exits as a shell reports a command killed by
  // it (128 + the signal's number) once it has stopped cleanly.
  const stoppedStatus = (signal: NodeJS.Signals) => (values.run !== undefined ? 128 + os.constants.signals[signal] : 0);
  const stop = (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    daemon.logger.info("signal", { signal });
    // Keeps the process alive until the shutdown has finished (a promise alone does not), and
    // says what it is waiting for if that takes long.
    const watchdog = setInterval(
      () => daemon.logger.warn("shutdown still running", { devices: daemon.dm.list() }),
      5_000,
    );
    daemon.stop().then(
      () => process.exit(stoppedStatus(signal)),
      (err) => {
        clearInterval(watchdog);
        process.stderr.write(`udmd: shutdown failed: ${(err as Error).message}\n`);
        process.exit(1);
      },
    );
  };
  started = true;
  if (signalledDuringStart !== null) {
    stop(signalledDuringStart);
    return -1;
  }
  if (values.run !== undefined) return runCaptiveCommand(daemon, values.run, captive);
  if (values.demo) {
    try {
      process.stdout.write(await setUpDemo(daemon, values["state-dir"] ?? "var"));
    } catch (err) {
      process.stderr.write(`udmd: demo setup failed: ${(err as Error).message}\n`);
      await daemon.stop();
      return 1;
    }
  }
  return -1; // keep running
}

/** --run: create the devices, run CMD, tear down, and return CMD's status (1 if setup failed). */
async function runCaptiveCommand(daemon: Daemon, command: string, devices: CaptiveDevice[]): Promise<number> {
  let status: number;
  try {
    await createCaptiveDevices(daemon, devices);
    status = await runCaptive(command, captiveEnv(daemon, devices));
  } catch (err) {
    process.stderr.write(`udmd: --run: ${(err as Error).message}\n`);
    status = 1;
  }
  await daemon.stop();
  return status;
}

interface NbdFlags {
  tls: NbdTlsOptions;
  nbdHandshakeTimeoutMs?: number;
  nbdMaxConnections?: number;
  nbdMaxClientConnections?: number;
}

/** The NBD protection flags, checked: a TLS mode needs credentials and credentials need a mode. */
function nbdFlags(values: Record<string, string | boolean | string[] | undefined>, config: DaemonConfig): NbdFlags {
  const text = (name: string): string | undefined => values[name] as string | undefined;
  const mode = text("tls") ?? config.tls ?? "off";
  if (!(TLS_MODES as readonly string[]).includes(mode)) {
    throw new Error(`--tls: expected off, on or require, got '${mode}'`);
  }
  const certificates = text("tls-certificates") ?? config.tlsCertificates;
  const psk = text("tls-psk") ?? config.tlsPsk;
  if (certificates !== undefined && psk !== undefined) {
    throw new Error("--tls-certificates and --tls-psk exclude each other");
  }
  if (mode === "off" && (certificates !== undefined || psk !== undefined)) {
    throw new Error(`${psk !== undefined ? "--tls-psk" : "--tls-certificates"} needs --tls=on or --tls=require`);
  }
  if (mode !== "off" && certificates === undefined && psk === undefined) {
    throw new Error(`--tls=${mode} needs --tls-certificates DIR or --tls-psk FILE`);
  }
  const timeout = text("nbd-handshake-timeout");
  const seconds = timeout === undefined ? undefined : Number(timeout);
  if (seconds !== undefined && !(timeout!.trim() !== "" && seconds >= 0 && seconds <= 86_400)) {
    throw new Error(`--nbd-handshake-timeout: expected seconds from 0 to 86400, got '${timeout}'`);
  }
  return {
    tls: { mode: mode as NbdTlsMode, certificates: absolute(certificates), psk: absolute(psk) },
    nbdHandshakeTimeoutMs: seconds === undefined ? undefined : Math.round(seconds * 1000),
    nbdMaxConnections: count(text("nbd-max-connections"), "--nbd-max-connections"),
    nbdMaxClientConnections: count(text("nbd-max-client-connections"), "--nbd-max-client-connections"),
  };
}

function count(value: string | undefined, flag: string): number | undefined {
  if (value === undefined) return undefined;
  if (!/^[1-9]\d{0,8}$/.test(value)) throw new Error(`${flag}: expected a whole number from 1, got '${value}'`);
  return Number(value);
}

function absolute(file: string | undefined): string | undefined {
  return file === undefined ? undefined : path.resolve(file);
}

void main().then((code) => {
  if (code >= 0) process.exit(code);
});
