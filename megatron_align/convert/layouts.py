"""Parameter maps between megatron-core checkpoints and Hugging Face GPT-NeoX / Llama.

Megatron names used here are the *checkpoint* (sharded state dict) names, which are the
TransformerEngine names for both layer specs: the local spec maps ``input_layernorm`` to
``self_attention.linear_qkv.layer_norm_*`` and ``pre_mlp_layernorm`` to
``mlp.linear_fc1.layer_norm_*`` when it builds its sharded state dict. ``LOCAL_SPEC_NAMES`` gives
the module names of the local spec, for filling a model's own state dict on import.

The layouts that other converters got wrong, stated once:

* megatron ``linear_qkv`` rows are grouped by query group: for each of the ``g`` groups,
  ``[q_0 .. q_{h/g-1}, k, v]`` (``d`` rows each). TP splits whole groups, so the global
  (checkpoint) tensor is the same at any TP.
* HF GPT-NeoX ``query_key_value`` rows are per head: ``[q, k, v]`` for each head. (For multi-head
  attention this equals megatron's layout with g = h; we still convert explicitly.)
* HF Llama has separate ``q_proj`` / ``k_proj`` / ``v_proj``; query head j uses kv head j // (h/g).
* SwiGLU ``linear_fc1`` rows are ``[gate; up]`` in the global tensor.
* megatron's vocabulary is padded (to make_vocab_size_divisible_by x TP); HF gets the real rows.
* Tied embeddings: the checkpoint has no ``output_layer.weight``; HF sets tie_word_embeddings.

All functions work on ``meta`` tensors too, which is how the exporter learns every output shape
before reading any data.
"""
from __future__ import annotations

from typing import Callable

import torch

from megatron_align.model.presets import Architecture

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM_WEIGHT = "decoder.final_layernorm.weight"
FINAL_NORM_BIAS = "decoder.final_layernorm.bias"
OUTPUT = "output_layer.weight"
LAYER_PREFIX = "decoder.layers."

LN1_W, LN1_B = "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias"
QKV_W, QKV_B = "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"
PROJ_W, PROJ_B = "self_attention.linear_proj.weight", "self_attention.linear_proj.bias"
LN2_W, LN2_B = "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias"
FC1_W, FC1_B = "mlp.linear_fc1.weight", "mlp.linear_fc1.bias"
FC2_W, FC2_B = "mlp.linear_fc2.weight", "mlp.linear_fc2.bias"

# checkpoint (TE) name -> local-spec module name, inside one layer
LOCAL_SPEC_NAMES = {
    LN1_W: "input_layernorm.weight", LN1_B: "input_layernorm.bias",
    LN2_W: "pre_mlp_layernorm.weight", LN2_B: "pre_mlp_layernorm.bias",
}

