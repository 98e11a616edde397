"""Write (sharded) safetensors files tensor by tensor, with every shape known up front.

The ``safetensors`` library writes a file from a complete dict of tensors, which would hold a
whole shard (up to the shard size) in memory. The format is simple — an 8-byte little-endian
header length, a JSON header with each tensor's dtype, shape and byte range, then the raw
bytes — so once all names and shapes are planned we can write the header first and stream each
tensor's bytes as it is produced. Files are read back with ``safetensors``/``transformers``.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000 (decimal units like transformers; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"size {text!r}: expected a number with a unit, e.g. 2GB, 500MB, 4GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


class ShardedSafetensorsWriter:
    """Plan shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own), then
    ``write(name, tensor)`` in plan order; ``close()`` writes the index when there are shards."""

    def __init__(self, out_dir: str | Path, plan: list[PlannedTensor], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.total_bytes = sum(t.nbytes for t in plan)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in plan:
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        self.shards = shards
        count = len(shards)
        self.filenames = ([SINGLE_FILE] if count == 1 else
                          [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._order = [(shard, t) for shard, tensors in enumerate(shards) for t in tensors]
        self._next = 0
        self._handle = None
        self._open_shard: Optional[int] = None

    def _start_shard(self, shard: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header, offset = {}, 0
        for tensor in self.shards[shard]:
            header[tensor.name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned, as safetensors does
        self._handle = open(self.out_dir / self.filenames[shard], "wb")
        self._handle.write(struct.pack("<Q", len(encoded)))
        self._handle.write(encoded)
        self._open_shard = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, planned = self._order[self._next]
        if name != planned.name:
            raise AssertionError(f"safetensors stream: expected {planned.name}, got {name}")
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise AssertionError(f"{name}: planned {planned.shape} {planned.dtype}, "
                                 f"got {tuple(tensor.shape)} {tensor.dtype}")
        if shard != self._open_shard:
            self._start_shard(shard)
        data = tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy()
        self._handle.write(memoryview(data))
        self._next += 1

    def close(self) -> list[str]:
        if self._next != len(self._order):
            missing = [t.name for _, t in self._order[self._next:]]
            raise AssertionError(f"safetensors stream: {len(missing)} tensors never written: {missing[:3]}")
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.filenames) > 1:
            weight_map = {t.name: self.filenames[shard] for shard, t in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.filenames)
