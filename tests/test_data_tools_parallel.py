"""The in-order, bounded window shared by the process pool and the tokenizer thread."""
import time
from concurrent.futures import ThreadPoolExecutor

from data_tools.parallel import in_order, ordered_map


def _square(x):
    return x * x


def _nothing():
    pass


def test_in_order_keeps_input_order_and_bounds_the_window():
    submitted, read = [], []

    def submit(payload):
        submitted.append(payload)
        assert len(submitted) - len(read) <= 3, "more than `limit` payloads in flight"

        def wait():
            read.append(payload)
            return -payload
        return wait

    out = list(in_order(((f"m{i}", i) for i in range(10)), submit, limit=3))
    assert out == [(f"m{i}", -i) for i in range(10)]
    assert read == list(range(10))


def test_in_order_over_threads_returns_results_in_input_order():
    def slow_first(x):  # the first payload finishes last
        time.sleep(0.05 if x == 0 else 0)
        return x + 100

    with ThreadPoolExecutor(4) as pool:
        out = list(in_order(((i, i) for i in range(8)), lambda p: pool.submit(slow_first, p).result, limit=4))
    assert out == [(i, i + 100) for i in range(8)]


def test_ordered_map_in_worker_processes_matches_inline():
    batches = [(i, i) for i in range(12)]
    assert list(ordered_map(_square, batches, 2, _nothing, ())) == [(i, i * i) for i in range(12)]
    assert list(ordered_map(_square, batches, 1, _nothing, ())) == [(i, i * i) for i in range(12)]
