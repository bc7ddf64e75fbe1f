// npm puts node_modules/.bin first on PATH, so `node` here is the Node 24 that the
// `node` package brings, even on a machine whose system Node is older.
const major = Number(process.versions.node.split(".")[0]);
if (major < 24) {
  console.error(
    `udm needs Node >= 24, but npm scripts run ${process.version} (${process.execPath}). Run \`npm install\` so the bundled Node 24 is on PATH.`,
  );
  process.exit(1);
}
