"""A bare megatron-core training loop over the same tiny model, for the overhead comparison.

torchrun --nproc_per_node N benchmarks/bare_megatron_loop.py TP PP STEPS OUT.json

Only what megatron-core needs: process groups, GPTModel, DDP, optimizer, forward_backward_func
on a fixed synthetic batch. No data pipeline, metrics, checkpoint or signal handling. On CPU the
megatron_align CPU runtime is still needed for megatron-core to run at all.
"""
import json
import sys
import time
from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_align import platform
from megatron_align.config import load_run_config
from megatron_align.model.build import build_model_chunks, transformer_config

GBS, MBS, SEQ, VOCAB = 8, 2, 128, 512


def loss_func(mask, output):
    loss = torch.sum(output.float().view(-1) * mask.view(-1))
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}


def forward_step(iterator, model):
    tokens, labels, mask, pos = next(iterator)
    return model(tokens, pos, None, labels=labels), partial(loss_func, mask)


def main():
    tp, pp, steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    platform.activate_cpu_runtime()
    torch.distributed.init_process_group(backend=platform.distributed_backend())
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = load_run_config(None, [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"])
    tf_config = transformer_config(config)
    model = [DistributedDataParallel(tf_config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), m)
             for m in build_model_chunks(config, tf_config, VOCAB)]
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-4, clip_grad=1.0), model)
    tf_config.no_sync_func = model[0].no_sync
    tf_config.finalize_model_grads_func = finalize_model_grads
    tf_config.grad_scale_func = optimizer.scale_loss
    dp = parallel_state.get_data_parallel_world_size()
    micro = GBS // (MBS * dp)
    text = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=torch.Generator().manual_seed(0))
    batch = (text[:, :-1], text[:, 1:], torch.ones(MBS, SEQ), torch.arange(SEQ).expand(MBS, SEQ))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch] * micro),
                                    model=model[0], num_microbatches=micro, seq_length=SEQ,
                                    micro_batch_size=MBS, forward_only=False)
        optimizer.step()
        times.append(time.perf_counter() - start)
    if torch.distributed.get_rank() == 0:
        json.dump({"step_time_s": times}, open(out, "w"))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
