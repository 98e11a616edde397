"""Where the run executes: CUDA/NCCL when available, else megatron-core on CPU over gloo."""
import torch

from .cpu import activate as activate_cpu_runtime
from .cpu import cuda_absent, refuse_sequence_parallel


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    """An unused local TCP port for a single-process rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


__all__ = ["activate_cpu_runtime", "cuda_absent", "device", "distributed_backend", "free_port",
           "refuse_sequence_parallel"]
