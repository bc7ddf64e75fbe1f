/**
 * An engine process (see engine-host.ts): opens engines, runs repetitions and closes them on
 * request; exits when the parent disconnects.
 */
import type { ChildReply, ChildRequest } from "./engine-host.js";
import { localHost } from "./micro.js";

const host = localHost();
const send = (reply: ChildReply) => process.send!(reply);

process.on("message", (req: ChildRequest) => {
  const work = req.cmd === "open" ? host.open(req.spec) : req.cmd === "run" ? host.run(req.ms) : host.close();
  work.then(
    (result) => send(result ? { ok: true, result } : { ok: true }),
    (err: unknown) => send({ ok: false, error: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
  );
});
send({ ok: true });
