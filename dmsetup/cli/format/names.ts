/** Device-name transformations of libdm: udev name mangling and LVM name splitting. */
/**
 * libdm's name mangling ("auto" mode): bytes outside udev's whitelist become `\xNN`; a `\x..`
 * sequence is taken as already mangled and kept.
 */
export function mangle(s: string): string {
  const b = Buffer.from(s);
  let out = "";
  for (let i = 0; i < b.length; i++) {
    const c = String.fromCharCode(b[i]!);
    if (c === "\\" && b[i + 1] === 0x78 && i + 3 < b.length) {
      out += b.subarray(i, i + 4).toString("latin1");
      i += 3;
    } else {
      out += /[0-9A-Za-z#+\-.:=@_]/.test(c) ? c : `\\x${b[i]!.toString(16).padStart(2, "0")}`;
    }
  }
  return out;
}
export const unmangle = (s: string) =>
  Buffer.from(
    s.replace(/\\x([0-9a-fA-F]{2})/g, (_m, h: string) => String.fromCharCode(parseInt(h, 16))),
    "latin1",
  ).toString();

/** One step of dm_split_lvm_name: up to the first lone `-` (`--` is a literal `-`), and the rest. */
export function unquoteLvm(s: string): [string, string] {
  let out = "";
  let i = 0;
  for (; i < s.length; i++) {
    // A `-` is only a separator when something follows it: a trailing `-` is kept.
    if (s[i] === "-" && i + 1 < s.length) {
      if (s[i + 1] !== "-") return [out, s.slice(i + 1)];
      i++;
    }
    out += s[i];
  }
  return [out, ""];
}
