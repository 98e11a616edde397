"""Typed run configuration: every key a run accepts, with its default."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

# Enumerations: the loader accepts exactly these values and names them in its error.
TransformerImpl = Literal["auto", "local", "transformer_engine"]
AttentionBackend = Literal["auto", "sdpa", "megatron", "te"]
Precision = Literal["auto", "fp32", "bf16"]
Recompute = Literal["none", "full", "selective"]
DecayStyle = Literal["cosine", "linear", "constant", "WSD", "inverse-square-root"]
DataSource = Literal["synthetic", "indexed", "mixture", "sft"]
OptimizerFormat = Literal["dp_reshardable", "fully_reshardable"]  # megatron-core's sharding types


@dataclass
class ModelConfig:
    preset: str = "gpt-neox"  # see megatron_align.model.presets.PRESETS
    size: str = "tiny"  # see megatron_align.model.presets.SIZES
    # Optional overrides of the preset's dimensions.
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    tie_embeddings: Optional[bool] = None
    rotary_percent: Optional[float] = None
    rotary_base: Optional[float] = None
    layernorm_epsilon: Optional[float] = None
    vocab_size: Optional[int] = None  # unpadded; defaults to the tokenizer's (or 50277)
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    dropout: float = 0.0
    transformer_impl: TransformerImpl = "auto"  # auto: TransformerEngine when importable
    # core attention: te with TransformerEngine layers, else torch SDPA (auto); megatron: the
    # local spec's DotProductAttention (materialises the s x s scores)
    attention_backend: AttentionBackend = "auto"


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None  # model chunks per pipeline rank
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False


@dataclass
class TrainConfig:
    iterations: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 2
    seq_length: int = 128
    seed: int = 1234
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    recompute: Recompute = "none"
    log_interval: int = 1
    eval_interval: int = 0  # 0: no validation
    eval_iters: int = 2
    exit_duration_minutes: Optional[float] = None
    max_skipped_steps: int = 10  # NaN/Inf steps skipped before the run stops


@dataclass
class OptimConfig:
    lr: float = 3.0e-4
    min_lr: float = 1.2e-5
    warmup_fraction: float = 0.01
    warmup_iters: Optional[int] = None  # overrides warmup_fraction
    decay_style: DecayStyle = "cosine"  # WSD: constant, then cosine over the last 10% of steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0


@dataclass
class DataConfig:
    source: DataSource = "synthetic"
    prefix: Optional[str] = None  # indexed: one megatron .bin/.idx prefix; sft: a `preprocess --chat` prefix
    mixture: Optional[str] = None  # mixture: a mixture YAML
    stage: str = "pretrain"  # mixture stage
    tokenizer: Optional[str] = None  # tokenizer.json or sentencepiece .model (recorded for export)
    cache_dir: Optional[str] = None  # dataset index cache; default RUN_DIR/data_cache
    valid_samples_per_category: int = 0
    # sft: passes over the conversations; sets train.iterations (one padded conversation per sample)
    epochs: Optional[float] = None


@dataclass
class CheckpointConfig:
    save_interval: int = 0  # steps; 0: only at the end
    save_interval_minutes: Optional[float] = None
    keep_last: int = 2
    keep_every: int = 0  # also keep every K-th step forever; 0: off
    save_at_end: bool = True
    init_from: Optional[str] = None  # checkpoint dir to start a new run/stage from
    init_load_optimizer: bool = False
    init_reset_iteration: bool = True
    export_hf_every_save: bool = False
    async_save: bool = False  # write shards in a forked process while training goes on
    # distributed-optimizer state: dp_reshardable (fast; resume may change DP only) or
    # fully_reshardable (gathered per DP group at save; resume may change TP/PP/VPP/DP)
    optimizer_format: OptimizerFormat = "dp_reshardable"


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_name: Optional[str] = None
    progress_bar: bool = True


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
