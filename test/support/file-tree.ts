/**
 * Trees of files with known contents: make one, write it under a directory, hash what a
 * directory holds, and change a mounted tree in every way a filesystem writes differently while
 * keeping a model of the result.
 */
import fs from "node:fs";
import path from "node:path";
import { patternBytes, sha256 } from "./device-data.js";
import { KiB, MiB } from "./units.js";

/** A directory tree: relative path → contents. Directories are implied by the paths. */
export type Tree = Map<string, Buffer>;

/**
 * A tree of `count` files in nested directories, sizes from 0 bytes to `maxBytes`, including the
 * awkward ones (1, 4095, 4096, 4097 bytes), contents derived from `seed`.
 */
export function makeTree(seed: string, count: number, maxBytes: number): Tree {
  const fixed = [0, 1, 511, 4095, 4096, 4097, 65536 + 17];
  const tree: Tree = new Map();
  for (let i = 0; i < count; i++) {
    const dir = i % 5 === 0 ? "" : `d${i % 3}/${i % 2 ? "sub/" : ""}`;
    const size = i < fixed.length ? fixed[i]! : Math.floor((((i * 7919) % 1000) / 1000) * maxBytes) + 1;
    tree.set(`${dir}f${i}.bin`, patternBytes(`${seed}/${i}`, Math.min(size, maxBytes)));
  }
  return tree;
}

export function writeTree(root: string, tree: Tree): void {
  for (const [rel, data] of tree) {
    fs.mkdirSync(path.dirname(path.join(root, rel)), { recursive: true });
    fs.writeFileSync(path.join(root, rel), data);
  }
}

/** sha256 of every regular file under `root` (lost+found excluded), by relative path, sorted. */
export function hashTree(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (rel: string) => {
    for (const e of fs.readdirSync(path.join(root, rel), { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (r === "lost+found") continue;
      if (e.isDirectory()) walk(r);
      else if (e.isFile()) out[r] = sha256(fs.readFileSync(path.join(root, r)));
      else out[r] = `<${e.isSymbolicLink() ? "symlink" : "special"}>`;
    }
  };
  walk("");
  return Object.fromEntries(Object.entries(out).sort(([a], [b]) => a.localeCompare(b)));
}

/** What `hashTree` should return for `tree`. */
export function treeHashes(tree: Tree): Record<string, string> {
  return Object.fromEntries(
    [...tree].map(([rel, data]) => [rel, sha256(data)] as const).sort(([a], [b]) => a.localeCompare(b)),
  );
}

/**
 * Change the files of `tree` under `root` in every way a filesystem writes differently: rewrite
 * whole files, overwrite a range in place, append, truncate, delete, rename, and create new files
 * (one of `bigBytes`). Returns the tree the directory now holds.
 */
export function changeTree(root: string, tree: Tree, seed: string, bigBytes = 2 * MiB): Tree {
  const next: Tree = new Map(tree);
  const names = [...tree.keys()].sort();
  const at = (i: number) => names[i % names.length]!;
  const file = (rel: string) => path.join(root, rel);
  // Rewrite whole files (new blocks).
  for (const rel of [at(1), at(7)]) {
    const data = patternBytes(`${seed}/rewrite/${rel}`, tree.get(rel)!.length + 3000);
    fs.writeFileSync(file(rel), data);
    next.set(rel, data);
  }
  // Overwrite a range in the middle, in place (the old blocks change).
  for (const rel of names.filter((n) => tree.get(n)!.length >= 16 * KiB).slice(0, 3)) {
    const data = Buffer.from(next.get(rel)!);
    const patch = patternBytes(`${seed}/patch/${rel}`, Math.min(9000, data.length >> 1));
    const pos = (data.length >> 2) + 123;
    const fd = fs.openSync(file(rel), "r+");
    fs.writeSync(fd, patch, 0, patch.length, pos);
    fs.closeSync(fd);
    patch.copy(data, pos);
    next.set(rel, data);
  }
  // Append.
  {
    const rel = at(4);
    const extra = patternBytes(`${seed}/append`, 70_000);
    fs.appendFileSync(file(rel), extra);
    next.set(rel, Buffer.concat([next.get(rel)!, extra]));
  }
  // Truncate.
  {
    const rel = at(5);
    const keep = Math.floor(next.get(rel)!.length / 3);
    fs.truncateSync(file(rel), keep);
    next.set(rel, next.get(rel)!.subarray(0, keep));
  }
  // Delete, rename.
  for (const rel of [at(2), at(9)]) {
    fs.rmSync(file(rel));
    next.delete(rel);
  }
  {
    const rel = at(11);
    const to = `${path.dirname(rel) === "." ? "" : `${path.dirname(rel)}/`}renamed-${seed}.bin`;
    fs.renameSync(file(rel), file(to));
    next.set(to, next.get(rel)!);
    next.delete(rel);
  }
  // New files, one big, one in a new directory.
  const added: [string, number][] = [
    [`new-${seed}/big.bin`, bigBytes],
    [`new-${seed}/small.txt`, 100],
    [`d1/new-${seed}.bin`, 33_333],
  ];
  for (const [rel, size] of added) {
    const data = patternBytes(`${seed}/new/${rel}`, size);
    fs.mkdirSync(path.dirname(file(rel)), { recursive: true });
    fs.writeFileSync(file(rel), data);
    next.set(rel, data);
  }
  return next;
}
