"""The training data a run reads: a synthetic stream, one indexed dataset, a mixture, or SFT chats.

Every source is exposed the same way (:class:`TrainingData`): a map-style dataset whose sample
``i`` is a pure function of (config, seed, i) — so resuming at ``consumed_samples`` reads exactly
what an uninterrupted run would — plus the category of every sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from megatron_align.io import SidecarError, read_stats, stats_path
from megatron_align.config import ConfigError, RunConfig, config_error
from megatron_align.mixture import load_mixture
from megatron_align.mixture.datasets import DatasetTokenizer, build_mixture_datasets

SYNTHETIC_VOCAB_SIZE = 512


@dataclass
class TrainingData:
    train: torch.utils.data.Dataset
    vocab_size: int
    categories: list[str]
    category_of_samples: Callable[[int, int], np.ndarray]  # [start, stop) -> category ids
    valid: dict[str, torch.utils.data.Dataset] = field(default_factory=dict)
    mixture_hash: Optional[str] = None
    chat_template: Optional[str] = None  # sft: the template the data was rendered with (for export)
    summary: Optional[str] = None  # one line for the run's start-up messages


class SyntheticDataset(torch.utils.data.Dataset):
    """Learnable token sequences: each sample is an arithmetic progression mod ``vocab_size``
    with a seeded start and stride, so loss falls visibly within a few dozen steps."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length, self.vocab_size, self.seed = (
            num_samples, seq_length, vocab_size, seed)
        self.position_ids = torch.arange(seq_length, dtype=torch.long)
        self.loss_mask = torch.ones(seq_length, dtype=torch.float)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        start, stride = rng.integers(0, self.vocab_size), rng.integers(1, 8)
        text = torch.from_numpy((start + stride * np.arange(self.seq_length + 1)) % self.vocab_size)
        return {"tokens": text[:-1].long(), "labels": text[1:].long(),
                "loss_mask": self.loss_mask, "position_ids": self.position_ids}


def build_training_data(config: RunConfig, num_train_samples: int, vocab_size: Optional[int]) -> TrainingData:
    source = config.data.source
    if source == "synthetic":
        vocab = vocab_size or SYNTHETIC_VOCAB_SIZE
        dataset = SyntheticDataset(num_train_samples, config.train.seq_length, vocab, config.train.seed)
        return TrainingData(dataset, vocab, ["synthetic"], _single_category)
    if source == "indexed":
        return _indexed(config, num_train_samples, vocab_size)
    if source == "mixture":
        return _mixture(config)
    if source == "sft":
        return _sft(config, num_train_samples, vocab_size)
    raise ConfigError(f"data.source: {source!r} is not one of synthetic|indexed|mixture|sft")


def train_iterations(config: RunConfig) -> int:
    """``train.iterations``, or with ``data.epochs`` (SFT) the steps that read every conversation
    that many times: data.epochs, when set, replaces train.iterations (a base run's config.yaml
    reused for SFT carries one)."""
    if config.data.epochs is None:
        return config.train.iterations
    from .sft import conversations_in, epoch_iterations

    conversations = conversations_in(config.data.prefix)
    if conversations is None:
        raise config_error(config, "data.prefix", f"{config.data.prefix}.idx does not exist")
    return epoch_iterations(conversations, config.data.epochs, config.train.global_batch_size)


def check_data_inputs(config: RunConfig) -> None:
    """What can be checked about the data before any process starts: the files a source names
    exist, and a mixture parses and has the stage (its data files are checked when planned)."""
    data = config.data
    if data.tokenizer and not Path(data.tokenizer).is_file():
        raise config_error(config, "data.tokenizer", f"{data.tokenizer} does not exist")
    if data.source == "indexed":
        if not data.prefix:
            raise config_error(config, "data.prefix", "data.source=indexed needs data.prefix (a .bin/.idx prefix)")
        for suffix in (".bin", ".idx"):
            if not Path(data.prefix + suffix).is_file():
                raise config_error(config, "data.prefix", f"{data.prefix + suffix} does not exist")
    if data.source == "mixture":
        if not data.mixture:
            raise config_error(config, "data.mixture", "data.source=mixture needs data.mixture (a mixture YAML)")
        load_mixture(data.mixture).stage(data.stage)
    if data.epochs is not None:
        if data.source != "sft":
            raise config_error(config, "data.epochs", f"only data.source=sft counts epochs (this run reads "
                               f"data.source={data.source}); set train.iterations")
        if data.epochs <= 0:
            raise config_error(config, "data.epochs", f"must be > 0, got {data.epochs}")
    if data.source == "sft":
        _check_sft_inputs(config)


