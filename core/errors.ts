/**
 * Errors the core reports to its callers (the control protocol, the CLI, library users). `errno`
 * is what the kernel's ioctl would return; `message` is the reason the kernel would log
 * ("linear: Invalid argument count"), which udmsetup prints on stderr.
 */
export class DmError extends Error {
  constructor(
    readonly errno: string,
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = "DmError";
  }
}

/** strerror(3) texts for the errnos device-mapper returns (dmsetup prints these). */
export const STRERROR: Record<string, string> = {
  EPERM: "Operation not permitted",
  ENOENT: "No such file or directory",
  EIO: "Input/output error",
  ENXIO: "No such device or address",
  ENOMEM: "Cannot allocate memory",
  EACCES: "Permission denied",
  EBUSY: "Device or resource busy",
  EEXIST: "File exists",
  ENODEV: "No such device",
  EINVAL: "Invalid argument",
  ENOSPC: "No space left on device",
  ENOTTY: "Inappropriate ioctl for device",
  EOPNOTSUPP: "Operation not supported",
  EOVERFLOW: "Value too large for defined data type",
  EAGAIN: "Resource temporarily unavailable",
  EINTR: "Interrupted system call",
};

export function strerror(errno: string): string {
  return STRERROR[errno] ?? errno;
}
