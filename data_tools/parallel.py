"""Ordered, bounded fan-out of batches to worker processes."""
from __future__ import annotations

import multiprocessing as mp
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Tuple


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
    however large the input. workers <= 1 runs inline in this process.
    """
    if workers <= 1:
        initializer(*initargs)
        for meta, payload in batches:
            yield meta, fn(payload)
        return
    ctx = mp.get_context("spawn" if use_spawn else "fork")
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        inflight: deque = deque()
        for meta, payload in batches:
            inflight.append((meta, pool.apply_async(fn, (payload,))))
            if len(inflight) >= 2 * workers + 1:
                meta0, res = inflight.popleft()
                yield meta0, res.get()
        while inflight:
            meta0, res = inflight.popleft()
            yield meta0, res.get()