def _check_sft_inputs(config: RunConfig) -> dict:
    """The chat dataset's sidecar; its files must exist and it must have been made with --chat."""
    from data_tools.chat import loss_mask_prefix, read_chat_stats
    from data_tools.errors import DataToolsError

    prefix = config.data.prefix
    if not prefix:
        raise config_error(config, "data.prefix", "data.source=sft needs data.prefix (a dataset made by "
                           "`data-tools preprocess --chat`)")
    for path in (prefix + ".bin", prefix + ".idx", loss_mask_prefix(prefix) + ".bin",
                 loss_mask_prefix(prefix) + ".idx"):
        if not Path(path).is_file():
            raise config_error(config, "data.prefix", f"{path} does not exist (make the dataset with "
                               "`data-tools preprocess --chat`)")
    try:
        return read_chat_stats(prefix)
    except DataToolsError as err:
        raise config_error(config, "data.prefix", str(err)) from None


def _single_category(start: int, stop: int) -> np.ndarray:
    return np.zeros(stop - start, dtype=np.int16)


def _indexed(config: RunConfig, num_train_samples: int, vocab_size: Optional[int]) -> TrainingData:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    check_data_inputs(config)
    prefix = config.data.prefix
    # datasets made by other tools have no sidecar: then model.vocab_size must be given
    try:
        stats = read_stats(prefix) if Path(stats_path(prefix)).is_file() else {}
    except SidecarError as err:
        raise ConfigError(f"data.prefix: {err}") from None
    tokenizer_stats = stats.get("tokenizer", {})
    recorded = tokenizer_stats.get("vocab_size")
    vocab = vocab_size or recorded
    if vocab is None:
        raise config_error(config, "data.prefix", f"{prefix} has no stats sidecar (made by another tool?); "
                           "write one with `data-tools index-stats`, or set model.vocab_size")
    if recorded is not None and vocab < recorded:
        raise config_error(config, "model.vocab_size", f"{vocab} is smaller than the {recorded} tokens of "
                           f"the tokenizer recorded in {stats_path(prefix)}")
    eod = tokenizer_stats.get("eod_id", 0)
    dataset_config = GPTDatasetConfig(
        random_seed=config.train.seed,
        sequence_length=config.train.seq_length,
        blend=([prefix], None),
        split="100,0,0",
        tokenizer=DatasetTokenizer(vocab, eod, tokenizer_stats.get("sha256", "unknown")),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
        path_to_cache=_cache_dir(config),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train_samples, 0, 0], lambda: True, dataset_config
    ).build()
    return TrainingData(train, vocab, ["base"], _single_category)


def _cache_dir(config: RunConfig) -> Optional[str]:
    # megatron-core 0.16.1 needs a process group when caching blended indices.
    if not torch.distributed.is_initialized():
        return None
    return config.data.cache_dir or str(Path(config.run_dir) / "data_cache")


def _mixture(config: RunConfig) -> TrainingData:
    check_data_inputs(config)
    datasets = build_mixture_datasets(
        config.data.mixture,
        config.data.stage,
        seq_length=config.train.seq_length,
        global_batch_size=config.train.global_batch_size,
        train_iters=config.train.iterations,
        seed=config.train.seed,
        cache_dir=_cache_dir(config),
        valid_samples_per_category=config.data.valid_samples_per_category,
    )
    return TrainingData(
        train=datasets.train,
        vocab_size=datasets.plan.vocab_size,
        categories=list(datasets.categories),
        category_of_samples=datasets.category_of_samples,
        valid=dict(datasets.valid),
        mixture_hash=datasets.plan.hash,
    )


def _sft(config: RunConfig, num_train_samples: int, vocab_size: Optional[int]) -> TrainingData:
    from .sft import SFTDataset

    stats = _check_sft_inputs(config)
    tokenizer = stats["tokenizer"]
    vocab = vocab_size or tokenizer["vocab_size"]
    if vocab < tokenizer["vocab_size"]:
        raise config_error(config, "model.vocab_size", f"{vocab} is smaller than the {tokenizer['vocab_size']} "
                           f"tokens of the tokenizer recorded in {stats_path(config.data.prefix)}")
    dataset = SFTDataset(config.data.prefix, config.train.seq_length, num_train_samples,
                         config.train.seed, pad_id=tokenizer["eod_id"])
    epochs = num_train_samples / dataset.conversations
    summary = (f"sft: {dataset.conversations:,} conversations from {config.data.prefix}, {epochs:.2f} epochs "
               f"in {config.train.iterations} steps (set by {'data.epochs' if config.data.epochs else 'train.iterations'}), padded to {config.train.seq_length} tokens "
               f"({dataset.truncated:,} longer ones cut); loss on assistant tokens only")
    return TrainingData(dataset, vocab, ["sft"], _single_category, chat_template=stats["chat"]["template"],
                        summary=summary)
