"""megatron-core dist_checkpointing (torch_dist) save/load with an atomic ``latest``.

Layout of ``RUN_DIR/checkpoints``::

    iter_0000100/          a complete checkpoint (dist_checkpointing files + meta.json)
    .iter_0000200.partial  a save in progress (never read; removed by the next save)
    latest                 text file naming the newest complete checkpoint

A save writes into the ``.partial`` directory, fsyncs it, renames it into place and only then
replaces ``latest`` (write-temp, fsync, rename): a process killed at any point leaves the
previous checkpoint as ``latest``, loadable.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from megatron_align.io import fsync_dir, fsync_tree, write_text_atomic

from .files import LATEST_FILE, META_FILE
FORMAT = "megatron-align/checkpoint/v1"


def _sharding_metadata(optimizer_format: str) -> dict:
    """megatron-core's name for how the distributed optimizer lays out its state on disk."""
    return {"distrib_optim_sharding_type": optimizer_format}


class CheckpointError(RuntimeError):
    pass


@dataclass
class CheckpointMeta:
    iteration: int
    consumed_samples: int
    consumed_tokens: int
    tokens_by_category: dict[str, int] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)  # TP/PP/VPP/DP/world at save time
    config: dict[str, Any] = field(default_factory=dict)  # resolved run config
    mixture_hash: Optional[str] = None
    has_optimizer: bool = True
    optimizer_format: str = "dp_reshardable"  # distributed optimizer's layout (config.schema)
    chat_template: Optional[str] = None  # SFT: the template its data was rendered with (export writes it)
    format: str = FORMAT
    saved_at: float = 0.0


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(checkpoints_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint named by ``latest``, or None when there is none."""
    checkpoints_dir = Path(checkpoints_dir)
    pointer = checkpoints_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = checkpoints_dir / name
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{pointer} names {name}, which is missing or incomplete "
                              f"(no {META_FILE}); remove {pointer} to start over")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, a run dir or a checkpoints dir; return the checkpoint dir."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        if (candidate / LATEST_FILE).is_file():
            return latest_checkpoint(candidate)
    raise CheckpointError(f"{path}: not a checkpoint (no {META_FILE}) and no checkpoints/latest")


def read_meta(checkpoint_dir: str | Path) -> CheckpointMeta:
    path = Path(checkpoint_dir) / META_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {checkpoint_dir} is not a complete checkpoint") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt ({err})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {raw.get('format')!r}")
    return CheckpointMeta(**raw)


def stored_run_config(checkpoint_dir: str | Path):
    """The resolved run config a checkpoint was saved with (meta.json), as a RunConfig."""
    from megatron_align.config import RunConfig, from_dict

    meta = read_meta(checkpoint_dir)
    return from_dict(RunConfig, meta.config, source=f"{checkpoint_dir}/{META_FILE}")


def model_sharded_state_dict(model_chunks) -> dict:
    """All chunks under one 'model.' prefix: dist_checkpointing keys are global layer names, so a
    checkpoint saved with one TP/PP/VPP layout loads under another."""
    chunks = [_unwrap(chunk) for chunk in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(prefix="model.")}
    return {"model": {f"chunk{i}": c.sharded_state_dict(prefix="model.") for i, c in enumerate(chunks)}}


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _rng_sharded_object(rank_state: Optional[dict] = None) -> ShardedObject:
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    state = rank_state if rank_state is not None else _rng_state()
    return ShardedObject(f"rng_state_world{world}", state, (world,), (rank,), replica_id=0)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def save_checkpoint(checkpoints_dir: str | Path, meta: CheckpointMeta, model_chunks,
                    optimizer=None, scheduler=None, keep_last: int = 2, keep_every: int = 0,
                    async_queue=None, on_complete: Optional[Callable[[Path], None]] = None) -> Path:
    """Collective: every rank calls it. Returns the directory the checkpoint will have. The
    distributed optimizer's state is written in ``meta.optimizer_format``.

    With ``async_queue`` (megatron-core's ``AsyncCallsQueue``) the shards are written by a forked
    process while training goes on; the checkpoint is renamed into place, ``latest`` updated and
    ``on_complete`` called only when the queue finalizes the save on every rank. The fork is the
    snapshot: on GPU megatron-core first copies the tensors to host memory, on CPU the child's
    copy-on-write view of memory is the state at the moment of the save.
    """
    if async_queue is not None:  # one save in flight at a time: this one reuses .partial cleanup
        async_queue.maybe_finalize_async_calls(blocking=True)
    checkpoints_dir = Path(checkpoints_dir)
    name = checkpoint_name(meta.iteration)
    final = checkpoints_dir / name
    partial = checkpoints_dir / f".{name}.partial"
    if _is_rank0():
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints_dir.glob(".iter_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
    torch.distributed.barrier()

    state = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, metadata=_sharding_metadata(meta.optimizer_format))
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["rng"] = _rng_sharded_object()
    meta.has_optimizer = optimizer is not None
    meta.saved_at = time.time()

    def publish() -> None:  # every rank, once all shards are on disk
        torch.distributed.barrier()
        if _is_rank0():
            (partial / META_FILE).write_text(json.dumps(meta.__dict__, indent=2, default=str))
            fsync_tree(partial)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync_dir(checkpoints_dir)
            write_text_atomic(checkpoints_dir / LATEST_FILE, name + "\n")
            apply_retention(checkpoints_dir, keep_last, keep_every)
        torch.distributed.barrier()
        if on_complete is not None:
            on_complete(final)

    request = dist_checkpointing.save(state, str(partial),
                                      content_metadata=_sharding_metadata(meta.optimizer_format),
                                      async_sharded_save=async_queue is not None)
    if async_queue is None:
        publish()
    else:
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
    return final


def apply_retention(checkpoints_dir: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Keep the newest ``keep_last`` checkpoints plus every ``keep_every``-th step."""
    complete = sorted(p for p in checkpoints_dir.glob("iter_*") if (p / META_FILE).is_file())
    newest = set(complete[-keep_last:]) if keep_last > 0 else set(complete)
    removed = []
    for path in complete:
        iteration = int(path.name.split("_")[1])
        if path in newest or (keep_every and iteration % keep_every == 0):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def load_checkpoint(checkpoint_dir: str | Path, model_chunks, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> CheckpointMeta:
    """Collective. Loads model (any saved TP/PP layout), and optimizer/scheduler/RNG when given.

    Optimizer state follows layout changes as far as its format allows (see
    ``_check_optimizer_resharding``). RNG states are restored only when the world size is
    unchanged.
    """
    checkpoint_dir = Path(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    state = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        if not meta.has_optimizer:
            raise CheckpointError(f"{checkpoint_dir}: saved without optimizer state; "
                                  "load weights only (checkpoint.init_load_optimizer=false)")
        _check_optimizer_resharding(checkpoint_dir, meta, optimizer)
        _init_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=True, metadata=_sharding_metadata(meta.optimizer_format))
    same_world = meta.layout.get("world_size") == torch.distributed.get_world_size()
    if restore_rng and same_world:
        state["rng"] = _rng_sharded_object()
    try:
        with torch.no_grad():
            loaded = dist_checkpointing.load(state, str(checkpoint_dir))
    except (Exception, TorchCheckpointException) as err:  # corrupt/missing shard files
        raise CheckpointError(f"{checkpoint_dir}: cannot load ({type(err).__name__}: {err})") from err
    chunks = [_unwrap(c) for c in model_chunks]
    model_state = loaded["model"]
    if len(chunks) == 1:
        chunks[0].load_state_dict(model_state, strict=False)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(model_state[f"chunk{i}"], strict=False)
    if optimizer is not None:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        _restore_rng(loaded["rng"])
    return meta


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(inner, DistributedOptimizer)
               for inner in getattr(optimizer, "chained_optimizers", [optimizer]))


def _check_optimizer_resharding(checkpoint_dir: Path, meta: CheckpointMeta, optimizer) -> None:
    """Say, before megatron-core fails deep in a load, when optimizer state cannot follow a
    layout change. The replicated optimizer's state is keyed like the model's (reshards to any
    TP/PP/VPP/DP); so is the distributed optimizer's ``fully_reshardable`` format. Its
    ``dp_reshardable`` format follows the gradient buckets, so only DP may change."""
    saved_distributed = bool(meta.config.get("parallel", {}).get("distributed_optimizer", False))
    now_distributed = _is_distributed_optimizer(optimizer)
    weights_only = ("or start a new stage from its weights: checkpoint.init_from=<it> "
                    "checkpoint.init_load_optimizer=false")
    if saved_distributed != now_distributed:
        raise CheckpointError(
            f"{checkpoint_dir}: optimizer state was saved with parallel.distributed_optimizer="
            f"{str(saved_distributed).lower()}; the two optimizers store different state layouts. "
            f"Resume with parallel.distributed_optimizer={str(saved_distributed).lower()}, "
            f"{weights_only}")
    if not saved_distributed or meta.optimizer_format == "fully_reshardable":
        return
    from megatron.core import parallel_state

    saved = {key: meta.layout.get(key) for key in ("tensor", "pipeline", "virtual_pipeline")}
    now = {"tensor": parallel_state.get_tensor_model_parallel_world_size(),
           "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
           "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size()}
    if saved != now:
        raise CheckpointError(
            f"{checkpoint_dir}: distributed-optimizer state saved at tensor/pipeline/virtual "
            f"{saved['tensor']}/{saved['pipeline']}/{saved['virtual_pipeline']} cannot be loaded at "
            f"{now['tensor']}/{now['pipeline']}/{now['virtual_pipeline']}: it was saved as "
            f"{meta.optimizer_format}, which follows the gradient buckets and reshards across "
            f"data parallel only. Resume with the saved tensor/pipeline sizes (DP may change), "
            f"{weights_only} (save with checkpoint.optimizer_format=fully_reshardable to allow this)")


def _torch_optimizers(optimizer):
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is not None:
            yield inner, torch_opt


def _restore_adam_steps(optimizer) -> None:
    """megatron-core's distributed optimizer keeps Adam's step count in its param groups. Without
    apex/TE (CPU) torch's Adam wants a per-parameter 'step' tensor; megatron-core 0.16.1 gives
    every parameter the same tensor (torch increments it in place once per parameter, so bias
    correction would run ahead) and its dp_reshardable load overwrote it with the pre-load 0
    (see platform.cpu). Give each parameter its own tensor holding the saved step."""
    for _, torch_opt in _torch_optimizers(optimizer):
        for group in torch_opt.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = torch_opt.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _init_optimizer_state(optimizer) -> None:
    """torch's Adam creates its state lazily; megatron-core's loader needs every tensor (and, for
    the distributed optimizer without apex/TE, the 'step' counter) to exist before loading."""
    for inner, torch_opt in _torch_optimizers(optimizer):
        init = getattr(inner, "init_state_fn", None)
        if init is None:
            continue
        init(torch_opt, getattr(inner, "config", None))
        if isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            for group in torch_opt.param_groups:
                for param in group["params"]:
                    torch_opt.state[param].setdefault("step", torch.tensor(0.0))
