"""SFT samples: one conversation per sample, padded, with the loss on the assistant tokens only.

Reads a chat dataset made by ``data-tools preprocess --chat`` (token ids and a loss mask as two
indexed datasets with equal document lengths). Each sample is one conversation, cut to
``seq_length + 1`` tokens and padded with the EOD id; ``loss_mask`` is the assistant mask shifted
onto the labels, 0 on padding.

Padded, not packed: attention is causal and no other conversation shares the row, so a
conversation never attends to another one, with no attention mask at all (which megatron-core's
local and TransformerEngine specs both handle). Packing several conversations into one row would
need a per-document (block-diagonal) attention mask or variable-length kernels; padding costs
compute on short conversations instead.

Sample ``i`` is conversation ``order(i // N)[i % N]``: each epoch is a fresh seeded permutation of
the N conversations, so a sample is a pure function of (seed, i) and a resume reads exactly what
an uninterrupted run would.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data_tools.chat import loss_mask_prefix
from megatron_align.config import ConfigError


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, prefix: str, seq_length: int, num_samples: int, seed: int, pad_id: int):
        from data_tools.preprocess import open_indexed

        self.prefix, self.seq_length, self.num_samples, self.seed, self.pad_id = (
            prefix, seq_length, num_samples, seed, pad_id)
        self.tokens = open_indexed(prefix)
        self.mask = open_indexed(loss_mask_prefix(prefix))
        lengths = self.tokens.sequence_lengths
        if len(lengths) != len(self.mask.sequence_lengths) or not np.array_equal(lengths, self.mask.sequence_lengths):
            raise ConfigError(f"data.prefix: {loss_mask_prefix(prefix)}.idx does not match {prefix}.idx "
                              "(conversation lengths differ); rerun `data-tools preprocess --chat`")
        self.conversations = len(lengths)
        if self.conversations == 0:
            raise ConfigError(f"data.prefix: {prefix} holds no conversation")
        self.truncated = int((lengths > seq_length + 1).sum())
        self.position_ids = torch.arange(seq_length, dtype=torch.long)
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> np.ndarray:
        """The conversations of one epoch, in the order they are read."""
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.conversations)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def conversation_of(self, index: int) -> int:
        epoch, position = divmod(index, self.conversations)
        return int(self.order(epoch)[position])

    def __getitem__(self, index: int) -> dict:
        doc = self.conversation_of(index)
        window = self.seq_length + 1
        ids = np.full(window, self.pad_id, dtype=np.int64)
        mask = np.zeros(window, dtype=np.float32)
        text = self.tokens[doc][:window]
        ids[:len(text)] = text
        mask[:len(text)] = self.mask[doc][:window]
        ids = torch.from_numpy(ids)
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": torch.from_numpy(mask[1:]),
                "position_ids": self.position_ids}


def epoch_iterations(conversations: int, epochs: float, global_batch_size: int) -> int:
    """Steps that read every conversation ``epochs`` times (the last step may run into the next
    epoch's order)."""
    return max(1, math.ceil(conversations * epochs / global_batch_size))


def conversations_in(prefix: str) -> Optional[int]:
    """The number of conversations of a chat dataset, from its .idx (None when missing)."""
    if not Path(prefix + ".idx").is_file():
        return None
    from data_tools.preprocess import open_indexed

    return len(open_indexed(prefix).sequence_lengths)
