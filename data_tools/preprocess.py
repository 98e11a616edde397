"""Tokenise JSONL/Parquet documents into a megatron-core indexed dataset (`.bin/.idx`).

Documents flow in bounded batches. With an HF `tokenizer.json` everything runs in one process:
the main thread reads and parses batch k+1 and writes batch k-1 while a helper thread runs the
Rust tokenizer on batch k (`encode_batch_fast` releases the GIL and spreads the batch over
`workers` Rust threads). With a SentencePiece model, worker processes parse and tokenise. Each
batch is one write of a flat array (documents plus EOD) by `indexed_writer.IndexedWriter`, which
writes megatron-core's format without importing megatron-core (that import alone costs more
than a third of tokenising a 60 MB corpus).
Everything is written under a temporary prefix and renamed only when complete; the stats
sidecar is renamed last.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from data_tools.errors import DataToolsError
from data_tools.indexed_writer import IndexedWriter, optimal_token_dtype
from data_tools.parallel import in_order, ordered_map
from data_tools.readers import SKIP_KINDS, BadRecord, iter_records, parse_record, resolve_inputs
from megatron_align.io import STATS_FORMAT, stats_path, write_stats
from data_tools.tokenizers import load_tokenizer, tokenizer_identity

BATCH_DOCS = 1024
BATCH_BYTES = 4 << 20
MAX_REPORTED_BAD = 20


def megatron_indexed():
    """megatron-core's indexed_dataset module, imported without its TE/apex fallback warnings."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def open_indexed(prefix: str):
    """megatron-core's `IndexedDataset` for PREFIX.bin/.idx (mmap: nothing is read until asked);
    a missing file or an .idx megatron-core cannot read is a DataToolsError naming it."""
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise DataToolsError(f"{prefix + suffix}: not found")
    try:
        return megatron_indexed().IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, KeyError, OSError) as exc:
        raise DataToolsError(f"{prefix}.idx: not a megatron-core indexed dataset index ({exc or type(exc).__name__})") from None


# ---------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, eod_token: Optional[str], text_field: str, dtype_name: str, in_pool: bool) -> None:
    if in_pool:  # one tokenizer thread per worker process; N workers already use N cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"] = load_tokenizer(tokenizer_path, eod_token)
    _WORKER["text_field"] = text_field
    _WORKER["dtype"] = np.dtype(dtype_name)


def _parse_batch(raws: list, text_field: str) -> Tuple[List[str], List[Tuple[int, str, str]]]:
    """(texts of the good records, (position, kind, detail) of the bad ones)."""
    texts, bad = [], []
    for pos, raw in enumerate(raws):
        parsed = parse_record(raw, text_field, fast_json=True)
        if isinstance(parsed, BadRecord):
            bad.append((pos, parsed.kind, parsed.detail))
        else:
            texts.append(parsed[1])
    return texts, bad


def _flatten_with_eod(ids: List[List[int]], eod: int, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """(all documents back to back, each followed by EOD; their lengths incl. EOD)."""
    for x in ids:
        x.append(eod)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _encode_batch(raws: list) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, str, str]]]:
    """Parse and tokenise one batch in a pool worker: (flat tokens, lengths, bad records)."""
    tok = _WORKER["tok"]
    texts, bad = _parse_batch(raws, _WORKER["text_field"])
    flat, lengths = _flatten_with_eod(tok.encode_batch(texts) if texts else [], tok.eod_id, _WORKER["dtype"])
    return flat, lengths, bad


_RUST_POOL_OWNER: list = [None]  # pid of the process whose tokenizer thread pool we started


@contextmanager
def _tokenizer_threads(threads: int):
    """Let HF `tokenizers` use `threads` Rust threads while the block runs.

    TOKENIZERS_PARALLELISM is read at every call, so 1 thread is exact. RAYON_NUM_THREADS sizes
    Rust's pool once, at its first parallel call in the process; it is set only when the user
    has not set it, and a later call in the same process keeps the first size.
    A fork of a process that started the pool inherits the pool without its threads, and with
    TOKENIZERS_PARALLELISM=true `tokenizers` would use it and hang; such a child tokenises on
    one thread."""
    if _RUST_POOL_OWNER[0] not in (None, os.getpid()):
        threads = 1
    elif threads > 1:
        _RUST_POOL_OWNER[0] = os.getpid()
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    if threads > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _threaded_encode(batches, tok, text_field: str, dtype, threads: int) -> Iterator[Tuple[Any, tuple]]:
    """Yield (meta, (flat, lengths, bad)) in input order, tokenising on one helper thread.

    The Rust call releases the GIL, so this thread parses the next batch (and the caller writes
    the previous one) meanwhile; two batches are in flight at most."""
    from concurrent.futures import ThreadPoolExecutor

    dtype, eod = np.dtype(dtype), tok.eod_id

    def encode(texts):
        return _flatten_with_eod(tok.encode_batch(texts) if texts else [], eod, dtype)

    def parsed():  # the bad records ride along with the batch's meta
        for meta, raws in batches:
            texts, bad = _parse_batch(raws, text_field)
            yield (meta, bad), texts

    with _tokenizer_threads(threads):
        pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        try:
            encoded = in_order(parsed(), lambda texts: pool.submit(encode, texts).result, limit=2)
            for (meta, bad), (flat, lengths) in encoded:
                yield meta, (flat, lengths, bad)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- main side
