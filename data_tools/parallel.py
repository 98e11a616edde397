"""Ordered, bounded fan-out of batches to workers (processes here; threads use `in_order` too)."""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Tuple

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PARENT_PID: list = [None]


def _exit_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this worker when its parent dies (Linux), and leave at once if that
    has already happened. Without it, workers orphaned by a SIGKILLed parent finish their batch
    and die on a BrokenPipeError traceback while sending the result nobody reads. Without prctl
    (macOS) only `_call`'s check remains: it covers a worker busy in `fn` when the parent dies,
    not one caught in the middle of sending a result."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: _call's parent check below still applies
    if os.getppid() != parent_pid:
        os._exit(0)


def _init(parent_pid: int, initializer: Callable[..., None], initargs: tuple) -> None:
    _PARENT_PID[0] = parent_pid
    _exit_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the parent handles it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initializer(*initargs)


def _call(fn: Callable[[Any], Any], payload: Any) -> Any:
    result = fn(payload)
    if os.getppid() != _PARENT_PID[0]:  # parent gone (no prctl): nobody will read the result
        os._exit(0)
    return result


def in_order(
    items: Iterable[Tuple[Any, Any]],
    submit: Callable[[Any], Callable[[], Any]],
    limit: int,
) -> Iterator[Tuple[Any, Any]]:
    """Yield (meta, result) for (meta, payload) in items, in input order, with at most ``limit``
    payloads submitted and not yet read back. ``submit(payload)`` starts the work and returns
    the call that waits for its result (a future's ``result``, an AsyncResult's ``get``)."""
    inflight: deque = deque()
    for meta, payload in items:
        inflight.append((meta, submit(payload)))
        if len(inflight) >= limit:
            meta0, wait = inflight.popleft()
            yield meta0, wait()
    while inflight:
        meta0, wait = inflight.popleft()
        yield meta0, wait()


def ordered_map(
    fn: Callable[[Any], Any],
    batches: Iterable[Tuple[Any, Any]],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple,
    use_spawn: bool = False,
) -> Iterator[Tuple[Any, Any]]:
    """Yield (meta, fn(payload)) for (meta, payload) in batches, in input order.

    Unlike Pool.imap, at most 2*workers+1 batches are in flight, so memory stays bounded
    however large the input. workers <= 1 runs inline in this process. Workers exit quietly
    when this process dies and ignore SIGINT (this process stops them).
    """
    if workers <= 1:
        initializer(*initargs)
        for meta, payload in batches:
            yield meta, fn(payload)
        return
    ctx = mp.get_context("spawn" if use_spawn else "fork")
    with ctx.Pool(workers, initializer=_init, initargs=(os.getpid(), initializer, initargs)) as pool:
        yield from in_order(batches, lambda payload: pool.apply_async(_call, (fn, payload)).get,
                            2 * workers + 1)
