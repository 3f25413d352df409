"""Bounded parallelism in daemon threads, for per-node work."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def parallel(fn: Callable[[object], T], items: list, workers: int) -> list[T]:
    """fn over items in daemon threads, results in order. Daemon threads, unlike an executor's,
    are not joined at interpreter exit: Ctrl-C or an error never waits for a hung node."""
    results: list = [None] * len(items)
    todo = iter(enumerate(items))
    lock = threading.Lock()
    crashed: list[BaseException] = []

    go = threading.Event()

    def worker() -> None:
        go.wait()
        while True:
            with lock:
                i, item = next(todo, (None, None))
            if i is None:
                return
            try:
                results[i] = fn(item)
            except BaseException as e:  # a bug, not a node's failure: re-raised below
                crashed.append(e)

    threads = [
        threading.Thread(target=worker, daemon=True) for _ in range(min(workers, len(items)))
    ]
    for t in threads:
        t.start()
    # Work starts only once every thread has: a start() waits for its thread to run, and with
    # busy workers holding the GIL that wait was up to a switch interval (5 ms) per thread.
    go.set()
    for t in threads:
        t.join()
    if crashed:
        raise crashed[0]
    return results
