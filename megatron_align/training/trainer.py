"""The training loop: megatron-core model chunks, DDP, optimizer and schedules, glued together.

Run under torchrun (one process per rank). ``Trainer.__init__`` builds the components in the
order data flows: process groups -> data -> model -> optimizer/scheduler -> restored state ->
metrics. ``Trainer.train()`` runs the loop; every rank returns the same final state.
"""
from __future__ import annotations

import enum
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_align import platform
from megatron_align.checkpoint.dist_ckpt import CheckpointMeta
from megatron_align.checkpoint.manager import Checkpointer
from megatron_align.config import RunConfig, dump_yaml, to_dict
from megatron_align.data.builders import TrainingData, build_training_data, train_iterations
from megatron_align.model.build import build_model_chunks, params_dtype, transformer_config
from megatron_align.io import write_text_atomic
from megatron_align.model.presets import resolve_architecture

from .batches import microbatch_iterators, stage_keys, step_microbatches
from .completion import write_finished
from megatron_align.parallel.distributed import init_distributed
from megatron_align.parallel.layout import ParallelLayout
from megatron_align.parallel.memory import fit_warning
from .metrics import MetricsWriter, flops_per_token, peak_tflops

log = logging.getLogger("megatron_align.train")

CheckpointHook = Callable[[Path], None]  # called with each complete checkpoint directory


class StopReason(enum.IntEnum):
    """Why a run stops before its last step (ranks agree on the largest)."""

    NONE = 0
    SIGNAL = 1  # SIGTERM/SIGUSR1: preemption or a wall-time warning
    TIME_BUDGET = 2  # train.exit_duration_minutes

    def __str__(self) -> str:
        return {StopReason.SIGNAL: "signal", StopReason.TIME_BUDGET: "exit_duration_minutes"}.get(self, "none")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); a checkpoint was saved."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    tokens_by_category: dict[str, int] = field(default_factory=dict)
    skipped_steps: int = 0


def masked_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """A micro-batch's (loss sum over masked tokens, their count, logged [sum, count]): the
    step's loss is the sum over the global batch divided by the count over it."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)  # a pipeline stage's batch holds only the keys it reads
    output = model(batch.get("tokens"), batch["position_ids"], None, labels=batch.get("labels"))
    return output, partial(masked_loss, batch.get("loss_mask"))


def _per_token_mean(loss_sum: float, tokens: float) -> float:
    """The loss per token over everything summed (NaN when no token was in the loss)."""
    return loss_sum / tokens if tokens > 0 else float("nan")


@dataclass
class _Agreement:
    """The world's [loss sum, token count, ranks signalled, ranks out of time], in flight."""

    totals: torch.Tensor
    work: object

    def result(self) -> tuple[float, StopReason]:
        self.work.wait()
        loss_sum, tokens, signalled, out_of_time = self.totals.tolist()
        stop = (StopReason.TIME_BUDGET if out_of_time else
                StopReason.SIGNAL if signalled else StopReason.NONE)
        return _per_token_mean(loss_sum, tokens), stop


def _decoupled_grads(optimizer_config: OptimizerConfig) -> bool:
    """Whether the optimizer keeps its gradients apart from ``param.grad`` (precision-aware
    optimizer), as megatron-core's own clipping asks; named differently across releases."""
    for name in ("use_precision_aware_optimizer_no_fp8_or_ds_fp8", "use_precision_aware_optimizer"):
        if hasattr(optimizer_config, name):
            return bool(getattr(optimizer_config, name))
    return False


