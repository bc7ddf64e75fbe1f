/**
 * Socket activation, the receiving end of systemd's protocol (sd_listen_fds(3)): a service manager
 * that made the listening sockets itself starts udmd with them open as descriptors 3, 4, ... and
 * says so in the environment: LISTEN_PID (the process they are for), LISTEN_FDS (how many) and
 * LISTEN_FDNAMES (their FileDescriptorName= names, colon-separated). udmd's command line reads
 * these once (dmsetup/bin/udmd.ts) and removes them, so that the processes udmd starts (captive
 * mode's CMD, attach's tools) do not take the sockets for theirs; the daemon gets the result as
 * an option (DaemonOptions.passedSockets) and decides what each socket is (passed-sockets.ts).
 */

/** The first passed descriptor (SD_LISTEN_FDS_START). */
export const LISTEN_FDS_START = 3;

/** The environment variables of the protocol, removed once read. */
export const LISTEN_ENV = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] as const;

/** A listening socket the service manager passed: its descriptor and its name. */
export interface PassedSocket {
  fd: number;
  /**
   * FileDescriptorName=, else what systemd names it by default (the socket unit's name, e.g.
   * `udmd.socket`), else "unknown" (no LISTEN_FDNAMES, as sd_listen_fds_with_names(3) says).
   */
  name: string;
}

/** More than any sensible unit passes; a larger count is a corrupt variable, not sockets. */
const MAX_LISTEN_FDS = 1024;

/**
 * The sockets `env` passes to process `pid`: none when LISTEN_PID is unset or names another
 * process (the variables were inherited from a parent they were meant for). Throws an Error that
 * says what is wrong with a malformed LISTEN_FDS or a LISTEN_FDNAMES that does not name each
 * socket once.
 */
export function passedSocketsFromEnv(env: NodeJS.ProcessEnv, pid: number): PassedSocket[] {
  const forPid = env.LISTEN_PID;
  if (forPid === undefined || forPid === "") return [];
  if (!/^[1-9]\d*$/.test(forPid)) throw new Error(`LISTEN_PID: expected a process id, got '${forPid}'`);
  if (Number(forPid) !== pid) return [];
  const count = env.LISTEN_FDS ?? "";
  if (!/^\d+$/.test(count) || Number(count) > MAX_LISTEN_FDS) {
    throw new Error(`LISTEN_FDS: expected a count of descriptors from ${LISTEN_FDS_START}, got '${count}'`);
  }
  const n = Number(count);
  const listed = env.LISTEN_FDNAMES;
  const names = listed === undefined ? Array<string>(n).fill("unknown") : listed === "" ? [] : listed.split(":");
  if (names.length !== n) {
    throw new Error(`LISTEN_FDNAMES names ${names.length} socket(s) ('${listed}') but LISTEN_FDS is ${n}`);
  }
  return names.map((name, i) => ({ fd: LISTEN_FDS_START + i, name }));
}
