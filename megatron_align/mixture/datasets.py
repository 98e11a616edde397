"""Training and validation datasets for one stage of a resolved mixture, built with megatron-core.

Per source, :class:`BlendedMegatronDatasetBuilder` builds one ``GPTDataset`` holding every sample
the stage reads from that source (train split) plus its held-out validation split. Each window
segment of the plan then takes the next ``n`` samples of every source (a :class:`SourceSlice`, so
no sample is repeated across segments) and megatron-core's ``BlendedDataset`` interleaves them in
its exhaustive mode, which draws exactly the planned count from each. :class:`MixtureTrainDataset`
puts the segments one after the other, so blends switch at exact sample boundaries and sample
``i`` is a pure function of (mixture, stage, seed, i): resuming at ``consumed_samples = k`` reads
what an uninterrupted run reads.

A source that continues an earlier stage's stream (``continues`` in the mixture) gets that stage's
GPTDatasets, rebuilt with its seed and sample count (so the same indices, or a cache hit), followed
by a new pass when they run out (:class:`SourceStream`); the stage's slices start at the sample
where the earlier stage's planned samples end.
"""
from __future__ import annotations

import bisect
import contextlib
import copy
import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from megatron_align.mixture.plan import MixturePlan, resolve_stage
from megatron_align.mixture.schema import Mixture, MixtureError, load_mixture
from megatron_align.mixture.sources import split_string

log = logging.getLogger(__name__)


class DatasetTokenizer:
    """What megatron-core's GPTDataset reads from a tokenizer: ``eod``, ``vocab_size`` and an
    identity for its cache keys. Pad is deliberately absent: GPTDataset then pads with -1."""

    def __init__(self, vocab_size: int, eod: int, sha256: str):
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("sha256", sha256), ("vocab_size", vocab_size), ("eod", eod)])


def stage_seed(seed: int, stage: str) -> int:
    """The data seed of a stage: stages sharing a source must not replay its document order (a
    source that continues an earlier stage's stream keeps the seeds of that stream's passes)."""
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class SourceSlice(torch.utils.data.Dataset):
    """Samples ``[offset, offset + length)`` of a GPTDataset (one segment's share of a source)."""

    def __init__(self, dataset, offset: int, length: int):
        if offset < 0 or offset + length > len(dataset):
            raise IndexError(f"slice [{offset}, {offset + length}) outside a dataset of {len(dataset)}")
        self.dataset, self.offset, self.length = dataset, offset, length
        self.index_split = dataset.index_split
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("dataset", dataset.unique_identifiers),
             ("offset", offset), ("length", length)])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.dataset[self.offset + int(index)]


class SourceStream(torch.utils.data.Dataset):
    """A source's GPTDataset passes back to back (one source's stream across stages)."""

    def __init__(self, passes: list):
        self.passes = passes
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in passes])]).astype(np.int64)
        self.index_split = passes[0].index_split
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("passes", [p.unique_identifiers for p in passes])])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        number = bisect.bisect_right(self.starts, index) - 1
        return self.passes[number][int(index) - int(self.starts[number])]


