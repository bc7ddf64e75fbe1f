/**
 * `udmsetup info`'s lines for remote devices (dmsetup/cli/format/info.ts): after dmsetup's block,
 * one group per remote device, labels padded to column 19 like dmsetup's.
 */
import { describe, expect, it } from "vitest";
import type { DeviceInfo } from "../../core/device-mapper.js";
import { formatInfoLong } from "../../dmsetup/cli/format/info.js";
import type { RemoteDeviceInfo } from "../../dmsetup/control/remote-devices.js";

const device: DeviceInfo = {
  name: "vm1",
  uuid: "VM-1",
  major: 253,
  minor: 4,
  suspended: false,
  readOnly: false,
  livePresent: true,
  inactivePresent: false,
  openCount: 1,
  eventNr: 0,
  targetCount: 1,
  sizeSectors: 2048,
};

const remote = (over: Partial<RemoteDeviceInfo>): RemoteDeviceInfo => ({
  uri: "nbd://storage/base",
  server: "storage:10809",
  state: "connected",
  connections: 4,
  connected: 4,
  attempt: 0,
  reconnects: 0,
  inFlight: 3,
  queued: 0,
  unflushedBytes: 0,
  replies: "extended",
  lastError: null,
  ...over,
});

describe("info with remote devices", () => {
  it("prints each remote device's group after dmsetup's lines, in the table's order", () => {
    const text = formatInfoLong({
      ...device,
      remote: [
        remote({}),
        remote({
          uri: "nbd+unix:///cow?socket=/run/s",
          server: "unix socket /run/s",
          state: "degraded",
          connections: 1,
          connected: 0,
          attempt: 7,
          reconnects: 1,
          inFlight: 0,
          queued: 2,
          unflushedBytes: 65536,
          replies: "structured",
          lastError: "connect ENOENT /run/s",
        }),
      ],
    });
    expect(text).toBe(
      [
        "Name:              vm1",
        "State:             ACTIVE",
        "Read Ahead:        256",
        "Tables present:    LIVE",
        "Open count:        1",
        "Event number:      0",
        "Major, minor:      253, 4",
        "Number of targets: 1",
        "UUID: VM-1",
        "Remote device:     nbd://storage/base",
        "Remote server:     storage:10809",
        "Remote state:      connected (4 of 4 connections up, extended headers)",
        "Remote I/O:        3 in flight, 0 queued, 0 bytes unflushed, 0 reconnects",
        "Remote device:     nbd+unix:///cow?socket=/run/s",
        "Remote server:     unix socket /run/s",
        "Remote state:      degraded (attempt 7, 0 of 1 connection up, structured replies)",
        "Remote I/O:        0 in flight, 2 queued, 65536 bytes unflushed, 1 reconnect",
        "Remote last error: connect ENOENT /run/s",
        "",
        "",
      ].join("\n"),
    );
    for (const line of text.split("\n").filter((l) => l.startsWith("Remote"))) expect(line[18]).toBe(" ");
  });

  it("without remote devices the block is dmsetup's", () => {
    expect(formatInfoLong({ ...device, remote: [] })).toBe(formatInfoLong(device));
    expect(formatInfoLong(device)).not.toContain("Remote");
  });
});
