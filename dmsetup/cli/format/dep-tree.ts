/**
 * The dependency graph of mapped devices as libdm's dm_tree builds it, shared by `ls --tree`,
 * the report's relationship fields and `deps`.
 */
/**
 * A device another one uses: a block device number (with its dm name when it is a mapped device,
 * and its kernel name when known), or — udm extension — a backing file, which has no number.
 */
export type DepRef = { major: number; minor: number; name?: string; blkdevname?: string } | { path: string };

/** How `-o devno|blkdevname|devname` names a device. */
export type DevNameFormat = "devno" | "blkdevname" | "devname";

/** Resolves a non-dm device number to its kernel name (`sdb`), as libdm does through sysfs. */
export type BlkdevNameResolver = (major: number, minor: number) => string | undefined;

/** One mapped device and what it uses, in the order DM_TABLE_DEPS reports them. */
export interface GraphDevice {
  name: string;
  major: number;
  minor: number;
  deps: readonly DepRef[];
  uuid?: string;
  suspended?: boolean;
  readOnly?: boolean;
  openCount?: number;
}

export interface GraphNode {
  name: string;
  major: number;
  minor: number;
  path?: string;
  device?: GraphDevice;
  uses: GraphNode[];
  usedBy: GraphNode[];
}

/**
 * libdm's dm_tree as dmsetup builds it: every device is added under a root in list order, its
 * dependencies recursively under it. A node used by another leaves the top level (the root's
 * `uses`); a node using nothing sits on the bottom level (it `uses` the root). Children keep
 * insertion order, which is where dmsetup's output order comes from.
 */
export class DepTree {
  readonly root: GraphNode = { name: "", major: 0, minor: 0, uses: [], usedBy: [] };
  private readonly nodes = new Map<string, GraphNode>();
  private readonly devices = new Map<string, GraphDevice>();

  constructor(devices: readonly GraphDevice[]) {
    for (const d of devices) this.devices.set(`${d.major}:${d.minor}`, d);
    for (const d of devices) this.add(this.root, d);
  }

  find(major: number, minor: number): GraphNode | undefined {
    return this.nodes.get(`${major}:${minor}`);
  }

  /** dm_tree_node_num_children: 0 for a node on the top (inverted) or bottom level. */
  numChildren(node: GraphNode, inverted: boolean): number {
    if (inverted) return this.root.uses.includes(node) ? 0 : node.usedBy.length;
    return node.uses.includes(this.root) ? 0 : node.uses.length;
  }

  private add(parent: GraphNode, ref: DepRef | GraphDevice): void {
    const key = "path" in ref ? `path:${ref.path}` : `${ref.major}:${ref.minor}`;
    let node = this.nodes.get(key);
    const fresh = !node;
    if (!node) {
      const device = this.devices.get(key);
      node =
        "path" in ref
          ? { name: ref.path, major: 0, minor: 0, path: ref.path, uses: [], usedBy: [] }
          : { name: device?.name ?? "", major: ref.major, minor: ref.minor, device, uses: [], usedBy: [] };
      this.nodes.set(key, node);
    }
    this.linkTree(parent, node);
    if (!fresh) return;
    const deps = node.device?.deps ?? [];
    if (deps.length === 0) return this.link(node, this.root);
    for (const dep of deps) this.add(node, dep);
  }

  private linkTree(parent: GraphNode, child: GraphNode): void {
    if (parent === this.root) {
      if (this.numChildren(child, true) > 0) return; // already used by a device: not a root
    } else {
      this.unlink(this.root, child);
    }
    this.unlink(parent, this.root);
    this.link(parent, child);
  }

  private link(parent: GraphNode, child: GraphNode): void {
    if (parent.uses.includes(child)) return;
    parent.uses.push(child);
    child.usedBy.push(parent);
  }

  private unlink(parent: GraphNode, child: GraphNode): void {
    const i = parent.uses.indexOf(child);
    if (i < 0) return;
    parent.uses.splice(i, 1);
    child.usedBy.splice(child.usedBy.indexOf(parent), 1);
  }
}

export function blkdevOf(n: GraphNode, resolve: BlkdevNameResolver | undefined): string | undefined {
  if (n.path !== undefined) return n.path;
  return n.device ? `dm-${n.minor}` : resolve?.(n.major, n.minor);
}