class MixtureTrainDataset(torch.utils.data.Dataset):
    """The stage's segments back to back; every item carries ``category_id`` and ``source_id``."""

    def __init__(self, segments: list, segment_sources: list[np.ndarray], source_categories: np.ndarray):
        self.segments = segments
        self.segment_sources = segment_sources  # per segment: local dataset id -> global source id
        self.source_categories = source_categories
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in segments])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside [0, {len(self)})")
        segment = bisect.bisect_right(self.starts, index) - 1
        return segment, index - int(self.starts[segment])

    def __getitem__(self, index: int) -> dict:
        segment, local = self.locate(int(index))
        item = dict(self.segments[segment][local])
        source = int(self.segment_sources[segment][int(item.pop("dataset_id"))])
        item["source_id"] = source
        item["category_id"] = int(self.source_categories[source])
        return item

    def source_of_samples(self, start: int, stop: int) -> np.ndarray:
        """Global source id of samples ``[start, stop)``, read from the BlendedDataset indices."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"samples [{start}, {stop}) outside [0, {len(self)})")
        parts = []
        for segment, blend in enumerate(self.segments):
            lo, hi = max(start, self.starts[segment]), min(stop, self.starts[segment + 1])
            if lo < hi:
                local = blend.dataset_index[lo - self.starts[segment]:hi - self.starts[segment]]
                parts.append(self.segment_sources[segment][local])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    def category_of_samples(self, start: int, stop: int) -> np.ndarray:
        return self.source_categories[self.source_of_samples(start, stop)]


class TaggedDataset(torch.utils.data.Dataset):
    """Adds ``category_id`` / ``source_id`` to the items of a validation dataset."""

    def __init__(self, dataset, source_ids: np.ndarray, category_id: int):
        self.dataset, self.source_ids, self.category_id = dataset, source_ids, category_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item["source_id"] = int(self.source_ids[int(item.pop("dataset_id", 0))])
        item["category_id"] = self.category_id
        return item


@dataclass
class MixtureDatasets:
    train: MixtureTrainDataset
    categories: list[str]
    valid: dict[str, torch.utils.data.Dataset]
    plan: MixturePlan
    sources: list[str] = field(default_factory=list)
    seed: int = 0
    streams: list[list] = field(default_factory=list)  # per source: its GPTDataset passes (plan's stream)
    _keepalive: object = None  # the temporary cache directory, when no cache_dir was given

    def category_of_samples(self, start: int, stop: int) -> np.ndarray:
        """Category id (index into ``categories``) of train samples ``[start, stop)``; no token reads."""
        return self.train.category_of_samples(start, stop)

    def source_of_samples(self, start: int, stop: int) -> np.ndarray:
        return self.train.source_of_samples(start, stop)

    def tokens_by_category(self, start: int, stop: int) -> dict[str, int]:
        counts = np.bincount(self.category_of_samples(start, stop), minlength=len(self.categories))
        return {c: int(n) * self.plan.seq_length for c, n in zip(self.categories, counts)}

    def realised_samples(self) -> np.ndarray:
        """Samples per (segment, source) counted from megatron-core's BlendedDataset indices."""
        matrix = np.zeros((len(self.train.segments), len(self.sources)), dtype=np.int64)
        for segment, blend in enumerate(self.train.segments):
            local = np.bincount(blend.dataset_index, minlength=len(self.train.segment_sources[segment]))
            matrix[segment, self.train.segment_sources[segment]] += local
        return matrix


