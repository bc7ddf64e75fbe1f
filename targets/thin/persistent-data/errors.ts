/**
 * Errors of the persistent-data layer. The errno is the one the kernel's function returns for the
 * same failure (-ENODATA for a missing key is an `undefined` result here, not an error), so the
 * pool target can report it unchanged.
 */
export type PersistentDataErrno =
  "EIO" | "EILSEQ" | "ENOTBLK" | "ENOSPC" | "EINVAL" | "EEXIST" | "ENODATA" | "EBUSY" | "EPERM" | "ENOMEM";

export class PersistentDataError extends Error {
  constructor(
    message: string,
    readonly errno: PersistentDataErrno,
  ) {
    super(message);
    this.name = "PersistentDataError";
  }
}

export function pdError(errno: PersistentDataErrno, message: string): PersistentDataError {
  return new PersistentDataError(message, errno);
}