HF_ARCHITECTURES = {"gpt-neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}
HF_MODEL_TYPES = {"gpt_neox": "gpt-neox", "llama": "llama"}


def layer_keys(arch: Architecture) -> list[str]:
    """The checkpoint keys of one transformer layer for this architecture."""
    keys = [LN1_W, QKV_W, PROJ_W, LN2_W, FC1_W, FC2_W]
    if arch.normalization == "LayerNorm":
        keys += [LN1_B, LN2_B]
    if arch.add_bias_linear:
        keys += [QKV_B, PROJ_B, FC1_B, FC2_B]
    return keys


def global_keys(arch: Architecture) -> list[str]:
    keys = [EMBEDDING, FINAL_NORM_WEIGHT]
    if arch.normalization == "LayerNorm":
        keys.append(FINAL_NORM_BIAS)
    if not arch.tie_embeddings:
        keys.append(OUTPUT)
    return keys


# ------------------------------------------------------------------------------------- QKV
def _qkv_dims(arch: Architecture) -> tuple[int, int, int]:
    heads, groups = arch.num_attention_heads, arch.kv_groups
    return groups, heads // groups, arch.hidden_size // heads


def split_qkv(fused: torch.Tensor, arch: Architecture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron per-group fused QKV (weight [rows, H] or bias [rows]) -> q [h*d,...], k, v [g*d,...]."""
    groups, per_group, head_dim = _qkv_dims(arch)
    grouped = fused.reshape(groups, per_group + 2, head_dim, *fused.shape[1:])
    q = grouped[:, :per_group].reshape(groups * per_group * head_dim, *fused.shape[1:])
    k = grouped[:, per_group].reshape(groups * head_dim, *fused.shape[1:])
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *fused.shape[1:])
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """Inverse of split_qkv."""
    groups, per_group, head_dim = _qkv_dims(arch)
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(groups, per_group, head_dim, *rest),
                         k.reshape(groups, 1, head_dim, *rest),
                         v.reshape(groups, 1, head_dim, *rest)], dim=1)
    return grouped.reshape(groups * (per_group + 2) * head_dim, *rest)


def megatron_qkv_to_neox(fused: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """megatron per-group [q.., k, v] -> HF GPT-NeoX per-head [q, k, v] (multi-head attention only)."""
    heads, head_dim = arch.num_attention_heads, arch.hidden_size // arch.num_attention_heads
    q, k, v = split_qkv(fused, arch)
    rest = fused.shape[1:]
    per_head = torch.stack([t.reshape(heads, head_dim, *rest) for t in (q, k, v)], dim=1)
    return per_head.reshape(3 * heads * head_dim, *rest)


def neox_qkv_to_megatron(fused: torch.Tensor, arch: Architecture) -> torch.Tensor:
    heads, head_dim = arch.num_attention_heads, arch.hidden_size // arch.num_attention_heads
    rest = fused.shape[1:]
    per_head = fused.reshape(heads, 3, head_dim, *rest)
    q, k, v = (per_head[:, i].reshape(heads * head_dim, *rest) for i in range(3))
    return fuse_qkv(q, k, v, arch)


# ---------------------------------------------------------------------------- layer maps
def _neox_layer_to_hf(arch: Architecture, m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "input_layernorm.weight": m[LN1_W],
        "input_layernorm.bias": m[LN1_B],
        "post_attention_layernorm.weight": m[LN2_W],
        "post_attention_layernorm.bias": m[LN2_B],
        "attention.query_key_value.weight": megatron_qkv_to_neox(m[QKV_W], arch),
        "attention.query_key_value.bias": megatron_qkv_to_neox(m[QKV_B], arch),
        "attention.dense.weight": m[PROJ_W],
        "attention.dense.bias": m[PROJ_B],
        "mlp.dense_h_to_4h.weight": m[FC1_W],
        "mlp.dense_h_to_4h.bias": m[FC1_B],
        "mlp.dense_4h_to_h.weight": m[FC2_W],
        "mlp.dense_4h_to_h.bias": m[FC2_B],
    }


def _neox_layer_from_hf(arch: Architecture, h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        LN1_W: h["input_layernorm.weight"], LN1_B: h["input_layernorm.bias"],
        LN2_W: h["post_attention_layernorm.weight"], LN2_B: h["post_attention_layernorm.bias"],
        QKV_W: neox_qkv_to_megatron(h["attention.query_key_value.weight"], arch),
        QKV_B: neox_qkv_to_megatron(h["attention.query_key_value.bias"], arch),
        PROJ_W: h["attention.dense.weight"], PROJ_B: h["attention.dense.bias"],
        FC1_W: h["mlp.dense_h_to_4h.weight"], FC1_B: h["mlp.dense_h_to_4h.bias"],
        FC2_W: h["mlp.dense_4h_to_h.weight"], FC2_B: h["mlp.dense_4h_to_h.bias"],
    }


def _llama_layer_to_hf(arch: Architecture, m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q, k, v = split_qkv(m[QKV_W], arch)
    gate, up = m[FC1_W].chunk(2, dim=0)
    return {
        "input_layernorm.weight": m[LN1_W],
        "self_attn.q_proj.weight": q,
        "self_attn.k_proj.weight": k,
        "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": m[PROJ_W],
        "post_attention_layernorm.weight": m[LN2_W],
        "mlp.gate_proj.weight": gate,
        "mlp.up_proj.weight": up,
        "mlp.down_proj.weight": m[FC2_W],
    }


def _llama_layer_from_hf(arch: Architecture, h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        LN1_W: h["input_layernorm.weight"],
        QKV_W: fuse_qkv(h["self_attn.q_proj.weight"], h["self_attn.k_proj.weight"],
                        h["self_attn.v_proj.weight"], arch),
        PROJ_W: h["self_attn.o_proj.weight"],
        LN2_W: h["post_attention_layernorm.weight"],
        FC1_W: torch.cat([h["mlp.gate_proj.weight"], h["mlp.up_proj.weight"]], dim=0),
        FC2_W: h["mlp.down_proj.weight"],
    }


class FamilyLayout:
    """HF names and the megatron <-> HF maps of one model family."""

    def __init__(self, family: str, layer_prefix: str, embedding: str, final_norm: str,
                 lm_head: str, to_hf: Callable, from_hf: Callable):
        self.family = family
        self.hf_layer_prefix = layer_prefix
        self.hf_embedding = embedding
        self.hf_final_norm = final_norm
        self.hf_lm_head = lm_head
        self._to_hf = to_hf
        self._from_hf = from_hf

    def hf_layer_names(self, arch: Architecture) -> list[str]:
        return list(self.layer_to_hf(arch, _meta_layer(arch)))

    def layer_to_hf(self, arch: Architecture, layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._to_hf(arch, layer)

    def layer_from_hf(self, arch: Architecture, layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._from_hf(arch, layer)

    def global_map(self, arch: Architecture) -> list[tuple[str, str, bool]]:
        """(HF name, checkpoint key, has vocabulary rows) for the tensors outside the layers, in
        file order: embedding, final norm, untied lm head."""
        items = [(self.hf_embedding, EMBEDDING, True),
                 (f"{self.hf_final_norm}.weight", FINAL_NORM_WEIGHT, False)]
        if arch.normalization == "LayerNorm":
            items.append((f"{self.hf_final_norm}.bias", FINAL_NORM_BIAS, False))
        if not arch.tie_embeddings:
            items.append((self.hf_lm_head, OUTPUT, True))
        return items


def _meta_layer(arch: Architecture) -> dict[str, torch.Tensor]:
    """Meta tensors with the global shapes of one layer's checkpoint tensors."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    groups, per_group, head_dim = _qkv_dims(arch)
    qkv_rows = groups * (per_group + 2) * head_dim
    fc1_rows = 2 * f if arch.activation == "swiglu" else f
    shapes = {LN1_W: (h,), LN1_B: (h,), LN2_W: (h,), LN2_B: (h,),
              QKV_W: (qkv_rows, h), QKV_B: (qkv_rows,), PROJ_W: (h, h), PROJ_B: (h,),
              FC1_W: (fc1_rows, h), FC1_B: (fc1_rows,), FC2_W: (h, f), FC2_B: (h,)}
    return {k: torch.empty(shapes[k], device="meta") for k in layer_keys(arch)}


def expected_layer_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_layer(arch).items()}


LAYOUTS = {
    "gpt-neox": FamilyLayout("gpt-neox", "gpt_neox.layers.", "gpt_neox.embed_in.weight",
                             "gpt_neox.final_layer_norm", "embed_out.weight",
                             _neox_layer_to_hf, _neox_layer_from_hf),
    "llama": FamilyLayout("llama", "model.layers.", "model.embed_tokens.weight", "model.norm",
                          "lm_head.weight", _llama_layer_to_hf, _llama_layer_from_hf),
}


def layout_for(arch: Architecture) -> FamilyLayout:
    return LAYOUTS[arch.family]


def hf_config(arch: Architecture, vocab_size: int, bos_id: int, eos_id: int, max_positions: int,
              dtype: torch.dtype):
    """The transformers config object (GPTNeoXConfig / LlamaConfig) of an architecture."""
    from transformers import GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=vocab_size, hidden_size=arch.hidden_size,
                  num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
                  intermediate_size=arch.ffn_hidden_size, max_position_embeddings=max_positions,
                  tie_word_embeddings=arch.tie_embeddings, bos_token_id=bos_id, eos_token_id=eos_id,
                  architectures=[HF_ARCHITECTURES[arch.family]], dtype=dtype)
    if arch.family == "gpt-neox":
        return GPTNeoXConfig(
            **common,
            hidden_act="gelu",  # exact erf GeLU, as megatron's F.gelu
            use_parallel_residual=arch.parallel_residual,
            rotary_pct=arch.rotary_percent,
            rotary_emb_base=arch.rotary_base,
            layer_norm_eps=arch.layernorm_epsilon,
            attention_bias=True,
        )
    return LlamaConfig(
        **common,
        hidden_act="silu",
        num_key_value_heads=arch.kv_groups,
        head_dim=arch.hidden_size // arch.num_attention_heads,
        rope_theta=arch.rotary_base,
        rms_norm_eps=arch.layernorm_epsilon,
        attention_bias=False,
        mlp_bias=False,
    )