def build_mixture_datasets(
    mixture: Union[str, os.PathLike, Mixture],
    stage: Optional[str],
    *,
    seq_length: int,
    global_batch_size: int,
    train_iters: int,
    seed: int,
    cache_dir: Optional[str] = None,
    valid_samples_per_category: int = 0,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    is_built_on_rank: Callable[[], bool] = lambda: True,
    progress: bool = True,
) -> MixtureDatasets:
    """Build the train dataset (exactly ``train_iters * global_batch_size`` samples) and one
    validation dataset per category for ``stage`` of ``mixture`` (a YAML path or a Mixture).

    With a process group, ``cache_dir`` must be a directory every rank sees; rank 0 builds the
    indices there first. Without one, a missing ``cache_dir`` means a temporary directory.
    """
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if not isinstance(mixture, Mixture):
        mixture = load_mixture(mixture)
    plan = resolve_stage(mixture, stage, seq_length=seq_length, global_batch_size=global_batch_size,
                         iterations=train_iters)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    keepalive = None
    if cache_dir is None:
        if distributed:
            raise ValueError("build_mixture_datasets: pass cache_dir (shared by all ranks) when a "
                             "process group is initialised")
        keepalive = tempfile.TemporaryDirectory(prefix="megatron-align-data-")
        cache_dir = keepalive.name

    data_seed = stage_seed(seed, plan.stage)
    config = GPTDatasetConfig(
        random_seed=data_seed,
        sequence_length=plan.seq_length,
        blend=([plan.sources[0].prefix], None),
        split=split_string(plan.valid_fraction),
        path_to_cache=cache_dir,
        mmap_bin_files=True,
        tokenizer=DatasetTokenizer(plan.vocab_size, plan.eod_id, plan.tokenizer["sha256"]),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    # megatron-core 0.16.1 asks torch.distributed for the rank when caching a BlendedDataset;
    # single-process builds keep those (cheap, exact) indices in memory instead.
    blend_config = config if distributed else _without_cache(config)

    train_parts, valid_parts, streams = [], [], []
    sources = plan.sources
    bar = tqdm(sources, desc=f"indexing {plan.stage} sources", unit="source", disable=not progress)
    for source in bar:
        bar.set_postfix_str(source.name)
        passes, valid = [], None
        for stream_pass in source.stream:
            source_config = copy.copy(config)
            source_config.blend = ([source.prefix], None)
            source_config.random_seed = stage_seed(seed, stream_pass.stage)
            train, pass_valid, _ = BlendedMegatronDatasetBuilder(
                GPTDataset, [stream_pass.num_samples, None, None], is_built_on_rank, source_config).build()
            if train is None:
                raise RuntimeError(f"source {source.name}: megatron-core built no dataset on this rank")
            if source.continues is not None and len(train) != stream_pass.length:
                raise RuntimeError(f"source {source.name}: megatron-core built {len(train)} samples for the "
                                   f"stream pass of stage {stream_pass.stage!r}; the plan expected "
                                   f"{stream_pass.length}, so the continuation offsets would be wrong")
            passes.append(train)
            valid = valid if valid is not None else pass_valid  # the first pass's seed orders it
        train_parts.append(passes[0] if len(passes) == 1 else SourceStream(passes))
        valid_parts.append(valid)
        streams.append(passes)

    source_categories = plan.source_category_ids()
    segments, segment_sources = [], []
    offsets = np.array([s.stream_start for s in sources], dtype=np.int64)
    with _quiet_blends(not distributed):
        for segment in plan.segments:
            ids = [i for i, s in enumerate(sources) if segment.samples[s.name] > 0]
            counts = [int(segment.samples[sources[i].name]) for i in ids]
            slices = [SourceSlice(train_parts[i], int(offsets[i]), n) for i, n in zip(ids, counts)]
            blend = BlendedMegatronDatasetBuilder.build_generic_dataset(
                BlendedDataset, is_built_on_rank, True, slices, counts, None, blend_config)
            for i, n in zip(ids, counts):
                offsets[i] += n
            segments.append(blend)
            segment_sources.append(np.array(ids, dtype=np.int16))
    train_dataset = MixtureTrainDataset(segments, segment_sources, source_categories)
    assert len(train_dataset) == plan.num_samples

    valid = {}
    if valid_samples_per_category > 0:
        with _quiet_blends(True):
            valid = _valid_datasets(plan, valid_parts, valid_samples_per_category, _without_cache(config))

    return MixtureDatasets(train=train_dataset, categories=list(plan.categories), valid=valid, plan=plan,
                           sources=[s.name for s in sources], seed=data_seed, streams=streams,
                           _keepalive=keepalive)


def _valid_datasets(plan: MixturePlan, valid_parts: list, per_category: int, config) -> dict:
    from megatron.core.datasets.blended_dataset import BlendedDataset

    if plan.valid_fraction <= 0:
        raise MixtureError(f"{plan.mixture_path}: valid_fraction is 0, so no documents are held out "
                           "for validation; set valid_fraction (e.g. 0.01) in the mixture")
    result = {}
    for category in plan.categories:
        ids = [i for i, s in enumerate(plan.sources)
               if s.category == category and valid_parts[i] is not None and len(valid_parts[i]) > 0]
        if not ids:
            log.warning("category %s has no held-out validation sample", category)
            continue
        available = [len(valid_parts[i]) for i in ids]
        weights = [plan.sources[i].train_tokens for i in ids]
        counts = _apportion_capped(per_category, weights, available)
        kept = [(i, n) for i, n in zip(ids, counts) if n > 0]
        if sum(counts) < per_category:
            log.warning("category %s: only %d held-out samples (asked for %d)", category, sum(counts), per_category)
        slices = [SourceSlice(valid_parts[i], 0, n) for i, n in kept]
        dataset = BlendedDataset(slices, [n for _, n in kept], None, config)
        result[category] = TaggedDataset(dataset, np.array([i for i, _ in kept], dtype=np.int16),
                                         plan.category_id(category))
    return result


def _apportion_capped(total: int, weights: list[int], caps: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` without exceeding ``caps``."""
    counts = [0] * len(weights)
    remaining, open_ = min(total, sum(caps)), list(range(len(weights)))
    while remaining > 0 and open_:
        pool = sum(weights[i] for i in open_)
        shares = {i: remaining * weights[i] / pool for i in open_}
        given = 0
        for i in open_:
            add = min(caps[i] - counts[i], int(shares[i]))
            counts[i] += add
            given += add
        if given == 0:  # fractions only: hand out one at a time, largest weight first
            for i in sorted(open_, key=lambda i: -weights[i]):
                if remaining - given > 0 and counts[i] < caps[i]:
                    counts[i] += 1
                    given += 1
        remaining -= given
        open_ = [i for i in open_ if counts[i] < caps[i]]
    return counts


def _without_cache(config):
    uncached = copy.copy(config)
    uncached.path_to_cache = None
    return uncached


@contextlib.contextmanager
def _quiet_blends(enabled: bool):
    """Silence BlendedDataset's "cannot save without path_to_cache" / "single dataset" warnings,
    which are expected here."""
    logger = logging.getLogger("megatron.core.datasets.blended_dataset")
    previous = logger.level
    if enabled:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)
