"""Read global tensors (or one layer of them) out of a torch_dist checkpoint, in one process.

megatron-core's torch_dist format is a torch.distributed.checkpoint (DCP) directory: every
tensor key holds the *global* tensor (transformer layers stacked on a leading axis, TP shards as
chunks). We reuse DCP's own storage reader and resharding read planner, and ask only for the box
we need, so memory stays near one layer and no process group is required — the trainer can call
this from rank 0 while the other ranks wait.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

MODEL_PREFIX = "model."


class _BoxPlanner:
    """The slice of DCP's LoadPlanner interface that FileSystemReader.read_data calls."""

    def __init__(self, target: torch.Tensor):
        self.target = target

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        view = self.target
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, item, value) -> None:  # pragma: no cover - we never request bytes
        raise AssertionError("unexpected byte read")


class TorchDistReader:
    """``reader.read('decoder.layers.mlp.linear_fc1.weight', layer=3)`` -> that layer's global tensor."""

    def __init__(self, checkpoint_dir: str | Path):
        self.path = Path(checkpoint_dir)
        self._reader = FileSystemReader(str(self.path))
        self.metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.tensors: dict[str, TensorStorageMetadata] = {
            key[len(MODEL_PREFIX):]: md for key, md in self.metadata.state_dict_metadata.items()
            if key.startswith(MODEL_PREFIX) and isinstance(md, TensorStorageMetadata)
        }

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> torch.Size:
        return self.tensors[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The global tensor ``key`` (without the 'model.' prefix), or its ``layer``-th slice."""
        md = self.tensors[key]
        offsets = [0] * len(md.size)
        sizes = list(md.size)
        if layer is not None:
            offsets[0], sizes[0] = layer, 1
        target = torch.empty(sizes, dtype=md.properties.dtype)
        box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(MODEL_PREFIX + key, md, [box])
        self._reader.read_data(LoadPlan(items), _BoxPlanner(target)).wait()
        return target[0] if layer is not None else target
