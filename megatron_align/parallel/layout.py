"""The parallel layout of a run and the checks it must pass before any process group starts."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_align.config import ConfigError, RunConfig, config_error
from megatron_align.model.presets import resolve_architecture
from megatron_align.platform import refuse_sequence_parallel, transformer_engine_available


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tensor: int
    pipeline: int
    virtual_pipeline: int | None
    data: int
    micro_batch_size: int
    global_batch_size: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data)

    def describe(self) -> str:
        vpp = f" VPP={self.virtual_pipeline}" if self.virtual_pipeline else ""
        return (f"world={self.world_size} TP={self.tensor} PP={self.pipeline}{vpp} DP={self.data} "
                f"micro_batch={self.micro_batch_size} global_batch={self.global_batch_size} "
                f"microbatches/step={self.num_microbatches}")


def check_run_config(config: RunConfig, world_size: int) -> ParallelLayout:
    """Reject every invalid combination with a message that shows the numbers and where the key
    was set (``file:line: key: message``). Value types and enumerations were checked at load."""
    par, train = config.parallel, config.train

    def fail(key: str, message: str) -> ConfigError:
        return config_error(config, key, message)

    try:
        arch = resolve_architecture(config.model)
    except ConfigError as err:
        key, sep, message = str(err).partition(": ")
        if sep and " " not in key:  # "model.size: unknown size ...": say where it was set
            raise fail(key, message) from None
        raise
    for key, value in (("parallel.tensor", par.tensor), ("parallel.pipeline", par.pipeline),
                       ("train.micro_batch_size", train.micro_batch_size),
                       ("train.global_batch_size", train.global_batch_size),
                       ("train.seq_length", train.seq_length)):
        if value < 1:
            raise fail(key, f"{value} must be >= 1")
    if train.iterations < 0:
        raise fail("train.iterations", f"{train.iterations} must be >= 0 (0: initialise and save)")
    model_parallel = par.tensor * par.pipeline
    if world_size % model_parallel:
        raise fail("parallel.tensor", f"world size {world_size} is not divisible by TP x PP = "
                                      f"{par.tensor} x {par.pipeline}")
    data_parallel = world_size // model_parallel
    for key, value in (("model.num_attention_heads", arch.num_attention_heads),
                       ("model.num_query_groups", arch.kv_groups),
                       ("model.ffn_hidden_size", arch.ffn_hidden_size)):
        if value % par.tensor:
            raise fail(key, f"{key}={value} is not divisible by parallel.tensor={par.tensor}")
    if par.virtual_pipeline is not None:
        if par.virtual_pipeline < 2:
            raise fail("parallel.virtual_pipeline", f"{par.virtual_pipeline}: use null or >= 2")
        if par.pipeline < 3:
            # With two stages the previous and next rank are the same peer, and the interleaved
            # schedule's simultaneous sends/receives to it can pair up wrongly (seen on gloo).
            raise fail("parallel.virtual_pipeline",
                       f"parallel.virtual_pipeline needs parallel.pipeline >= 3 (got {par.pipeline})")
    stages = par.pipeline * (par.virtual_pipeline or 1)
    if arch.num_layers % stages:
        raise fail("model.num_layers", f"model.num_layers={arch.num_layers} is not divisible by "
                                       f"PP x VPP = {par.pipeline} x {par.virtual_pipeline or 1}")
    per_step = train.micro_batch_size * data_parallel
    if train.global_batch_size % per_step:
        raise fail("train.global_batch_size",
                   f"train.global_batch_size={train.global_batch_size} is not divisible by "
                   f"micro_batch_size x DP = {train.micro_batch_size} x {data_parallel} = {per_step}")
    microbatches = train.global_batch_size // per_step
    if par.virtual_pipeline is not None and microbatches % par.pipeline:
        raise fail("parallel.virtual_pipeline", f"interleaved pipeline needs microbatches/step "
                                                f"({microbatches}) divisible by parallel.pipeline={par.pipeline}")
    if par.sequence_parallel and par.tensor == 1:
        raise fail("parallel.sequence_parallel", "needs parallel.tensor > 1")
    if par.sequence_parallel:
        try:
            refuse_sequence_parallel(True)
        except ValueError as err:
            raise fail("parallel.sequence_parallel", str(err)) from None
    if config.model.transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise fail("model.transformer_impl", "transformer_engine, but TransformerEngine (with CUDA) "
                                             "is not available here; use auto or local")
    if config.model.attention_backend == "te" and (config.model.transformer_impl == "local"
                                                   or not transformer_engine_available()):
        raise fail("model.attention_backend", "te needs TransformerEngine layers (model.transformer_impl "
                                              "auto or transformer_engine, with TE on a GPU); use "
                                              "auto, sdpa or megatron")
    if config.optim.min_lr > config.optim.lr:
        raise fail("optim.min_lr", f"optim.min_lr={config.optim.min_lr} exceeds optim.lr={config.optim.lr}")
    if not 0 <= config.optim.warmup_fraction <= 1:
        raise fail("optim.warmup_fraction", f"{config.optim.warmup_fraction} must be in [0, 1]")
    if config.checkpoint.export_hf_every_save and not config.data.tokenizer:
        raise fail("checkpoint.export_hf_every_save", "needs data.tokenizer (the export ships it)")
    warmup = config.optim.warmup_iters
    if warmup is not None and train.iterations > 0 and not 0 <= warmup < train.iterations:
        raise fail("optim.warmup_iters", f"optim.warmup_iters={warmup} must be in [0, train.iterations="
                                         f"{train.iterations})")
    return ParallelLayout(world_size, par.tensor, par.pipeline, par.virtual_pipeline, data_parallel,
                          train.micro_batch_size, train.global_batch_size)
