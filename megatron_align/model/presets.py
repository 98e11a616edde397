"""Architecture presets: the GPT-NeoX (Pythia) and Llama families at the sizes studies use."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_align.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Architecture:
    family: str  # gpt-neox | llama
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_query_groups: Optional[int] = None  # None: multi-head attention
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # gelu | swiglu
    add_bias_linear: bool = True
    parallel_residual: bool = True
    rotary_percent: float = 0.25
    rotary_base: float = 10000.0
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    default_vocab_size: int = 50277

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads


_NEOX = dict(family="gpt-neox", normalization="LayerNorm", activation="gelu", add_bias_linear=True,
             parallel_residual=True, rotary_percent=0.25, rotary_base=10000.0, tie_embeddings=False)
_LLAMA = dict(family="llama", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
              parallel_residual=False, rotary_percent=1.0, rotary_base=500000.0,
              default_vocab_size=128256, max_position_embeddings=8192)

SIZES: dict[str, dict[str, Architecture]] = {
    "gpt-neox": {
        "tiny": Architecture(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                             **_NEOX),
        "160m": Architecture(num_layers=12, hidden_size=768, num_attention_heads=12,
                             ffn_hidden_size=3072, **_NEOX),
        "410m": Architecture(num_layers=24, hidden_size=1024, num_attention_heads=16,
                             ffn_hidden_size=4096, **_NEOX),
        "1.4b": Architecture(num_layers=24, hidden_size=2048, num_attention_heads=16,
                             ffn_hidden_size=8192, **_NEOX),
        "6.9b": Architecture(num_layers=32, hidden_size=4096, num_attention_heads=32,
                             ffn_hidden_size=16384, **_NEOX),
    },
    "llama": {
        "tiny": Architecture(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=176, **{**_LLAMA, "layernorm_epsilon": 1e-5}),
        "1b": Architecture(num_layers=16, hidden_size=2048, num_attention_heads=32,
                           num_query_groups=8, ffn_hidden_size=8192,
                           **{**_LLAMA, "tie_embeddings": True}),
        "8b": Architecture(num_layers=32, hidden_size=4096, num_attention_heads=32,
                           num_query_groups=8, ffn_hidden_size=14336, **_LLAMA),
    },
}


def resolve_architecture(model: ModelConfig) -> Architecture:
    """The preset's architecture with the config's dimension overrides applied and checked."""
    if model.preset not in SIZES:
        raise ConfigError(f"model.preset: unknown preset {model.preset!r} (known: {', '.join(SIZES)})")
    sizes = SIZES[model.preset]
    if model.size not in sizes:
        raise ConfigError(
            f"model.size: unknown size {model.size!r} for {model.preset} (known: {', '.join(sizes)})"
        )
    overrides = {
        name: getattr(model, name)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size")
        if getattr(model, name) is not None
    }
    for name in ("tie_embeddings", "rotary_percent", "rotary_base", "layernorm_epsilon"):
        if getattr(model, name) is not None:
            overrides[name] = getattr(model, name)
    arch = dataclasses.replace(sizes[model.size], **overrides)
    if arch.hidden_size % arch.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={arch.hidden_size} is not divisible by "
            f"model.num_attention_heads={arch.num_attention_heads}"
        )
    if arch.num_attention_heads % arch.kv_groups:
        raise ConfigError(
            f"model.num_attention_heads={arch.num_attention_heads} is not divisible by "
            f"model.num_query_groups={arch.kv_groups}"
        )
    return arch


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Round up to ``divisible_by``; only when TP does not divide that, to ``divisible_by * TP``.

    Unlike Megatron-LM's ``divisible_by * TP`` rule this keeps the padded size (and therefore the
    checkpoint's embedding shape) the same at TP = 1, 2, 4, 8, so checkpoints reshard freely.
    """
    multiple = divisible_by if divisible_by % tensor_parallel == 0 else divisible_by * tensor_parallel
    return ((vocab_size + multiple - 1) // multiple) * multiple
