/** `dmsetup ls --tree`: the dependency tree drawn as dmsetup draws it. */
import { DmError } from "../../../core/errors.js";
import { type BlkdevNameResolver, blkdevOf, DepTree, type GraphDevice, type GraphNode } from "./dep-tree.js";

type Charset = "utf" | "ascii" | "vt100";

export interface TreeOptions {
  /** dmsetup's `-o` tree words (comma-separated or split), parsed as dmsetup does. */
  options?: string | readonly string[];
  /** Glyphs; dmsetup picks utf when the locale's codeset is UTF-8, else ascii. Default utf. */
  charset?: Charset;
  /** ` (maj:min)` after each name (default on; `nodevice` turns it off). */
  device?: boolean;
  /** ` <dm-0>` after each name. */
  blkdevname?: boolean;
  active?: boolean;
  open?: boolean;
  rw?: boolean;
  uuid?: boolean;
  compact?: boolean;
  /** Leaves at the top, users below. */
  inverted?: boolean;
  /** Accepted; udm never truncates (dmsetup cuts lines at the terminal width, else 80 columns). */
  notrunc?: boolean;
  /** Accepted; dmsetup draws nothing for them but they disable `compact`. */
  table?: boolean;
  status?: boolean;
  /** Kernel names of non-dm leaves, for `blkdevname`. */
  blkdevName?: BlkdevNameResolver;
}

const TREE_WORDS = [
  "device",
  "blkdevname",
  "nodevice",
  "status",
  "table",
  "active",
  "open",
  "uuid",
  "rw",
  "utf",
  "vt100",
  "ascii",
  "inverted",
  "compact",
  "notrunc",
] as const;

/**
 * _process_tree_options: each word may be abbreviated to any prefix (the first match in dmsetup's
 * order wins, so an empty word means `device`); the error quotes the rest of the string.
 */
export function parseTreeOptions(options: string, base: TreeOptions = {}): TreeOptions {
  const opts: TreeOptions = { ...base };
  let rest = options;
  while (rest !== "") {
    const comma = rest.indexOf(",");
    const word = comma < 0 ? rest : rest.slice(0, comma);
    const match = TREE_WORDS.find((w) => w.startsWith(word));
    if (!match) throw new DmError("EINVAL", `Tree options not recognised: ${rest}.`);
    if (match === "nodevice") opts.device = false;
    else if (match === "utf" || match === "vt100" || match === "ascii") opts.charset = match;
    else opts[match] = true;
    if (comma < 0) break;
    rest = rest.slice(comma + 1);
  }
  return opts;
}

const VT = (s: string) => `\x1b(0\x0f${s}\x1b(B`;
const GLYPHS: Record<
  Charset,
  { empty: string; branch: string; vert: string; last: string; single: string; first: string }
> = {
  ascii: { empty: "  ", branch: "|-", vert: "| ", last: "`-", single: "---", first: "-+-" },
  utf: { empty: "  ", branch: "├─", vert: "│ ", last: "└─", single: "───", first: "─┬─" },
  vt100: { empty: "  ", branch: VT("tq"), vert: `${VT("x")} `, last: VT("mq"), single: VT("qqq"), first: VT("qwq") },
};

/**
 * `dmsetup ls --tree`. `devices` come in LIST_DEVICES order (name order) and each one's deps in
 * DM_TABLE_DEPS order; roots are devices no other device uses, and every level keeps that order,
 * as dmsetup's tree does. A device used by several others is drawn under each of them.
 *
 * Each level is indented by one space and a two-column glyph; `├─`/`└─` for a node with/without
 * later siblings, `│ `/`  ` in the columns of ancestors with/without later siblings. Non-dm
 * leaves have no name and print as ` (8:16)`. udm extension: a backing file is a leaf that
 * prints its path in place of the name, without device numbers, e.g. `└─/srv/disk.img`.
 */
export function formatTree(devices: readonly GraphDevice[], treeOpts: TreeOptions = {}): string {
  if (devices.length === 0) return "No devices found\n";
  const base: TreeOptions = { charset: "utf", device: true, ...treeOpts };
  const raw = treeOpts.options;
  const o = raw === undefined ? base : parseTreeOptions(typeof raw === "string" ? raw : raw.join(","), base);
  const glyph = GLYPHS[o.charset ?? "utf"];
  const attributes = o.active || o.rw || o.open || o.uuid;
  const compact = o.compact && !attributes && !o.table && !o.status;
  const inverted = o.inverted ?? false;
  const tree = new DepTree(devices);

  let out = "";
  let x = 1; // dmsetup's cursor column: the first line of a compact subtree continues the parent's
  const put = (s: string) => {
    out += s;
    x += [...s].length;
  };
  const width: number[] = []; // per depth: the width of the text before a compact subtree
  const more: boolean[] = []; // per depth: whether the node drawn there has later siblings

  const prefix = (depth: number) => {
    for (let d = 0; d < depth; d++) {
      put(" ".repeat((width[d] ?? 0) + 1));
      if (d === depth - 1) put(more[depth] ? glyph.branch : glyph.last);
      else put(more[d + 1] ? glyph.vert : glyph.empty);
    }
  };

  const drawNode = (node: GraphNode, depth: number, last: boolean, hasChildren: boolean) => {
    if (node.name === "" && !o.device && !o.blkdevname) return;
    more[depth] = !last;
    width[depth] = 0;
    const firstOnLine = x === 1;
    if (!compact || firstOnLine) prefix(depth);
    const offset = x;
    if (compact && !firstOnLine) put(more[depth] ? glyph.first : glyph.single);
    put(node.name);
    if (node.path === undefined) {
      const blk = o.blkdevname ? blkdevOf(node, o.blkdevName) : undefined;
      if (blk !== undefined) put(` <${blk}>`);
      if (o.device) put(` (${node.major}:${node.minor})`);
    }
    const d = node.device;
    if (attributes && d) {
      const attrs: string[] = [];
      if (o.active) attrs.push(d.suspended ? "SUSPENDED" : "ACTIVE");
      if (o.rw) attrs.push(d.readOnly ? "RO" : "RW");
      if (o.open) attrs.push(String((d.openCount ?? 0) >>> 0)); // printed unsigned
      if (o.uuid) attrs.push(d.uuid ?? "");
      put(` [${attrs.join(", ")}]`);
    }
    if (compact) width[depth] = x - offset;
    if (!compact || !hasChildren) {
      out += "\n";
      x = 1;
    }
  };

  const walk = (node: GraphNode, depth: number) => {
    const children = inverted ? node.usedBy : node.uses;
    children.forEach((child, i) => {
      const hasChildren = tree.numChildren(child, inverted) > 0;
      drawNode(child, depth, i === children.length - 1, hasChildren);
      if (hasChildren) walk(child, depth + 1);
    });
  };
  walk(tree.root, 0);
  return out;
}