@dataclass
class InputStats:
    path: str
    lines: int = 0
    documents: int = 0
    skipped: int = 0

    def as_dict(self) -> dict:
        return {"path": self.path, "lines": self.lines, "documents": self.documents, "skipped": self.skipped}


@dataclass
class ShardResult:
    """What one tokenisation pass (a whole run, one MPI rank or one shard) produced."""

    documents: int = 0
    tokens: int = 0
    inputs: List[InputStats] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=lambda: {k: 0 for k in SKIP_KINDS})
    error: Optional[str] = None


def global_ranges(counts: Sequence[int], start: int, stop: int) -> List[Tuple[int, int, int]]:
    """(file index, local start, local stop) covering global record indices [start, stop)."""
    out, offset = [], 0
    for i, n in enumerate(counts):
        lo, hi = max(start - offset, 0), min(stop - offset, n)
        if lo < hi:
            out.append((i, lo, hi))
        offset += n
    return out


def _batches(
    files: Sequence[str], text_field: str, ranges: Optional[List[Tuple[int, int, int]]]
) -> Iterator[Tuple[List[Tuple[int, int]], list]]:
    """Yield (meta, raws) where meta[k] = (file index, line number) of raws[k]."""
    if ranges is None:
        ranges = [(i, 0, None) for i in range(len(files))]
    meta, raws, size = [], [], 0
    for file_index, lo, hi in ranges:
        for line_no, raw in iter_records(files[file_index], lo, hi, columns=[text_field]):
            meta.append((file_index, line_no))
            raws.append(raw)
            size += len(raw) if isinstance(raw, bytes) else 256
            if len(raws) >= BATCH_DOCS or size >= BATCH_BYTES:
                yield meta, raws
                meta, raws, size = [], [], 0
    if raws:
        yield meta, raws


def tokenize_to_prefix(
    files: Sequence[str],
    out_prefix: str,
    tokenizer_path: str,
    *,
    eod_token: Optional[str],
    text_field: str,
    dtype,
    workers: int = 1,
    on_error: str = "fail",
    ranges: Optional[List[Tuple[int, int, int]]] = None,
    line_counts: Optional[Sequence[int]] = None,
    use_spawn: bool = False,
    progress: bool = True,
    progress_desc: str = "preprocess",
    progress_position: int = 0,
    tokenizer=None,
) -> ShardResult:
    """Tokenise the selected records into out_prefix.bin/.idx (no sidecar, no renaming).

    On a bad record with on_error='fail' returns a result whose `error` names file:line; the
    caller removes the partial files.
    """
    from tqdm import tqdm

    result = ShardResult(inputs=[InputStats(path=p) for p in files])
    builder = IndexedWriter(out_prefix + ".bin", dtype)
    reported = 0
    bar = tqdm(
        desc=progress_desc, unit=" docs", disable=not progress, position=progress_position,
        dynamic_ncols=True, mininterval=0.5, file=sys.stderr,
    )
    started = time.perf_counter()
    last_line = {}
    batches = _batches(files, text_field, ranges)
    tok = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_path, eod_token)
    if tok.kind == "hf":  # Rust threads in this process: no pickling, no pool
        encoded = _threaded_encode(batches, tok, text_field, dtype, max(workers, 1))
    else:
        init_args = (tokenizer_path, eod_token, text_field, np.dtype(dtype).name, workers > 1)
        encoded = ordered_map(_encode_batch, batches, workers, _init_worker, init_args, use_spawn)
    try:
        for meta, (flat, lengths, bad) in encoded:
            bad_pos = {pos: (kind, detail) for pos, kind, detail in bad}
            for pos, (file_index, line_no) in enumerate(meta):
                if pos in bad_pos:
                    kind, detail = bad_pos[pos]
                    message = f"{files[file_index]}:{line_no}: {detail}"
                    if on_error == "fail":
                        result.error = message
                        return result
                    result.skipped[kind] += 1
                    result.inputs[file_index].skipped += 1
                    if reported < MAX_REPORTED_BAD:
                        bar.write(f"skipped {message}", file=sys.stderr)
                    reported += 1
                else:
                    result.inputs[file_index].documents += 1
                last_line[file_index] = line_no
            builder.add_documents(flat, lengths)
            result.documents += len(lengths)
            result.tokens += int(flat.size)
            bar.update(len(meta))
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{result.tokens / elapsed / 1e6:.2f}M tok/s", refresh=False)
        builder.finalize(out_prefix + ".idx")
    finally:
        encoded.close()  # stops the worker pool at once on an early return
        bar.close()
        builder.close()
    if reported > MAX_REPORTED_BAD:
        print(f"... {reported - MAX_REPORTED_BAD} more skipped records not shown", file=sys.stderr)
    # Lines per input: exact when the caller counted them, else the last line seen.
    for i, stats in enumerate(result.inputs):
        if ranges is not None and line_counts is not None:
            stats.lines = sum(hi - lo for fi, lo, hi in ranges if fi == i)
        else:
            stats.lines = last_line.get(i, 0)
    return result