class Trainer:
    config: RunConfig
    layout: ParallelLayout
    data: TrainingData
    model: list[DistributedDataParallel]
    optimizer: object
    scheduler: OptimizerParamScheduler
    checkpointer: Checkpointer
    metrics: MetricsWriter
    state: TrainState

    def __init__(self, config: RunConfig, on_checkpoint_saved: Sequence[CheckpointHook] = ()):
        self.config = config
        self.on_checkpoint_saved = tuple(on_checkpoint_saved)
        self.run_dir = Path(config.run_dir)
        self.layout = init_distributed(config)
        self.rank = torch.distributed.get_rank()
        self.device = platform.device()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.batch_keys = stage_keys(parallel_state.is_pipeline_first_stage(ignore_virtual=True),
                                     parallel_state.is_pipeline_last_stage(ignore_virtual=True))
        self.state = TrainState()
        self._stop_signal: Optional[int] = None
        self._start_time = time.time()

        config.train.iterations = train_iterations(config)  # data.epochs (SFT) sets it
        num_train_samples = config.train.iterations * config.train.global_batch_size
        self.data = build_training_data(config, num_train_samples, config.model.vocab_size)
        if self.data.summary:
            self._announce(self.data.summary)
        # resolved for config.yaml and checkpoints; an imported model's may exceed its tokenizer's
        config.model.vocab_size = max(config.model.vocab_size or 0, self.data.vocab_size)
        self.state.tokens_by_category = {c: 0 for c in self.data.categories}
        self._drop_valid_categories_smaller_than_a_batch()
        self._warn_if_memory_short()

        self.tf_config = transformer_config(config)
        chunks = build_model_chunks(config, self.tf_config, config.model.vocab_size)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=config.parallel.overlap_grad_reduce,
            use_distributed_optimizer=config.parallel.distributed_optimizer,
        )
        self.model = [
            DistributedDataParallel(config=self.tf_config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.optimizer = get_megatron_optimizer(self._optimizer_config(), self.model)
        self.scheduler = self._build_scheduler()
        self.tf_config.no_sync_func = ([m.no_sync for m in self.model] if len(self.model) > 1
                                       else self.model[0].no_sync)
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.tf_config.grad_scale_func = self.optimizer.scale_loss
        self.num_parameters = self._count_parameters()

        self.checkpointer = Checkpointer(config.checkpoint, self.run_dir / "checkpoints", self.model,
                                         self.optimizer, self.scheduler, self.device,
                                         on_complete=self._saved)
        self.restored_from = self._restore()
        if self.restored_from is None:
            self._announce(f"starting {self.run_dir}: {self.num_parameters:,} parameters, "
                           f"{config.train.iterations} steps, {self.layout.describe()}")
        self._apply_configured_lr()
        self.metrics = MetricsWriter(str(self.run_dir), enabled=self.rank == 0,
                                     start_step=self.state.iteration,
                                     tensorboard=config.logging.tensorboard,
                                     wandb_project=config.logging.wandb_project,
                                     wandb_name=config.logging.wandb_name, config=to_dict(config))
        if self.rank == 0:
            self._write_resolved_config()

    def _warn_if_memory_short(self) -> None:
        """On GPU: the memory planner's peak rank against this GPU (a warning, not a stop: the
        plan is an estimate; once the vocabulary is known). On CPU there is nothing to check
        against."""
        if not torch.cuda.is_available():
            return
        capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        warning = fit_warning(self.config, self.layout.world_size, capacity)
        if warning and self.rank == 0:
            print(f"[megatron-align] warning: {warning}", file=sys.stderr, flush=True)

    # ----------------------------------------------------------------------------- components
    def _optimizer_config(self) -> OptimizerConfig:
        opt, dtype = self.config.optim, params_dtype(self.config)
        return OptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=self.config.parallel.distributed_optimizer,
        )

    def _build_scheduler(self) -> OptimizerParamScheduler:
        opt, iters = self.config.optim, self.config.train.iterations
        warmup = opt.warmup_iters if opt.warmup_iters is not None else int(round(opt.warmup_fraction * iters))
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=max(iters, 1),
            lr_decay_style=opt.decay_style,
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=max(iters, 1),
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
            wsd_decay_steps=max(1, iters // 10) if opt.decay_style == "WSD" else None,
            lr_wsd_decay_style="cosine" if opt.decay_style == "WSD" else None,
        )

    def _count_parameters(self) -> int:
        local = sum(p.numel() for chunk in self.model for p in chunk.parameters())
        total = torch.tensor([local], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return int(total.item())

    def _write_resolved_config(self) -> None:
        write_text_atomic(self.run_dir / "config.yaml", dump_yaml(self.config))

    # ------------------------------------------------------------------------ restore / save
    def _restore(self) -> Optional[str]:
        restored = self.checkpointer.restore(self.layout.world_size)
        if restored is None:
            return None
        meta = restored.meta
        if restored.adopt_progress:
            self._adopt(meta)
        if restored.resumed:
            self._announce(f"resumed from {restored.source} at step {meta.iteration} "
                           f"({meta.consumed_samples} samples; {restored.what}; "
                           f"saved at {meta.layout}, now {self.layout.describe()})")
        else:
            self._announce(f"initialised {restored.what} from {restored.source} (step {meta.iteration}); "
                           f"starting at step {self.state.iteration}")
        return str(restored.source)

    def _apply_configured_lr(self) -> None:
        """Loaded optimizer state carries the saved run's max/min LR in its param groups; the
        configured schedule wins (an LR restart when chaining stages, a no-op on plain resume)."""
        for group in self.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = self.config.optim.lr, self.config.optim.min_lr
        self.scheduler.step(increment=0)

    def _adopt(self, meta: CheckpointMeta) -> None:
        self.state.iteration = meta.iteration
        self.state.consumed_samples = meta.consumed_samples
        self.state.consumed_tokens = meta.consumed_tokens
        for key, value in meta.tokens_by_category.items():
            self.state.tokens_by_category[key] = value

    def _announce(self, message: str) -> None:
        if self.rank == 0:
            print(f"[megatron-align] {message}", flush=True)

    def save(self) -> Path:
        meta = CheckpointMeta(
            iteration=self.state.iteration,
            consumed_samples=self.state.consumed_samples,
            consumed_tokens=self.state.consumed_tokens,
            tokens_by_category=dict(self.state.tokens_by_category),
            layout={"world_size": self.layout.world_size, "tensor": self.layout.tensor,
                    "pipeline": self.layout.pipeline, "virtual_pipeline": self.layout.virtual_pipeline,
                    "data": self.layout.data},
            config=to_dict(self.config),
            mixture_hash=self.data.mixture_hash,
            optimizer_format=self.config.checkpoint.optimizer_format,
            chat_template=self.data.chat_template,
        )
        path = self.checkpointer.save(meta)
        if self.checkpointer.asynchronous:
            self._announce(f"writing {path.name} in the background (training paused "
                           f"{self.checkpointer.pause_s:.2f} s)")
        return path

    def _saved(self, path: Path) -> None:
        """Every rank, once ``path`` is complete and named by ``latest``: the hooks run on rank 0
        (before the next save, so retention cannot delete the checkpoint under them) while the
        other ranks wait."""
        self._announce(f"saved {path}")
        if self.on_checkpoint_saved:
            if self.rank == 0:
                for hook in self.on_checkpoint_saved:
                    hook(path)
            torch.distributed.barrier()

    # -------------------------------------------------------------------------------- train
    def train_step(self) -> dict:
        layout, state = self.layout, self.state
        batches = step_microbatches(self.data.train, layout, state.consumed_samples, self.dp_rank,
                                    self.device, self.batch_keys)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._forward_backward(batches, forward_only=False)
        agreement = self._start_agreement(losses)
        applied, grad_norm = self._optimizer_step()
        if applied:
            self.scheduler.step(increment=1)
        loss, stop = agreement.result()
        skipped = not applied
        state.skipped_steps = state.skipped_steps + 1 if skipped else 0
        self._consume_step()
        return {"loss": loss, "grad_norm": grad_norm, "skipped": skipped, "stop": stop}

    def _consume_step(self) -> None:
        state, gbs, seq = self.state, self.layout.global_batch_size, self.config.train.seq_length
        categories = self.data.category_of_samples(state.consumed_samples, state.consumed_samples + gbs)
        counts = np.bincount(categories, minlength=len(self.data.categories))
        for name, count in zip(self.data.categories, counts):
            state.tokens_by_category[name] += int(count) * seq
        state.iteration += 1
        state.consumed_samples += gbs
        state.consumed_tokens += gbs * seq

    def _forward_backward(self, batches: list[dict], forward_only: bool) -> list:
        return get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=microbatch_iterators(batches, len(self.model)),
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.layout.num_microbatches,
            seq_length=self.config.train.seq_length,
            micro_batch_size=self.layout.micro_batch_size,
            forward_only=forward_only,
        )

    def _loss_and_tokens(self, losses: list) -> torch.Tensor:
        """[loss sum, token count] of this rank's micro-batches (zero off the last stage and on
        TP ranks > 0, so that an all-reduce over the world counts every token once)."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
                parallel_state.get_tensor_model_parallel_rank() == 0:
            for item in losses:
                total += item["lm loss"].to(torch.float64)
        return total

    @staticmethod
    def _mean_over_world(total: torch.Tensor) -> float:
        torch.distributed.all_reduce(total)
        return _per_token_mean(*total.tolist())

    def _start_agreement(self, losses: list) -> "_Agreement":
        """What every rank must agree on once a step's backward is done, in one asynchronous
        all-reduce over the world that runs while the optimizer steps (a blocking one would
        make the pipeline stages wait for each other once more per step): the per-token mean
        loss over the global batch and whether to stop after this step (a signal arrived
        somewhere, or the time budget ran out). Summed: [loss sum, token count, ranks
        signalled, ranks out of time]; the loss sum and count reduce exactly as on their own."""
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        totals[:2] = self._loss_and_tokens(losses)
        totals[2] = float(self._stop_signal is not None)
        totals[3] = float(self._out_of_time())
        return _Agreement(totals, torch.distributed.all_reduce(totals, async_op=True))

    def _optimizer_step(self) -> tuple[bool, float]:
        """megatron-core's ``optimizer.step()`` in its own parts (prepare the gradients, their
        norm, clipping, the update), with the step skipped when the gradient norm is not finite
        (NaN/Inf anywhere) or zero (no loss token in the whole global batch). The norm is
        reduced over every rank holding gradients, so every rank takes the same decision
        without a collective of its own. Returns (applied, grad norm)."""
        optimizer = self.optimizer
        if optimizer.prepare_grads():  # a loss-scale overflow (fp16), agreed inside megatron-core
            return False, float("nan")
        grad_norm = float(optimizer.get_grad_norm())
        if not (math.isfinite(grad_norm) and grad_norm > 0):
            return False, grad_norm
        for part in getattr(optimizer, "chained_optimizers", [optimizer]):
            if getattr(part, "is_stub_optimizer", False):  # no parameters on this rank
                continue
            params = part.get_parameters()
            if part.config.clip_grad > 0 and params:
                clip_grad_by_total_norm_fp32(params, max_norm=part.config.clip_grad, total_norm=grad_norm,
                                             use_decoupled_grad=_decoupled_grads(part.config))
        return bool(optimizer.step_with_ready_grads()), grad_norm

    def _out_of_time(self) -> bool:
        limit = self.config.train.exit_duration_minutes
        return limit is not None and (time.time() - self._start_time) / 60 >= limit

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def train(self) -> TrainState:
        cfg = self.config
        self._install_signal_handlers()
        arch = resolve_architecture(cfg.model)
        tokens_per_step = self.layout.global_batch_size * cfg.train.seq_length
        flops_token = flops_per_token(self.num_parameters, arch.num_layers, arch.hidden_size,
                                      cfg.train.seq_length)
        peak = peak_tflops()
        progress = self._progress_bar()
        stop_reason = StopReason.NONE
        last_saved_iteration = self.state.iteration if self.restored_from else None
        while self.state.iteration < cfg.train.iterations:
            start = time.perf_counter()
            result = self.train_step()
            step_time = time.perf_counter() - start
            record = {
                "step": self.state.iteration,
                "loss": result["loss"],
                "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
                "grad_norm": result["grad_norm"],
                "tokens": self.state.consumed_tokens,
                "tokens_by_category": dict(self.state.tokens_by_category),
                "step_time_s": step_time,
                "tokens_per_s": tokens_per_step / step_time,
            }
            if peak is not None:
                tflops = flops_token * tokens_per_step / step_time / self.layout.world_size / 1e12
                record.update(tflops_per_gpu=tflops, mfu=tflops / peak)
            if result["skipped"]:
                record["skipped"] = True
            if self.checkpointer.pause_s is not None:
                record["checkpoint_pause_s"] = self.checkpointer.pause_s
            if cfg.train.eval_interval and self.state.iteration % cfg.train.eval_interval == 0 and self.data.valid:
                record["valid_loss_by_category"] = self.evaluate()
            if self.state.iteration % cfg.train.log_interval == 0 or result["skipped"]:
                self.metrics.log(record)
                self.checkpointer.pause_s = None
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{record['lr']:.2e}")
            self.checkpointer.publish_finished()
            if self.state.skipped_steps > cfg.train.max_skipped_steps:
                self.save()
                self.checkpointer.wait()
                raise TrainingStopped(
                    f"{self.state.skipped_steps} consecutive steps had a non-finite loss or "
                    f"gradient (limit train.max_skipped_steps={cfg.train.max_skipped_steps}); "
                    f"saved the last good weights at step {self.state.iteration}")
            stop_reason = result["stop"]  # agreed by every rank in train_step
            if stop_reason or self.checkpointer.due(self.state.iteration):
                self.save()
                last_saved_iteration = self.state.iteration
            if stop_reason:
                self._announce(f"stopping at step {self.state.iteration} ({stop_reason}); "
                               "checkpoint saved, exit 0 for requeue")
                break
        if progress is not None:
            progress.close()
        if cfg.checkpoint.save_at_end and last_saved_iteration != self.state.iteration:
            self.save()
        self.checkpointer.wait()
        self.metrics.close()
        if self.rank == 0 and self.state.iteration >= cfg.train.iterations:
            write_finished(self.run_dir, self.state.iteration, self.state.consumed_tokens)
        return self.state

    def _progress_bar(self):
        if self.rank != 0 or not self.config.logging.progress_bar:
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.train.iterations, initial=self.state.iteration, unit="step",
                    desc="train", file=sys.stderr, dynamic_ncols=True)

    @torch.no_grad()
    def _drop_valid_categories_smaller_than_a_batch(self) -> None:
        """Validation runs whole global batches; a category with fewer held-out samples than one
        would report 0/0 = NaN, so it is left out with a warning that says how to get it back."""
        batch = self.layout.global_batch_size
        for name, dataset in list(self.data.valid.items()):
            if len(dataset) < batch:
                del self.data.valid[name]
                if self.rank == 0:
                    log.warning("category %s has %d held-out validation samples, fewer than one global batch "
                                "(%d): its validation loss is not computed; raise the mixture's valid_fraction "
                                "or data.valid_samples_per_category", name, len(dataset), batch)

    def evaluate(self) -> dict[str, float]:
        """Per-category validation loss over ``train.eval_iters`` global batches each."""
        results = {}
        for chunk in self.model:
            chunk.eval()
        for name, dataset in self.data.valid.items():
            total = torch.zeros(2, dtype=torch.float64, device=self.device)
            needed = self.config.train.eval_iters * self.layout.global_batch_size
            for start in range(0, min(needed, len(dataset)) - self.layout.global_batch_size + 1,
                               self.layout.global_batch_size):
                batches = step_microbatches(dataset, self.layout, start, self.dp_rank, self.device,
                                            self.batch_keys)
                total += self._loss_and_tokens(self._forward_backward(batches, forward_only=True))
            results[name] = self._mean_over_world(total)
        for chunk in self.model:
            chunk.train()
        return results
