"""The CPU runtime redirects megatron-core's CUDA-only call sites, and only those."""
import torch

from megatron_align import platform
from megatron_align.platform import cpu


def test_cuda_sites_are_redirected_in_place():
    import megatron.core.pipeline_parallel.schedules as schedules
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as mcore_random

    assert platform.activate_cpu_runtime() is True
    assert platform.activate_cpu_runtime() is True  # idempotent
    names = set(cpu.patched_functions)
    for expected in ("megatron.core.pipeline_parallel.schedules.forward_backward_no_pipelining",
                     "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
                     "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add",
                     "megatron.core.tensor_parallel.random._get_cuda_rng_state",
                     "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
                     "_set_main_param_and_optimizer_states"):
        assert expected in names
    # the code object was swapped, so aliases imported elsewhere see the CPU version too
    assert "cuda" not in schedules.forward_backward_no_pipelining.__code__.co_consts
    grads = [torch.ones(4)]
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = grads[0]
    clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(param.grad, torch.full((4,), 0.25), atol=1e-5)
    state = mcore_random._get_cuda_rng_state()
    torch.rand(3)
    mcore_random._set_cuda_rng_state(state)
    assert torch.equal(torch.get_rng_state(), state)


def test_rewrite_keeps_zero_argument_super():
    """Methods using super() keep their __class__ cell after recompilation."""
    from megatron.core.distributed.distributed_data_parallel import DistributedDataParallel

    platform.activate_cpu_runtime()
    code = DistributedDataParallel.__init__.__code__
    assert code.co_filename.endswith("distributed_data_parallel.py")


def test_sequence_parallel_refused_on_cpu():
    import pytest

    with pytest.raises(ValueError, match="sequence_parallel=true needs TransformerEngine"):
        platform.refuse_sequence_parallel(True)
    platform.refuse_sequence_parallel(False)
