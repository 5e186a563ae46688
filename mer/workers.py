"""Worker processes that survive their own deaths.

`multiprocessing.Pool.imap_unordered` waits forever when a worker is killed (the OOM killer, a
segfault in dlib or libpng), and `ProcessPoolExecutor` fails every pending job at once. Here each
worker gets one job at a time over its own pipe, so when a worker dies the parent knows which job
it was on: that job is reported as lost (with the exit code), a new worker takes its place, and
the other jobs go on.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger("mer.workers")


@dataclass
class Lost:
    """A job whose worker died before answering; `reason` says how it died."""

    job: Any
    reason: str


def death_reason(exitcode: int | None) -> str:
    """'killed by SIGKILL (e.g. out of memory)' and the like, from a process exit code."""
    if exitcode is None:
        return "worker process vanished"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {"SIGKILL": " (e.g. the out-of-memory killer)", "SIGSEGV": " (a crash in native code)"}.get(name, "")
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {exitcode}"


def _serve(conn: Connection, fn: Callable, initializer: Callable | None, initargs: tuple) -> None:
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            conn.send(("done", fn(msg)))
        except Exception:  # noqa: BLE001 - the parent re-raises it, with this traceback
            conn.send(("raised", traceback.format_exc()))


class _Worker:
    def __init__(self, ctx, fn, initializer, initargs):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, initializer, initargs), daemon=True)
        self.proc.start()
        child.close()
        self.job: Any = None
        self.busy = False

    def give(self, job: Any) -> None:
        self.job, self.busy = job, True
        try:
            self.conn.send(job)
        except (BrokenPipeError, OSError):  # died in between: its sentinel tells the loop
            pass

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def run_jobs(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int, initializer: Callable | None = None,
             initargs: tuple = (), start_method: str | None = None) -> Iterator[tuple[Any, Any]]:
    """Yield (job, fn(job)) as jobs finish in `workers` processes, or (job, Lost) for a job whose
    worker died; a dead worker is replaced and the run goes on. `fn` and `initializer` must be
    importable (module-level) for the spawn start method."""
    ctx = mp.get_context(start_method)
    pending = list(jobs)[::-1]
    pool = [_Worker(ctx, fn, initializer, initargs) for _ in range(max(1, min(workers, len(pending))))]
    try:
        for w in pool:
            if pending:
                w.give(pending.pop())
        while any(w.busy for w in pool):
            busy = [w for w in pool if w.busy]
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for i, w in enumerate(pool):
                if not w.busy:
                    continue
                answer: tuple | None = None
                if w.conn in ready:
                    try:
                        answer = w.conn.recv()
                    except (EOFError, OSError):
                        answer = None
                if answer is None and (w.proc.sentinel in ready or not w.proc.is_alive()):
                    w.proc.join()
                    reason = death_reason(w.proc.exitcode)
                    log.warning("%s while working on %s; starting a new worker", reason, w.job)
                    job = w.job
                    w.conn.close()
                    pool[i] = w = _Worker(ctx, fn, initializer, initargs)
                    if pending:
                        w.give(pending.pop())
                    yield job, Lost(job, reason)
                elif answer is not None:
                    job, w.busy = w.job, False
                    kind, value = answer
                    if kind == "raised":
                        raise RuntimeError(f"a worker failed on {job}:\n{value}")
                    if pending:
                        w.give(pending.pop())
                    yield job, value
    finally:
        for w in pool:
            w.stop()
