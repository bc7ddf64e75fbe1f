/**
 * `counting <dev> <offset>`: maps like linear and counts the reads and writes that completed
 * successfully. Status: `reads N writes M`; message `reset` sets both to 0.
 *
 * Standard decorators (no experimentalDecorators in tsconfig.json): the services the constructor
 * takes are listed, in order, in `inject`.
 */
import {
  type Bio,
  type BlockDevice,
  type DeviceAreaCallback,
  type DeviceLookup,
  EndIoResult,
  MapResult,
  Services,
  type StatusType,
  Target,
  TargetError,
  parseSector,
  target,
} from "udm";

@target({ name: "counting", version: [0, 1, 0], inject: [Services.DeviceLookup] })
export class CountingTarget extends Target {
  private device!: BlockDevice;
  private offset = 0;
  private reads = 0;
  private writes = 0;

  constructor(private readonly devices: DeviceLookup) {
    super();
  }

  async ctr(args: string[]): Promise<void> {
    if (args.length !== 2) throw new TargetError("Invalid argument count");
    const offset = parseSector(args[1]!);
    if (offset === null) throw new TargetError("Invalid device sector");
    this.offset = offset;
    try {
      this.device = await this.devices.get(args[0]!);
    } catch {
      throw new TargetError("Device lookup failed");
    }
    this.numFlushBios = 1; // flushes reach the device: without it they complete at once and lose data
  }

  map(bio: Bio): MapResult {
    bio.device = this.device;
    if (bio.sectors > 0) bio.sector = this.offset + (bio.sector - this.begin);
    return MapResult.REMAPPED;
  }

  override endIo(bio: Bio): EndIoResult {
    if (bio.status === "ok" && bio.op === "read") this.reads++;
    if (bio.status === "ok" && bio.op === "write") this.writes++;
    return EndIoResult.DONE;
  }

  override status(type: StatusType): string {
    return type === "table" ? `${this.device.tableName} ${this.offset}` : `reads ${this.reads} writes ${this.writes}`;
  }

  override message(args: string[]): string | undefined {
    if (args.length !== 1 || args[0] !== "reset") throw new TargetError(`Unrecognised message: ${args.join(" ")}`);
    this.reads = this.writes = 0;
    return undefined;
  }

  override iterateDevices(fn: DeviceAreaCallback): boolean {
    return fn(this.device, this.offset, this.len) === true;
  }
}
