"""MPI-sharded preprocessing: each rank tokenises a contiguous block of records.

Records are numbered across all inputs in order (file by file, line by line); rank r of W
takes global indices [r*N/W, (r+1)*N/W). Concatenating the rank outputs in rank order
therefore gives exactly the single-process document order, and rank 0 merges them with
megatron-core's `IndexedDatasetBuilder.add_index` (`data_tools.merge.write_merged`, as
`data-tools merge` does), or, with output='list', every rank keeps its own prefix and rank 0
writes `PREFIX.prefixes.json`.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

from data_tools.errors import DataToolsError
from data_tools.indexed_writer import optimal_token_dtype
from data_tools.preprocess import (
    InputStats,
    ShardResult,
    build_stats,
    global_ranges,
    publish,
    remove_prefix_files,
    remove_stale_partials,
    temp_prefix,
    tokenize_to_prefix,
)
from data_tools.merge import write_merged
from data_tools.readers import SKIP_KINDS, count_records, resolve_inputs
from megatron_align.io import write_json_atomic
from data_tools.tokenizers import load_tokenizer


def rank_prefix(prefix: str, rank: int, world: int) -> str:
    return f"{prefix}-{rank:05d}-of-{world:05d}"


def _combine(results: List[ShardResult], files: Sequence[str]) -> ShardResult:
    total = ShardResult(inputs=[InputStats(path=p) for p in files])
    for res in results:
        total.documents += res.documents
        total.tokens += res.tokens
        for kind in SKIP_KINDS:
            total.skipped[kind] += res.skipped[kind]
        for agg, part in zip(total.inputs, res.inputs):
            agg.lines += part.lines
            agg.documents += part.documents
            agg.skipped += part.skipped
    return total


def preprocess_mpi(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_path: str,
    *,
    text_field: str = "text",
    eod_token: Optional[str] = None,
    workers: int = 1,
    on_error: str = "fail",
    output: str = "merge",
    progress: bool = True,
    comm=None,
) -> Optional[dict]:
    """Run on every rank; returns the stats sidecar on rank 0 (the list file for output='list')."""
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise DataToolsError(f"--mpi needs mpi4py and an MPI library (pip install 'megatron-align[mpi]'): {exc}") from exc

        comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if output not in ("merge", "list"):
        raise DataToolsError(f"--mpi-output must be 'merge' or 'list', not {output!r}")

    # Every rank resolves the same inputs and checks the tokenizer; errors surface on all ranks.
    setup_error = None
    try:
        files = resolve_inputs(inputs)
        tok = load_tokenizer(tokenizer_path, eod_token)
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
        setup_error = str(exc)
    errors = comm.allgather(setup_error)
    if any(errors):
        raise DataToolsError(next(e for e in errors if e), raised_on_rank=rank)
    dtype = optimal_token_dtype(tok.vocab_size)

    # Count records: rank r counts files r, r+W, ...; everyone learns every count.
    try:
        mine, count_error = {i: count_records(files[i]) for i in range(rank, len(files), world)}, None
    except DataToolsError as exc:
        mine, count_error = {}, str(exc)
    counts = [0] * len(files)
    for part, err in comm.allgather((mine, count_error)):
        if err:
            raise DataToolsError(err, raised_on_rank=rank)
        for i, n in part.items():
            counts[i] = n
    total = sum(counts)
    ranges = global_ranges(counts, total * rank // world, total * (rank + 1) // world)

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    if rank == 0:
        remove_prefix_files(output_prefix)
    remove_stale_partials(output_prefix)  # each rank: dead runs' files from its own host
    tmp = temp_prefix(rank_prefix(output_prefix, rank, world))
    result = ShardResult(inputs=[InputStats(path=p) for p in files])
    try:
        result = tokenize_to_prefix(
            files, tmp, tok.path, eod_token=eod_token, text_field=text_field, dtype=dtype,
            workers=workers, on_error=on_error, ranges=ranges, line_counts=counts, use_spawn=True,
            progress=progress, progress_desc=f"rank {rank}/{world}", progress_position=rank,
        )
    except Exception as exc:  # noqa: BLE001 - every rank must reach the collective below
        result.error = f"rank {rank}: {exc}"
    results = comm.allgather(result)
    failed = [r.error for r in results if r.error]
    if failed:
        remove_prefix_files(tmp)
        raise DataToolsError(failed[0], raised_on_rank=rank)

    combined = _combine(results, files)
    try:
        if output == "list":
            final = rank_prefix(output_prefix, rank, world)
            publish(tmp, final, build_stats(final, result, tok, dtype, text_field))
            comm.barrier()
            if rank != 0:
                return None
            listing = build_stats(output_prefix, combined, tok, dtype, text_field)
            listing["prefixes"] = [
                {"prefix": rank_prefix(output_prefix, r, world), "documents": res.documents, "tokens": res.tokens}
                for r, res in enumerate(results)
            ]
            write_json_atomic(output_prefix + ".prefixes.json", listing)
            return listing

        # merge: rank 0 needs every part's temp prefix; they share a filesystem.
        tmps = comm.gather(tmp, root=0)
        stats = None
        merge_error = None
        if rank == 0:
            try:
                stats = write_merged(tmps, output_prefix, build_stats(output_prefix, combined, tok, dtype, text_field), dtype)
                print(f"merged {len(tmps)} rank outputs into {output_prefix}.bin/.idx", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001
                merge_error = str(exc)
        merge_error = comm.bcast(merge_error, root=0)
        if merge_error:
            raise DataToolsError(merge_error, raised_on_rank=rank)
        return stats
    finally:
        comm.barrier()
        remove_prefix_files(tmp)
