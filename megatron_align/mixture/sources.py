"""What a mixture's sources hold: their stats sidecars, checked against the .bin/.idx they describe."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from megatron_align.mixture.schema import Mixture, MixtureError, Source

STATS_FORMAT = "megatron-align/indexed-stats/v1"


@dataclass(frozen=True)
class SourceInfo:
    """A source with the sizes the plan needs (train split = documents not held out)."""

    source: Source
    documents: int
    tokens: int
    train_documents: int
    train_tokens: int
    dtype: str
    tokenizer: dict

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def category(self) -> str:
        return self.source.category

    @property
    def prefix(self) -> str:
        return self.source.prefix


def read_stats(prefix: str) -> dict:
    """Read ``PREFIX.stats.json`` (written by ``data-tools preprocess``) and check the keys used here."""
    path = prefix + ".stats.json"
    try:
        with open(path, encoding="utf-8") as handle:
            stats = json.load(handle)
    except FileNotFoundError:
        raise MixtureError(f"{path}: stats sidecar not found (make it with `data-tools preprocess`)") from None
    except (OSError, ValueError) as err:
        raise MixtureError(f"{path}: unreadable stats sidecar ({err})") from None
    if not isinstance(stats, dict):
        raise MixtureError(f"{path}: expected a JSON object")
    if stats.get("format") != STATS_FORMAT:
        raise MixtureError(f"{path}: format is {stats.get('format')!r}, expected {STATS_FORMAT!r}")
    for key in ("documents", "tokens"):
        if not isinstance(stats.get(key), int) or stats[key] < 0:
            raise MixtureError(f"{path}: '{key}' must be a non-negative integer")
    if stats.get("dtype") not in ("uint16", "int32"):
        raise MixtureError(f"{path}: 'dtype' must be uint16 or int32, got {stats.get('dtype')!r}")
    tokenizer = stats.get("tokenizer")
    if not isinstance(tokenizer, dict):
        raise MixtureError(f"{path}: 'tokenizer' must be an object")
    for key, kind in (("sha256", str), ("vocab_size", int), ("eod_id", int)):
        if not isinstance(tokenizer.get(key), kind):
            raise MixtureError(f"{path}: 'tokenizer.{key}' missing or not a {kind.__name__}")
    return stats


def train_document_count(documents: int, valid_fraction: float) -> int:
    """Documents megatron-core puts in the train split for ``split = (1 - f, f, 0)``."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split_string(valid_fraction)))
    begin, end = matrix[0]
    return int(round(end * documents)) - int(round(begin * documents))


def split_string(valid_fraction: float) -> str:
    # megatron parses the split with a [.0-9]+ regex: no exponents.
    return f"{1.0 - valid_fraction:.12f},{valid_fraction:.12f},0"


def inspect_sources(mixture: Mixture, names: Iterable[str]) -> dict[str, SourceInfo]:
    """Check the named sources' files and sidecars; sizes of their train splits."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    infos: dict[str, SourceInfo] = {}
    for source in mixture.sources:
        if source.name not in names:
            continue
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(source.prefix + suffix):
                raise MixtureError(f"{source.where}.prefix: {source.prefix + suffix} does not exist")
        if not os.path.isfile(source.prefix + ".stats.json"):
            raise MixtureError(f"{source.where}.prefix: {source.prefix}.stats.json does not exist "
                               "(make the source with `data-tools preprocess`)")
        try:
            stats = read_stats(source.prefix)
        except MixtureError as err:
            raise MixtureError(f"{source.where}.prefix: {err}") from None
        indexed = IndexedDataset(source.prefix, mmap=True)
        lengths = np.array(indexed.sequence_lengths)  # a copy: the mmap closes with `indexed`
        del indexed
        if len(lengths) != stats["documents"] or int(lengths.sum(dtype=np.int64)) != stats["tokens"]:
            raise MixtureError(
                f"{source.where}.prefix: {source.prefix}.stats.json says {stats['documents']} documents / "
                f"{stats['tokens']} tokens but the .idx holds {len(lengths)} / {int(lengths.sum(dtype=np.int64))} "
                "(stale sidecar?)")
        train_docs = train_document_count(len(lengths), mixture.valid_fraction)
        train_tokens = int(lengths[:train_docs].sum(dtype=np.int64))
        if train_docs == 0 or train_tokens == 0:
            raise MixtureError(f"{source.where}: source {source.name!r} has no training documents "
                               f"({len(lengths)} documents, valid_fraction {mixture.valid_fraction:g})")
        if mixture.valid_fraction > 0 and train_docs == len(lengths):
            raise MixtureError(f"{source.where}: source {source.name!r} has too few documents "
                               f"({len(lengths)}) to hold out valid_fraction {mixture.valid_fraction:g}")
        infos[source.name] = SourceInfo(source, len(lengths), stats["tokens"], train_docs, train_tokens,
                                        stats["dtype"], dict(stats["tokenizer"]))

    first = next(iter(infos.values()), None)
    for info in infos.values():
        if info.tokenizer["sha256"] != first.tokenizer["sha256"]:
            raise MixtureError(
                f"{info.source.where}: tokenizer mismatch: source {info.name!r} was tokenised with "
                f"{info.tokenizer.get('path', '?')} (sha256 {info.tokenizer['sha256'][:12]}…) but source "
                f"{first.name!r} with {first.tokenizer.get('path', '?')} (sha256 {first.tokenizer['sha256'][:12]}…)")
        for key in ("vocab_size", "eod_id"):
            if info.tokenizer[key] != first.tokenizer[key]:
                raise MixtureError(f"{info.source.where}: tokenizer.{key} {info.tokenizer[key]} differs "
                                   f"from source {first.name!r} ({first.tokenizer[key]})")
    return infos
