"""One torchrun world: megatron-core's DotProductAttention vs SDPA inside the same GPTModel, same
weights, same tokens, at TP=1 and TP=2 for both presets; writes the largest differences as JSON.

    torchrun --nproc_per_node 2 tests/attention_numerics_worker.py OUT.json
"""
import json
import sys

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_align import platform
from megatron_align.config import load_run_config
from megatron.core.transformer.enums import AttnMaskType

from megatron_align.model.attention import SDPAttention
from megatron_align.model.build import build_model_chunks, transformer_config

PRESETS = {"gpt-neox": ["model.preset=gpt-neox"],
           "llama": ["model.preset=llama", "model.num_attention_heads=4", "model.num_query_groups=2"]}
VOCAB, BATCH, SEQ = 256, 2, 96


def build(overrides, backend):
    config = load_run_config(None, [*overrides, f"model.attention_backend={backend}", "model.transformer_impl=local",
                                    "train.precision=fp32", f"train.seq_length={SEQ}"])
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    torch.manual_seed(7)
    return build_model_chunks(config, transformer_config(config), VOCAB)[0]


def run(model, tokens):
    model.zero_grad(set_to_none=True)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    logits = model(tokens, positions, None)
    labels = torch.roll(tokens, -1, dims=1)
    loss = model(tokens, positions, None, labels=labels).sum() / labels.numel()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return logits.detach(), loss.item(), grads


def dropout_check():
    """SDPA's attention dropout: active in training only, drawn from megatron's model-parallel RNG."""
    config = load_run_config(None, ["model.dropout=0.5", "model.transformer_impl=local", "train.precision=fp32"])
    tf_config = transformer_config(config)
    attention = SDPAttention(tf_config, 1, AttnMaskType.causal, "self")
    q, k, v = torch.randn(3, SEQ, BATCH, tf_config.num_attention_heads, tf_config.kv_channels,
                          generator=torch.Generator().manual_seed(5)).unbind(0)
    outputs = []
    for _ in range(2):
        tensor_parallel.model_parallel_cuda_manual_seed(11)
        outputs.append(attention(q, k, v, None))
    attention.eval()
    plain = attention(q, k, v, None)
    return {"train_repeat": (outputs[0] - outputs[1]).abs().max().item(),
            "train_vs_eval": (outputs[0] - plain).abs().max().item()}


def main():
    out = sys.argv[1]
    platform.activate_cpu_runtime()
    torch.distributed.init_process_group(backend="gloo")
    results = {}
    for tp in (1, 2):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        for preset, overrides in PRESETS.items():
            tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
            reference = build([*overrides, f"parallel.tensor={tp}"], "megatron")
            candidate = build([*overrides, f"parallel.tensor={tp}"], "sdpa")
            candidate.load_state_dict(reference.state_dict())
            ref_logits, ref_loss, ref_grads = run(reference, tokens)
            logits, loss, grads = run(candidate, tokens)
            assert ref_grads.keys() == grads.keys()
            results[f"{preset}-tp{tp}"] = {
                "core_attention": type(candidate.decoder.layers[0].self_attention.core_attention).__name__,
                "reference_attention": type(reference.decoder.layers[0].self_attention.core_attention).__name__,
                "logits": (logits - ref_logits).abs().max().item(),
                "loss": abs(loss - ref_loss),
                "grads": max((grads[k] - ref_grads[k]).abs().max().item() for k in grads),
                "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
                "num_grads": len(grads),
            }
        if tp == 1:
            results["dropout"] = dropout_check()
        parallel_state.destroy_model_parallel()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
