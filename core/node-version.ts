/**
 * udm needs Node.js 24 or later. Checked when udm is imported (index.ts, udm/nbd, udm/testing and
 * the commands import this first) rather than declared in package.json's `engines`: npm checks
 * `engines` against the Node that runs npm, which in a checkout is the machine's own (older) Node,
 * not the Node 24 the `node` dev dependency puts first on PATH for every npm script and npx, and
 * warns (EBADENGINE) on every install and on the first npx call.
 */
export const MIN_NODE_MAJOR = 24;

const major = Number(process.versions.node.split(".")[0]);
if (major < MIN_NODE_MAJOR) {
  throw new Error(
    `udm needs Node.js ${MIN_NODE_MAJOR} or later; this is ${process.version} (${process.execPath}). ` +
      "In a checkout, run it through npm or npx: they put the Node 24 that npm install brought first on PATH.",
  );
}
