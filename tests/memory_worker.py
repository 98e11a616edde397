"""One torchrun world: the memory planner against what megatron-core really allocates.

    torchrun --nproc_per_node 2 tests/memory_worker.py OUT.json RUN_ROOT

Per layout case: a real Trainer (data, GPTModel chunks, DDP, optimizer) takes one step, then
every rank sums the bytes of the storages behind its parameters, gradient buffers and optimizer
state, and (for single-stage cases) the bytes saved for backward by one micro-batch's forward
(autograd's saved-tensor hooks, each storage once, parameters excluded). Each rank writes
measured and planned numbers.
"""
import json
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_align.config import load_run_config
from megatron_align.parallel.memory import rank_memory
from megatron_align.training.trainer import Trainer

TINY = ["train.iterations=1", "logging.progress_bar=false", "logging.tensorboard=false",
        "checkpoint.save_at_end=false", "train.global_batch_size=4", "train.micro_batch_size=2",
        "model.vocab_size=500", "model.hidden_size=128", "model.ffn_hidden_size=384",
        "train.seq_length=512"]
CASES = {
    "neox-tp2-fp32": ["model.preset=gpt-neox", "parallel.tensor=2"],
    "llama-tied-pp2-zero1": ["model.preset=llama", "model.tie_embeddings=true", "parallel.pipeline=2",
                             "parallel.distributed_optimizer=true"],
    "neox-dp2-bf16-zero1": ["model.preset=gpt-neox", "train.precision=bf16",
                            "parallel.distributed_optimizer=true"],
    "llama-dp2-bf16": ["model.preset=llama", "train.precision=bf16", "model.num_query_groups=2",
                       "model.num_attention_heads=8"],
    "llama-tied-dp2-overlap": ["model.preset=llama", "model.tie_embeddings=true",
                               "parallel.overlap_grad_reduce=true", "model.attention_backend=megatron"],
    "neox-tp2-megatron-attn": ["model.preset=gpt-neox", "parallel.tensor=2", "model.attention_backend=megatron"],
    "neox-tp2-selective": ["model.preset=gpt-neox", "parallel.tensor=2", "train.recompute=selective"],
    "llama-dp2-full": ["model.preset=llama", "train.recompute=full", "model.num_layers=4"],
}


def storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def torch_optimizers(optimizer):
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield inner.optimizer


def measure_states(trainer) -> dict:
    params = storages(p for chunk in trainer.model for p in chunk.module.parameters())
    grads = storages([buf.grad_data for chunk in trainer.model for buf in chunk.buffers] +
                     [p.grad for chunk in trainer.model for p in chunk.module.parameters()])
    state = {}
    for opt in torch_optimizers(trainer.optimizer):
        for group in opt.param_groups:
            state.update(storages(group["params"]))  # master copies (bf16) or model views (fp32)
        for per_param in opt.state.values():
            state.update(storages(v for k, v in per_param.items() if k != "step" and torch.is_tensor(v)))
    optimizer = {ptr: n for ptr, n in state.items() if ptr not in params and ptr not in grads}
    return {"parameters": sum(params.values()), "gradients": sum(grads.values()),
            "optimizer": sum(optimizer.values())}


def measure_activations(trainer, config) -> int:
    """Bytes of the storages autograd keeps for backward after one micro-batch's forward."""
    model = trainer.model[0].module
    param_storages = storages(model.parameters())
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages and storage.nbytes() > 0:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    mbs, seq = config.train.micro_batch_size, config.train.seq_length
    tokens = torch.randint(0, 500, (mbs, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, torch.arange(seq).expand(mbs, seq), None, labels=tokens).sum()
    loss.backward()
    return sum(saved.values())


def measure_peak(trainer, config, tmp: Path) -> int:
    """Peak bytes the CPU allocator held above the start (parameters and gradient buffers
    already allocated) over one micro-batch's forward and backward, from torch.profiler's memory
    events. Their "Total Allocated" runs on from one profiling session to the next: the level
    before the first event of this session is subtracted."""
    from torch.profiler import ProfilerActivity, profile

    model = trainer.model[0].module  # DDP's hooks still move each gradient into its buffer
    mbs, seq = config.train.micro_batch_size, config.train.seq_length
    tokens = torch.randint(0, 500, (mbs, seq), generator=torch.Generator().manual_seed(0))
    trainer.model[0].zero_grad_buffer()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(tokens, torch.arange(seq).expand(mbs, seq), None, labels=tokens).sum().backward()
    path = tmp / f"trace-{torch.distributed.get_rank()}.json"
    prof.export_chrome_trace(str(path))
    events = sorted((e["ts"], e["args"]) for e in json.loads(path.read_text())["traceEvents"]
                    if e.get("name") == "[memory]")
    start = events[0][1]["Total Allocated"] - events[0][1]["Bytes"]
    return max(args["Total Allocated"] for _, args in events) - start


def main():
    out, root = sys.argv[1], Path(sys.argv[2])
    torch.distributed.init_process_group(backend="gloo")
    rank = torch.distributed.get_rank()
    results = {}
    for name, overrides in CASES.items():
        config = load_run_config(None, [*TINY, *overrides, f"run_dir={root / name}"])
        trainer = Trainer(config)
        trainer.train_step()
        measured = measure_states(trainer)
        if config.parallel.pipeline == 1:
            measured["activations_per_microbatch"] = measure_activations(trainer, config)
            measured["peak"] = measure_peak(trainer, config, root)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        dtype = "bf16" if config.train.precision == "bf16" else "fp32"
        planned = rank_memory(config, trainer.layout, stage, dp_rank, dtype, te_layers=False,
                              on_gpu=False).__dict__
        results[name] = {"measured": measured, "planned": planned}
        trainer.metrics.close()
        parallel_state.destroy_model_parallel()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
