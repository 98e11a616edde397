"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``, as a drop-in for
megatron-core's ``DotProductAttention`` in any layer spec.

megatron-core's local spec materialises the full ``[b, heads, s, s]`` score matrix (and keeps the
probabilities for backward); SDPA dispatches to a fused kernel instead: flash / memory-efficient /
cuDNN on GPU, a fused flash kernel or the math fallback on CPU. Everything around it stays
megatron's: the QKV projection, rotary embeddings (applied to ``query``/``key`` before this module
is called), the output projection and the tensor-parallel head split.

Interface (megatron-core's core attention): ``forward(query, key, value, attention_mask,
attn_mask_type, attention_bias, packed_seq_params)`` with ``query`` ``[sq, b, np, hn]`` and
``key``/``value`` ``[sk, b, ng, hn]`` (this rank's heads and query groups), returning
``[sq, b, np * hn]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Causal (or masked) self-attention with grouped query heads and optional attention dropout.

    The masking follows megatron-core's: with no ``attention_mask`` a causal layer is causal;
    a given mask (``True`` = masked out) is used as is.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPA attention does not support context parallelism; use the te backend")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPA attention does not support sliding-window attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPA attention supports only the vanilla softmax, not {config.softmax_type!r}")
        tp_size = (pg_collection.tp.size() if pg_collection is not None and hasattr(pg_collection, "tp")
                   else parallel_state.get_tensor_model_parallel_world_size())
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        head_dim = config.kv_channels
        # query_key_layer_scaling divides the scores by the layer number and multiplies them back
        # inside the softmax: the net scale is the plain one.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("SDPA attention does not support packed sequences; use the te backend")
        if attention_bias is not None:
            raise ValueError("SDPA attention does not support an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, batch = query.shape[0], query.shape[1]
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
        elif mask_type == AttnMaskType.causal and sq > 1:
            causal = True
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = self.heads_per_partition != self.groups_per_partition
        if dropout_p > 0:
            # the same model-parallel RNG stream megatron's attention dropout uses
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                         is_causal=causal, scale=self.softmax_scale,
                                                         enable_gqa=gqa)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                     scale=self.softmax_scale, enable_gqa=gqa)
        # [b, heads, s, hn] -> [s, b, heads * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, -1)
