"""The trainer's step and a bare megatron-core step, interleaved on the same model in one process.

torchrun --nproc_per_node N benchmarks/interleaved_train_step.py TP PP STEPS OUT.json

Separate launches of the same command spread by 10-20% on a shared VM (memory placement, CPU
placement, neighbours), more than the overhead being measured. Here one `Trainer` is built as
`megatron-align train` builds it, and each round times `Trainer.train_step()` (batch assembly,
forward/backward, the agreement all-reduce, optimizer and scheduler step, bookkeeping) and then
the bare step of `bare_megatron_loop.py` (zero the grads, `forward_backward_func` over one fixed
batch, optimizer step) on the same model chunks and optimizer. Both sides see the same process,
memory and load, so their ratio is what the trainer adds. The two alternate which goes first.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_megatron_loop import GBS, MBS, SEQ, forward_step  # noqa: E402

from megatron_align.config import load_run_config  # noqa: E402
from megatron_align.parallel.distributed import shutdown_distributed  # noqa: E402
from megatron_align.training.trainer import Trainer  # noqa: E402


def bare_step(trainer: Trainer, batch: tuple, micro: int) -> None:
    model = trainer.model[0]
    model.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch] * micro),
                                model=model, num_microbatches=micro, seq_length=SEQ,
                                micro_batch_size=MBS, forward_only=False)
    trainer.optimizer.step()


def main():
    tp, pp, steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_run_config(None, [
            f"run_dir={run_dir}", f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
            f"train.iterations={2 * steps}", f"train.global_batch_size={GBS}", f"train.micro_batch_size={MBS}",
            f"train.seq_length={SEQ}", "logging.progress_bar=false", "logging.tensorboard=false",
            "checkpoint.save_at_end=false"])
        trainer = Trainer(config)
        vocab = trainer.data.vocab_size
        micro = trainer.layout.num_microbatches
        text = torch.randint(0, vocab, (MBS, SEQ + 1), generator=torch.Generator().manual_seed(0))
        batch = (text[:, :-1], text[:, 1:], torch.ones(MBS, SEQ), torch.arange(SEQ).expand(MBS, SEQ))
        sides = {"ours": (trainer.train_step, []), "bare": (lambda: bare_step(trainer, batch, micro), [])}
        for round_index in range(steps):
            order = ("ours", "bare") if round_index % 2 == 0 else ("bare", "ours")  # no side always first
            for side in order:
                step, times = sides[side]
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
        ours, bare = sides["ours"][1], sides["bare"][1]
        if torch.distributed.get_rank() == 0:
            Path(out).write_text(json.dumps({"ours_s": ours, "bare_s": bare,
                                             "pipeline_rank": parallel_state.get_pipeline_model_parallel_rank()}))
        trainer.metrics.close()
    shutdown_distributed()


if __name__ == "__main__":
    main()
