"""GPT-NeoX / GPT-J parallel residual: ``x + attn(ln1(x)) + mlp(ln2(x))`` as a TransformerLayer.

megatron-core's layer is sequential (``h = x + attn(ln1 x); h + mlp(ln2 h)``). This subclass keeps
every submodule of the spec (norms, attention, MLP, bias-dropout-add) and only changes how they
are wired, so local and TransformerEngine specs both work: with TE, the norms are fused into
``linear_qkv`` / ``linear_fc1`` and the spec's standalone norms are identities.
"""
from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

_ATTENTION_KWARGS = ("rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias",
                     "packed_seq_params", "sequence_len_offset")


class ParallelResidualTransformerLayer(TransformerLayer):
    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, inference_context=None, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        attention_kwargs = {k: kwargs[k] for k in _ATTENTION_KWARGS if kwargs.get(k) is not None}
        residual = hidden_states

        attention_output_with_bias = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            **attention_kwargs,
        )
        mlp_output_with_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))

        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention_output_with_bias, residual, self.hidden_dropout
            )
            hidden_states = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                mlp_output_with_bias, hidden_states, self.hidden_dropout
            )
        output = make_viewless_tensor(
            inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True
        )
        return output, context
