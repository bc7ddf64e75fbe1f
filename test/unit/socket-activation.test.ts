/**
 * Socket activation's two halves in the daemon (issue 18 item 14): reading LISTEN_PID,
 * LISTEN_FDS and LISTEN_FDNAMES as sd_listen_fds_with_names(3) does (listen-fds.ts), and telling
 * what each passed socket is for, or why udmd cannot use it (passed-sockets.ts), on real sockets.
 */
import fs from "node:fs";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { libc } from "../../core/sys/libc.js";
import { passedSocketsFromEnv } from "../../dmsetup/daemon/listen-fds.js";
import { assignPassedSockets, type OwnAddresses } from "../../dmsetup/daemon/passed-sockets.js";
import { tempDir } from "../support/daemon.js";
import { closeFd, SOCK_DGRAM, tcpSocketFd, unixSocketFd } from "../support/socket-activation.js";

describe("passedSocketsFromEnv", () => {
  it("numbers the sockets from 3 and names them from LISTEN_FDNAMES", () => {
    const env = { LISTEN_PID: "42", LISTEN_FDS: "3", LISTEN_FDNAMES: "control:nbd:udmd.socket" };
    expect(passedSocketsFromEnv(env, 42)).toEqual([
      { fd: 3, name: "control" },
      { fd: 4, name: "nbd" },
      { fd: 5, name: "udmd.socket" },
    ]);
  });

  it('names them "unknown" without LISTEN_FDNAMES', () => {
    expect(passedSocketsFromEnv({ LISTEN_PID: "42", LISTEN_FDS: "2" }, 42)).toEqual([
      { fd: 3, name: "unknown" },
      { fd: 4, name: "unknown" },
    ]);
  });

  it("passes nothing when LISTEN_PID is unset or names another process (inherited from a parent)", () => {
    expect(passedSocketsFromEnv({ LISTEN_FDS: "2" }, 42)).toEqual([]);
    expect(passedSocketsFromEnv({ LISTEN_PID: "41", LISTEN_FDS: "2", LISTEN_FDNAMES: "a:b" }, 42)).toEqual([]);
    expect(passedSocketsFromEnv({ LISTEN_PID: "42", LISTEN_FDS: "0", LISTEN_FDNAMES: "" }, 42)).toEqual([]);
  });

  it("refuses malformed variables with what is wrong", () => {
    expect(() => passedSocketsFromEnv({ LISTEN_PID: "42", LISTEN_FDS: "two" }, 42)).toThrow(
      "LISTEN_FDS: expected a count of descriptors from 3, got 'two'",
    );
    expect(() => passedSocketsFromEnv({ LISTEN_PID: "42" }, 42)).toThrow("LISTEN_FDS: expected a count");
    expect(() => passedSocketsFromEnv({ LISTEN_PID: "x42", LISTEN_FDS: "1" }, 42)).toThrow(
      "LISTEN_PID: expected a process id, got 'x42'",
    );
    expect(() => passedSocketsFromEnv({ LISTEN_PID: "42", LISTEN_FDS: "2", LISTEN_FDNAMES: "control" }, 42)).toThrow(
      "LISTEN_FDNAMES names 1 socket(s) ('control') but LISTEN_FDS is 2",
    );
  });
});

