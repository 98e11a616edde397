"""Micro-batches for this data-parallel rank, read from the global sample sequence.

Step ``s`` consumes global samples ``[consumed, consumed + global_batch)``; micro-batch ``m`` of
DP rank ``r`` holds samples ``consumed + m*micro*DP + r*micro + [0, micro)``. The sequence is a
pure function of ``consumed``, which is all a resume needs to continue exactly.

Under pipeline parallelism a stage assembles only the keys its model chunks read: tokens on the
first stage (the embedding), labels and loss mask on the last (the loss); position ids go
everywhere (cheap, and megatron-core's GPTModel takes them on every stage).
"""
from __future__ import annotations

from typing import Iterator

import torch

from megatron_align.parallel.layout import ParallelLayout

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
FIRST_STAGE_KEYS = ("tokens",)
LAST_STAGE_KEYS = ("labels", "loss_mask")


def stage_keys(first_stage: bool, last_stage: bool) -> tuple[str, ...]:
    """The batch keys a pipeline stage's model chunks read (all of them without pipelining)."""
    return tuple(k for k in BATCH_KEYS
                 if (first_stage or k not in FIRST_STAGE_KEYS) and (last_stage or k not in LAST_STAGE_KEYS))


def microbatch_indices(layout: ParallelLayout, consumed: int, dp_rank: int, micro: int) -> range:
    start = consumed + micro * layout.micro_batch_size * layout.data + dp_rank * layout.micro_batch_size
    return range(start, start + layout.micro_batch_size)


def collate(samples: list[dict], keys: tuple[str, ...] = BATCH_KEYS) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in keys}


def step_microbatches(dataset, layout: ParallelLayout, consumed: int, dp_rank: int,
                      device: torch.device, keys: tuple[str, ...] = BATCH_KEYS) -> list[dict[str, torch.Tensor]]:
    batches = []
    for micro in range(layout.num_microbatches):
        batch = collate([dataset[i] for i in microbatch_indices(layout, consumed, dp_rank, micro)], keys)
        batches.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
    return batches


def microbatch_iterators(batches: list[dict], num_chunks: int) -> list[Iterator[dict]] | Iterator[dict]:
    """megatron-core schedules take one iterator per virtual pipeline chunk."""
    if num_chunks == 1:
        return iter(batches)
    return [iter(batches) for _ in range(num_chunks)]
