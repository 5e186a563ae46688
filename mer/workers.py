"""Worker processes that survive their own deaths.

`multiprocessing.Pool.imap_unordered` waits forever when a worker is killed (the OOM killer, a
segfault in dlib or libpng), and `ProcessPoolExecutor` fails every pending job at once. Here each
worker gets one job at a time over its own pipe and acknowledges it before starting, so when a
worker dies the parent knows which job it was on: that job is reported as lost (with the exit
code), a new worker takes its place, and the other jobs go on. A job handed to a worker that died
before acknowledging it never ran: it goes back in the queue.
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


class WorkerStartError(RuntimeError):
    """A worker could not start (its initializer raised): every job would fail the same way."""


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
    try:
        if initializer is not None:
            initializer(*initargs)
    except Exception:  # noqa: BLE001 - the parent stops the run with this traceback
        conn.send(("init_failed", traceback.format_exc()))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        conn.send(("ack", None))
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
        self.busy = self.acked = False

    def give(self, job: Any) -> None:
        self.job, self.busy, self.acked = job, True, False
        try:
            self.conn.send(job)
        except (BrokenPipeError, OSError):  # died in between: its sentinel tells the loop
            pass

    def messages(self) -> list[tuple]:
        """Every message waiting on the pipe (none if the worker is gone and nothing is left)."""
        out = []
        try:
            while self.conn.poll():
                out.append(self.conn.recv())
        except (EOFError, OSError):
            pass
        return out

    def stop(self) -> None:
        if self.busy:  # on an error: do not wait for a job nobody will read
            self.proc.kill()
        else:
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
             initargs: tuple = (), start_method: str | None = None,
             describe: Callable[[Any], str] = str) -> Iterator[tuple[Any, Any]]:
    """Yield (job, fn(job)) as jobs finish in `workers` processes, or (job, Lost) for a job whose
    worker died while running it; a dead worker is replaced and the run goes on. An exception
    raised by `fn` stops the run (RuntimeError with the worker's traceback), as does an initializer
    that fails (WorkerStartError). `fn` and `initializer` must be importable (module-level) for the
    spawn start method; `describe` names a job in messages."""
    ctx = mp.get_context(start_method)
    pending = list(jobs)[::-1]
    pool = [_Worker(ctx, fn, initializer, initargs) for _ in range(max(1, min(workers, len(pending))))]
    retried: set[int] = set()
    try:
        for w in pool:
            if pending:
                w.give(pending.pop())
        while any(w.busy for w in pool):
            busy = [w for w in pool if w.busy]
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for i, w in enumerate(pool):
                if not w.busy or (w.conn not in ready and w.proc.sentinel not in ready):
                    continue
                done, answer = False, None
                for kind, value in w.messages():  # all it said, also just before it died
                    if kind == "init_failed":
                        raise WorkerStartError(f"a worker could not start:\n{value}")
                    if kind == "raised":
                        raise RuntimeError(f"a worker failed on {describe(w.job)}:\n{value}")
                    if kind == "ack":
                        w.acked = True
                        log.debug("worker %d started %s", w.proc.pid, describe(w.job))
                    else:
                        done, answer = True, value
                if done:
                    job, w.busy = w.job, False
                    if pending:
                        w.give(pending.pop())
                    yield job, answer
                    continue
                if w.proc.is_alive():
                    continue  # still working
                w.proc.join()
                job, acked, reason = w.job, w.acked, death_reason(w.proc.exitcode)
                w.conn.close()
                pool[i] = w = _Worker(ctx, fn, initializer, initargs)
                if not acked and id(job) not in retried:  # it never started: once more, in a new worker
                    retried.add(id(job))
                    log.warning("%s before starting %s; it goes back in the queue", reason, describe(job))
                    w.give(job)
                    continue
                log.warning("%s while working on %s; starting a new worker", reason, describe(job))
                if pending:
                    w.give(pending.pop())
                yield job, Lost(job, reason)
    finally:
        for w in pool:
            w.stop()
