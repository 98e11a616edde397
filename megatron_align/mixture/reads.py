"""Which documents each stage reads for the first time, and which again, from megatron-core's indices.

A stage reads a document when one of its samples holds any of the document's input tokens
(megatron-core's ``sample_index`` cuts the shuffled ``document_index`` into samples; a sample's
extra label token belongs to the next sample). Stages are taken in the order given (the
mixture's order, the order they train in). Per stage and source, every document it reads is

- ``first_seen``: no earlier stage read any of it;
- ``resumed``: an earlier stage read part of the same occurrence of it in the same stream, and
  this stage reads only other samples of that occurrence: a document cut at a sample boundary,
  whose rest a continued stream reads. No token of it is read twice;
- ``repeats``: anything else an earlier stage had read (a reshuffled stream, a new epoch, or two
  stages continuing the same stream).

An occurrence is one position of ``document_index`` in one stream pass; a pass read for several
epochs holds several occurrences of each document.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class DocumentReads:
    documents: int  # distinct documents the stage reads
    first_seen: int
    resumed: int
    repeats: int
    occurrences: int  # document occurrences it reads (> documents when it reads a source twice)


@dataclass
class _PassState:
    read: np.ndarray  # bool per document_index position: read by a stage so far
    windows: list[tuple[int, int]] = field(default_factory=list)  # shuffled-sample ranges read


def read_positions(gpt, first: int, end: int) -> np.ndarray:
    """Which ``document_index`` positions of a megatron-core GPTDataset its shuffled samples
    ``[first, end)`` read (bool mask)."""
    document_index, sample_index = gpt.document_index, gpt.sample_index
    samples = np.asarray(gpt.shuffle_index[first:end], dtype=np.int64)
    begin = np.asarray(sample_index[samples, 0], dtype=np.int64)
    stop = np.asarray(sample_index[samples + 1, 0], dtype=np.int64)
    stop_offset = np.asarray(sample_index[samples + 1, 1], dtype=np.int64)
    last = np.where(stop_offset > 0, stop, stop - 1)  # offset 0: only the label token is from there
    size = len(document_index) + 1
    depth = np.cumsum(np.bincount(begin, minlength=size) - np.bincount(last + 1, minlength=size))
    return depth[:-1] > 0


def count_document_reads(stages: Sequence) -> dict[str, dict[str, DocumentReads]]:
    """``stages``: the :class:`MixtureDatasets` of consecutive stages, in training order.
    Returns, per stage and source, how its documents split into first reads, resumed and repeats."""
    passes: dict[tuple, _PassState] = {}
    earlier: dict[str, np.ndarray] = {}  # source -> occurrences earlier stages read, per document
    result: dict[str, dict[str, DocumentReads]] = {}
    for datasets in stages:
        per_source = {}
        for source, gpts in zip(datasets.plan.sources, datasets.streams):
            documents = len(gpts[0].dataset.sequence_lengths)
            occurrences = np.zeros(documents, dtype=np.int32)
            shared = np.zeros(documents, dtype=np.int32)  # occurrences also read earlier
            newly_read = np.zeros(documents, dtype=np.int32)  # occurrences no earlier stage read
            updates = []
            for number, first, end in source.stream_windows():
                stream_pass, gpt = source.stream[number], gpts[number]
                key = (source.name, stream_pass.stage, stream_pass.num_samples, datasets.plan.seq_length)
                state = passes.setdefault(key, _PassState(np.zeros(len(gpt.document_index), dtype=bool)))
                mask = read_positions(gpt, first, end)
                occurrences += np.bincount(gpt.document_index[mask], minlength=documents)
                newly_read += np.bincount(gpt.document_index[mask & ~state.read], minlength=documents)
                if not any(first < b and a < end for a, b in state.windows):  # other samples than before
                    shared += np.bincount(gpt.document_index[mask & state.read], minlength=documents)
                updates.append((state, mask, (first, end)))
            before = earlier.get(source.name, np.zeros(documents, dtype=np.int32))
            read = occurrences > 0
            first_seen = read & (before == 0)
            resumed = read & (before == 1) & (occurrences == 1) & (shared == 1)
            per_source[source.name] = DocumentReads(
                documents=int(read.sum()), first_seen=int(first_seen.sum()), resumed=int(resumed.sum()),
                repeats=int((read & ~first_seen & ~resumed).sum()), occurrences=int(occurrences.sum()))
            earlier[source.name] = before + newly_read
            for state, mask, window in updates:
                state.read |= mask
                state.windows.append(window)
        result[datasets.plan.stage] = per_source
    return result
