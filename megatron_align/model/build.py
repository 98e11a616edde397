"""Preset + run config -> megatron-core TransformerConfig, layer spec and GPTModel chunks."""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_align.config import ConfigError, ParallelConfig, RunConfig
from megatron_align.platform import transformer_engine_available

from .attention import SDPAttention
from .parallel_residual import ParallelResidualTransformerLayer
from .presets import Architecture, padded_vocab_size, resolve_architecture


def use_transformer_engine(config: RunConfig) -> bool:
    """TE layers for ``transformer_engine`` (availability is checked with the layout), and for
    ``auto`` when TE is importable with CUDA."""
    impl = config.model.transformer_impl
    return impl == "transformer_engine" or (impl == "auto" and transformer_engine_available())


def params_dtype(config: RunConfig) -> torch.dtype:
    precision = config.train.precision
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision: {precision!r} is not one of auto|fp32|bf16")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def attention_backend(config: RunConfig) -> str:
    """The core attention a run uses: ``te``, ``sdpa`` or ``megatron``. ``auto``: TE's attention
    with TransformerEngine layers, else SDPA. (``te`` without TE layers is rejected by the layout
    check before any process starts.)"""
    backend = config.model.attention_backend
    if backend == "auto":
        return "te" if use_transformer_engine(config) else "sdpa"
    return backend


def layer_spec(arch: Architecture, use_te: bool, attention: str = "sdpa") -> ModuleSpec:
    """megatron-core's local or TE layer spec, with the parallel-residual layer for gpt-neox and
    the core attention swapped for ``attention`` (``te`` keeps the TE spec's own)."""
    if attention == "te" and not use_te:
        raise ConfigError("model.attention_backend: te needs TransformerEngine layers "
                          "(model.transformer_impl auto or transformer_engine, with TE on a GPU)")
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=arch.normalization)
    if attention in ("sdpa", "megatron"):
        spec = _with_core_attention(spec, SDPAttention if attention == "sdpa" else DotProductAttention)
    if arch.parallel_residual:
        spec = dataclasses.replace(spec, module=ParallelResidualTransformerLayer)
    return spec


def _with_core_attention(spec: ModuleSpec, core_attention: type) -> ModuleSpec:
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=core_attention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def transformer_config(config: RunConfig, arch: Architecture | None = None) -> TransformerConfig:
    arch = arch or resolve_architecture(config.model)
    dtype = params_dtype(config)
    on_gpu = torch.cuda.is_available()
    recompute = config.train.recompute
    if recompute not in ("none", "full", "selective"):
        raise ConfigError(f"train.recompute: {recompute!r} is not one of none|full|selective")
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.hidden_size // arch.num_attention_heads,
        normalization=arch.normalization,
        layernorm_epsilon=arch.layernorm_epsilon,
        add_bias_linear=arch.add_bias_linear,
        gated_linear_unit=arch.activation == "swiglu",
        activation_func=F.silu if arch.activation == "swiglu" else F.gelu,
        hidden_dropout=config.model.dropout,
        attention_dropout=config.model.dropout,
        init_method_std=config.model.init_method_std,
        tensor_model_parallel_size=config.parallel.tensor,
        pipeline_model_parallel_size=config.parallel.pipeline,
        virtual_pipeline_model_parallel_size=config.parallel.virtual_pipeline,
        sequence_parallel=config.parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Identical initialisation at any TP size; on CPU, also avoids CUDA-only init paths.
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Fused kernels exist only with CUDA (and megatron's fused GeLU is the tanh form, not
        # the exact GeLU GPT-NeoX uses).
        bias_activation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        calculate_per_token_loss=True,
    )
    if recompute != "none":
        kwargs["recompute_granularity"] = recompute
        if recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kwargs)


def build_model_chunks(config: RunConfig, tf_config: TransformerConfig, vocab_size: int) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (just one without VPP)."""
    arch = resolve_architecture(config.model)
    spec = layer_spec(arch, use_transformer_engine(config), attention_backend(config))
    padded = padded_vocab_size(vocab_size, config.model.make_vocab_size_divisible_by,
                               config.parallel.tensor)
    vpp = config.parallel.virtual_pipeline
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=tf_config,
            transformer_layer_spec=spec,
            vocab_size=padded,
            max_sequence_length=max(config.train.seq_length, arch.max_position_embeddings),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=arch.tie_embeddings,
            position_embedding_type="rope",
            rotary_percent=arch.rotary_percent,
            rotary_base=int(arch.rotary_base),
            vp_stage=stage,
        )
        if model.post_process and padded > vocab_size:
            mask_padded_vocabulary(model.output_layer, vocab_size, padded)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def mask_padded_vocabulary(output_layer: torch.nn.Module, vocab_size: int, padded: int) -> None:
    """Set the logits of the padding ids (``vocab_size`` .. ``padded - 1``) to -inf.

    The padding rows are not tokens and export drops them, so the softmax must not see them
    either: then the training loss is the exported model's loss on the same tokens, and the
    padding rows get no gradient. Without this, an imported model's zero padding rows add
    ``exp(0)`` to every softmax (1e-3 nats at a loss of 7, measured on the SFT parity test).
    In place on the logits (the linear layer does not keep its output for backward), so no
    second logits tensor is allocated.
    """
    def hook(_module, _inputs, output):
        logits = output[0]
        width = logits.shape[-1]  # this rank's vocabulary shard, or all of it when gathered
        start = 0 if width == padded else parallel_state.get_tensor_model_parallel_rank() * width
        first_padding = min(max(vocab_size - start, 0), width)
        if first_padding < width:
            logits.narrow(-1, first_padding, width - first_padding).fill_(float("-inf"))

    output_layer.register_forward_hook(hook)


def single_process_config(config: RunConfig, vocab_size: int, padded_rows: int) -> RunConfig:
    """``config`` at TP=PP=1 in fp32 with the local spec, padded to exactly ``padded_rows`` rows
    (so a checkpoint padded for TP=N loads at TP=1)."""
    config = copy.deepcopy(config)
    config.parallel = ParallelConfig()
    config.model.vocab_size = vocab_size
    config.model.make_vocab_size_divisible_by = padded_rows
    config.model.transformer_impl = "local"
    if config.model.attention_backend == "te":
        config.model.attention_backend = "auto"
    config.model.dropout = 0.0
    config.train.precision = "fp32"
    config.train.recompute = "none"
    config.train.micro_batch_size = config.train.global_batch_size = 1
    return config


def build_single_process_model(config: RunConfig) -> GPTModel:
    """The whole model as one chunk in eval mode (needs a world of one: see
    ``megatron_align.parallel.distributed.single_process_world``)."""
    model = build_model_chunks(config, transformer_config(config), config.model.vocab_size)[0]
    model.eval()
    return model