def remove_prefix_files(prefix: str) -> None:
    for suffix in (".bin", ".idx", ".stats.json"):
        try:
            os.remove(prefix + suffix)
        except FileNotFoundError:
            pass


def temp_prefix(prefix: str, tag: str = "") -> str:
    """The hidden prefix a dataset is written under: `.BASE.partial[TAG]-HOST-PID` beside it.

    Host and PID say who owns it, so a later run can tell a crashed run's leftovers from the
    files of one still running (see `remove_stale_partials`)."""
    directory, base = os.path.split(os.path.abspath(prefix))
    return os.path.join(directory, f".{base}.partial{tag}-{socket.gethostname()}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partials(prefix: str) -> List[str]:
    """Remove the temp files crashed runs left for `prefix` (incl. MPI rank and merge parts).

    Only files made on this host by a process that no longer exists go; those of a live
    process, or from another host (its PIDs cannot be checked here), stay. Returns the removed paths.
    """
    directory, base = os.path.split(os.path.abspath(prefix))
    pattern = re.compile(
        rf"\.{re.escape(base)}(?:-\d{{5}}-of-\d{{5}})?\.partial(?:\.[a-z]+)?-(?P<host>.+)-(?P<pid>\d+)\.(?:bin|idx)"
    )
    host = socket.gethostname()
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        match = pattern.fullmatch(name)
        if match is None or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        path = os.path.join(directory, name)
        try:
            os.remove(path)
        except FileNotFoundError:  # another rank on this host got there first
            continue
        removed.append(path)
    for path in removed:
        print(f"removed {path} (left by a run that no longer exists)", file=sys.stderr)
    return removed


def make_stats(
    prefix: str, *, documents: int, tokens: int, dtype, tokenizer: dict, inputs: list, skipped: dict,
    text_field: Optional[str], source: str, **extra,
) -> dict:
    """The `PREFIX.stats.json` sidecar. `source` says which verb made it: preprocess, index-stats
    (a .bin/.idx made by another tool: raw inputs unknown) or merge (inputs are the shards)."""
    return {
        "format": STATS_FORMAT,
        "prefix": os.path.basename(prefix),
        "documents": int(documents),
        "tokens": int(tokens),
        "dtype": np.dtype(dtype).name,
        "tokenizer": tokenizer,
        "inputs": inputs,
        "skipped": skipped,
        "text_field": text_field,
        "source": source,
        **extra,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def build_stats(prefix: str, result: ShardResult, tok, dtype, text_field: str) -> dict:
    return make_stats(
        prefix, documents=result.documents, tokens=result.tokens, dtype=dtype, tokenizer=tokenizer_identity(tok),
        inputs=[s.as_dict() for s in result.inputs], skipped=dict(result.skipped), text_field=text_field,
        source="preprocess",
    )


def publish(tmp: str, prefix: str, stats: dict) -> None:
    """Rename a finished temp prefix into place; the sidecar goes last and marks completion
    (an older sidecar goes first, so it never vouches for the new files)."""
    try:
        os.remove(stats_path(prefix))
    except FileNotFoundError:
        pass
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    write_stats(prefix, stats)


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_path: str,
    *,
    text_field: str = "text",
    eod_token: Optional[str] = None,
    workers: int = 1,
    on_error: str = "fail",
    progress: bool = True,
) -> dict:
    """Single-process (optionally multi-worker) preprocessing; returns the stats sidecar."""
    if on_error not in ("fail", "skip"):
        raise DataToolsError(f"--on-error must be 'fail' or 'skip', not {on_error!r}")
    files = resolve_inputs(inputs)
    tok = load_tokenizer(tokenizer_path, eod_token)
    dtype = optimal_token_dtype(tok.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    remove_prefix_files(output_prefix)  # a stale dataset must not survive a failed rerun
    remove_stale_partials(output_prefix)
    tmp = temp_prefix(output_prefix)
    try:
        result = tokenize_to_prefix(
            files, tmp, tok.path, eod_token=eod_token, text_field=text_field, dtype=dtype,
            workers=workers, on_error=on_error, progress=progress, tokenizer=tok,
        )
        if result.error:
            raise DataToolsError(result.error)
        stats = build_stats(output_prefix, result, tok, dtype, text_field)
        publish(tmp, output_prefix, stats)
    finally:
        remove_prefix_files(tmp)
    return stats
