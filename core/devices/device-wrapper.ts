/** A BlockDevice that forwards to another: subclass it to observe or alter I/O (tests, benchmarks, plugins). */
import type { Bio } from "../bio.js";
import type { BlockDevice } from "./block-device.js";

/** Forwards everything to `inner`; subclasses override what they need. */
export class DeviceWrapper implements BlockDevice {
  constructor(readonly inner: BlockDevice) {}
  get tableName() {
    return this.inner.tableName;
  }
  get displayName() {
    return this.inner.displayName;
  }
  get sizeSectors() {
    return this.inner.sizeSectors;
  }
  get logicalBlockSize() {
    return this.inner.logicalBlockSize;
  }
  get readOnly() {
    return this.inner.readOnly;
  }
  get devno() {
    return this.inner.devno;
  }
  get supportsDiscard() {
    return this.inner.supportsDiscard;
  }
  get supportsWriteZeroes() {
    return this.inner.supportsWriteZeroes;
  }
  submit(bio: Bio): void {
    this.inner.submit(bio);
  }
  async upgradeToReadWrite(): Promise<void> {
    await this.inner.upgradeToReadWrite?.();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
