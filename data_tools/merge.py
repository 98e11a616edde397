"""`data-tools merge`: concatenate indexed datasets (shards) into one prefix.

The data and index are joined by megatron-core's `IndexedDatasetBuilder.add_index`, under a
temporary prefix renamed into place when complete. Shards must share one tokenizer and dtype
(read from their sidecars); the merged sidecar sums their counts and lists them as inputs.
`preprocess --mpi` merges its rank outputs with the same `write_merged`.
"""
from __future__ import annotations

import os
import sys
from typing import List, Sequence

import numpy as np

from data_tools.errors import DataToolsError
from data_tools.preprocess import (
    make_stats,
    megatron_indexed,
    open_indexed,
    publish,
    remove_prefix_files,
    remove_stale_partials,
    temp_prefix,
)
from megatron_align.io import check_stats_counts, read_stats, stats_path, tokenizer_difference


def write_merged(parts: Sequence[str], output_prefix: str, stats: dict, dtype, progress: bool = False) -> dict:
    """Concatenate the parts' .bin/.idx in order into output_prefix and write `stats` beside it."""
    from tqdm import tqdm

    builder = megatron_indexed().IndexedDatasetBuilder
    merged = temp_prefix(output_prefix, ".merge")
    try:
        out = builder(merged + ".bin", dtype=np.dtype(dtype).type)
        try:
            sizes = [os.path.getsize(part + ".bin") for part in parts]
            with tqdm(total=sum(sizes), desc="merge", unit="B", unit_scale=True, disable=not progress,
                      dynamic_ncols=True, file=sys.stderr) as bar:
                for part, size in zip(parts, sizes):
                    out.add_index(part)  # copies the part's .bin: the bar moves a shard at a time
                    bar.update(size)
            out.finalize(merged + ".idx")
        finally:
            out.data_file.close()
        publish(merged, output_prefix, stats)
    finally:
        remove_prefix_files(merged)
    return stats


def _check_same_tokenizer(prefixes: Sequence[str], sidecars: List[dict]) -> None:
    first, ref = prefixes[0], sidecars[0]
    for prefix, stats in zip(prefixes[1:], sidecars[1:]):
        key = tokenizer_difference(stats["tokenizer"], ref["tokenizer"])
        if key is not None:
            raise DataToolsError(
                f"{stats_path(prefix)} and {stats_path(first)} disagree on tokenizer.{key} "
                f"({stats['tokenizer'][key]} vs {ref['tokenizer'][key]}): shards of one dataset need one tokenizer")
        if stats["dtype"] != ref["dtype"]:
            raise DataToolsError(f"{stats_path(prefix)} and {stats_path(first)} disagree on dtype "
                                 f"({stats['dtype']} vs {ref['dtype']})")


def _check_counts(prefix: str, stats: dict) -> None:
    ds = open_indexed(prefix)  # keeps the index mmap open while its lengths are read
    lengths = ds.sequence_lengths
    check_stats_counts(prefix, stats, len(lengths), int(lengths.sum(dtype=np.int64)))


def merge(output_prefix: str, prefixes: Sequence[str], *, force: bool = False, progress: bool = True) -> dict:
    """Merge shards (in the order given) into output_prefix; returns the merged sidecar."""
    if not prefixes:
        raise DataToolsError("merge needs at least one shard prefix")
    out = os.path.abspath(output_prefix)
    for prefix in prefixes:
        if os.path.abspath(prefix) == out:
            raise DataToolsError(f"{output_prefix}: the output is also a shard to merge")
    if len({os.path.abspath(p) for p in prefixes}) != len(prefixes):
        raise DataToolsError(f"a shard is listed twice: {' '.join(prefixes)}")
    existing = [output_prefix + s for s in (".bin", ".idx", ".stats.json") if os.path.exists(output_prefix + s)]
    if existing and not force:
        raise DataToolsError(f"{existing[0]}: already exists; pass --force to replace it")
    sidecars = [read_stats(p) for p in prefixes]
    for prefix, stats in zip(prefixes, sidecars):
        if "chat" in stats:
            raise DataToolsError(f"{stats_path(prefix)}: a chat dataset (preprocess --chat); merge joins "
                                 "token ids only and would drop its loss mask: preprocess the chats together")
    _check_same_tokenizer(prefixes, sidecars)
    for prefix, stats in zip(prefixes, sidecars):
        _check_counts(prefix, stats)

    skipped: dict = {}
    for stats in sidecars:
        for kind, n in stats.get("skipped", {}).items():
            skipped[kind] = skipped.get(kind, 0) + n
    text_fields = {stats.get("text_field") for stats in sidecars}
    warnings = [f"{prefix}: {w}" for prefix, stats in zip(prefixes, sidecars) for w in stats.get("warnings", [])]
    merged = make_stats(
        output_prefix,
        documents=sum(s["documents"] for s in sidecars),
        tokens=sum(s["tokens"] for s in sidecars),
        dtype=sidecars[0]["dtype"],
        tokenizer=dict(sidecars[0]["tokenizer"]),
        inputs=[{"path": os.path.abspath(p), "documents": s["documents"], "tokens": s["tokens"],
                 "source": s.get("source", "preprocess")} for p, s in zip(prefixes, sidecars)],
        skipped=skipped,
        text_field=text_fields.pop() if len(text_fields) == 1 else None,
        source="merge",
        **({"warnings": warnings} if warnings else {}),
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    remove_stale_partials(output_prefix)
    return write_merged(prefixes, output_prefix, merged, np.dtype(merged["dtype"]), progress=progress)