describe("assignPassedSockets", () => {
  let dir: string;
  let own: OwnAddresses;
  const fds: number[] = [];
  const keep = (fd: number) => (fds.push(fd), fd);
  const unix = (name: string, opts?: Parameters<typeof unixSocketFd>[1]) =>
    keep(unixSocketFd(path.join(dir, name), opts));

  beforeEach(() => {
    dir = tempDir("udm-passed-");
    own = { control: path.join(dir, "control"), nbd: path.join(dir, "nbd.sock"), tcp: null };
  });
  afterEach(() => {
    for (const fd of fds.splice(0)) closeFd(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("takes the use from the names control and nbd, wherever the sockets are", () => {
    const control = unix("elsewhere-control");
    const nbd = unix("exports.sock");
    const tcp = tcpSocketFd();
    keep(tcp.fd);
    const assigned = assignPassedSockets(
      [
        { fd: control, name: "control" },
        { fd: nbd, name: "nbd" },
        { fd: tcp.fd, name: "nbd" },
      ],
      own,
    );
    expect(assigned.control).toEqual({ fd: control, path: path.join(dir, "elsewhere-control") });
    expect(assigned.nbdUnix).toEqual([{ fd: nbd, path: path.join(dir, "exports.sock") }]);
    expect(assigned.nbdTcp).toEqual([
      { fd: tcp.fd, host: "127.0.0.1", port: tcp.port, label: `fd ${tcp.fd} (nbd) on 127.0.0.1:${tcp.port}` },
    ]);
    expect(assigned.nbdListenPassed).toBe(false);
  });

  it("takes the use from the address under systemd's default names: the run directory's sockets, --nbd-listen's address", () => {
    const control = unix("control");
    const nbd = unix("nbd.sock");
    const tcp = tcpSocketFd();
    keep(tcp.fd);
    const assigned = assignPassedSockets(
      [
        { fd: nbd, name: "unknown" },
        { fd: control, name: "udmd.socket" },
        { fd: tcp.fd, name: "udmd-tcp.socket" },
      ],
      { ...own, tcp: { host: "127.0.0.1", port: tcp.port } },
    );
    expect(assigned.control?.fd).toBe(control);
    expect(assigned.nbdUnix.map((l) => l.fd)).toEqual([nbd]);
    expect(assigned.nbdTcp.map((l) => l.fd)).toEqual([tcp.fd]);
    expect(assigned.nbdListenPassed).toBe(true);
  });

  it("makes every passed socket close-on-exec", () => {
    const fd = unix("control", { cloexec: false });
    const F_GETFD = 1;
    const FD_CLOEXEC = 1;
    expect((libc().fcntlInt(fd, F_GETFD, 0) as number) & FD_CLOEXEC).toBe(0);
    assignPassedSockets([{ fd, name: "control" }], own);
    expect((libc().fcntlInt(fd, F_GETFD, 0) as number) & FD_CLOEXEC).toBe(FD_CLOEXEC);
  });

  it("refuses a name it does not know, and a default-named socket at an address none of its own", () => {
    const fd = unix("control");
    expect(() => assignPassedSockets([{ fd, name: "ctl" }], own)).toThrow(
      `fd ${fd} (ctl) on ${path.join(dir, "control")}: unknown socket name 'ctl': FileDescriptorName= must be control or nbd`,
    );
    const stray = unix("stray.sock");
    expect(() => assignPassedSockets([{ fd: stray, name: "udmd.socket" }], own)).toThrow(
      `fd ${stray} (udmd.socket) on ${path.join(dir, "stray.sock")}: its name does not say what it is for and its ` +
        `address is none of udmd's (${own.control}, ${own.nbd}); name it with FileDescriptorName=control or FileDescriptorName=nbd`,
    );
    const tcp = tcpSocketFd();
    keep(tcp.fd);
    expect(() => assignPassedSockets([{ fd: tcp.fd, name: "unknown" }], own)).toThrow(
      "its name does not say what it is for",
    );
  });

  it("refuses a control socket on TCP, and two control sockets", () => {
    const tcp = tcpSocketFd();
    keep(tcp.fd);
    expect(() => assignPassedSockets([{ fd: tcp.fd, name: "control" }], own)).toThrow(
      "the control socket must be a unix socket",
    );
    const a = unix("control");
    const b = unix("control-2");
    expect(() =>
      assignPassedSockets(
        [
          { fd: a, name: "control" },
          { fd: b, name: "control" },
        ],
        own,
      ),
    ).toThrow(`fd ${b} (control) on ${path.join(dir, "control-2")}: a second control socket (fd ${a} is one already)`);
  });

  it("refuses a descriptor that is closed, not a socket, not a stream socket or not listening", () => {
    const closed = unix("closed");
    closeFd(closed);
    fds.splice(fds.indexOf(closed), 1);
    expect(() => assignPassedSockets([{ fd: closed, name: "control" }], own)).toThrow(
      `fd ${closed} (control) is not open (EBADF)`,
    );
    const file = keep(fs.openSync(path.join(dir, "file"), "w"));
    expect(() => assignPassedSockets([{ fd: file, name: "nbd" }], own)).toThrow(
      `fd ${file} (nbd) is not a socket but a regular file`,
    );
    const dgram = unix("dgram", { type: SOCK_DGRAM, listen: false });
    expect(() => assignPassedSockets([{ fd: dgram, name: "nbd" }], own)).toThrow(
      `fd ${dgram} (nbd) is not a stream socket (SO_TYPE 2); udmd serves ListenStream= sockets`,
    );
    const idle = unix("idle", { listen: false });
    expect(() => assignPassedSockets([{ fd: idle, name: "nbd" }], own)).toThrow(
      `fd ${idle} (nbd) is not listening; udmd needs listening sockets (ListenStream= with Accept=no)`,
    );
  });
});
