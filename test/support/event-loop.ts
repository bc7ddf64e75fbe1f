/**
 * Waiting on the event loop without timers, for race tests: whatever I/O completions and
 * microtasks are ready run first, nothing waits a fixed time.
 */

/** Resolves after one turn of the event loop. */
export const settle = (): Promise<void> => new Promise<void>((resolve) => setImmediate(resolve));

/** Whether `p` settles within a few turns of the event loop (no timers involved). */
export async function settlesSoon(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  for (let i = 0; i < 50 && !done; i++) await settle();
  return done;
}
