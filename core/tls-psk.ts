/**
 * Pre-shared-key TLS, as both ends of udm's NBD speak it: the key file (psktool's format, as
 * nbdkit and qemu read it) and the cipher suites that carry PSK.
 */

/**
 * The suites of a PSK connection (server and client): TLS 1.3's, then the TLS 1.2 ones with
 * pre-shared keys and forward secrecy. Not appended to Node's default list, which removes every PSK suite with "!PSK".
 */
export const PSK_CIPHERS = [
  "TLS_AES_256_GCM_SHA384",
  "TLS_CHACHA20_POLY1305_SHA256",
  "TLS_AES_128_GCM_SHA256",
  "ECDHE-PSK-CHACHA20-POLY1305",
  "ECDHE-PSK-AES256-CBC-SHA384",
  "ECDHE-PSK-AES128-CBC-SHA256",
  "DHE-PSK-AES256-GCM-SHA384",
  "DHE-PSK-AES128-GCM-SHA256",
  "DHE-PSK-CHACHA20-POLY1305",
].join(":");

/** Longest PSK identity psktool writes (RFC 4279 allows 2^16 - 1 bytes; nobody needs that). */
const MAX_IDENTITY_BYTES = 1024;

/**
 * psktool's key file: one `identity:hexkey` per line; blank lines are skipped. Errors name the
 * file and line (a key is never quoted back).
 */
export function parsePskFile(text: string, file = "PSK file"): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split("\n").forEach((raw, i) => {
    const line = raw.replace(/\r$/, "");
    if (line.trim() === "") return;
    const where = `${file}:${i + 1}`;
    const colon = line.lastIndexOf(":");
    if (colon <= 0) throw new Error(`${where}: expected identity:hexkey`);
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (Buffer.byteLength(identity) > MAX_IDENTITY_BYTES)
      throw new Error(`${where}: identity longer than ${MAX_IDENTITY_BYTES} bytes`);
    if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) throw new Error(`${where}: the key is not an even number of hex digits`);
    if (keys.has(identity)) throw new Error(`${where}: identity "${identity}" appears twice`);
    keys.set(identity, Buffer.from(hex, "hex"));
  });
  if (keys.size === 0) throw new Error(`${file}: no keys`);
  return keys;
}
