"""Per-rank memory of a run before it starts: parameters, gradients, optimizer state, activations.

Pure arithmetic over the model preset and the parallel layout, mirroring what megatron-core
allocates for the layer specs megatron-align builds:

- parameters: every tensor of this rank's ``GPTModel`` chunk(s) (TP-split weights, replicated
  norms and row-parallel biases, the vocab-parallel embedding on the first stage, the output
  layer on the last, and its duplicate there when embeddings are tied and PP > 1). With the
  distributed optimizer, DDP moves the parameters into one padded buffer per dtype: that
  buffer is what is counted.
- gradients: DDP's contiguous gradient buffer, fp32 (``grad_reduce_in_fp32``), padded as
  megatron-core pads it with the distributed optimizer (each parameter starts on a multiple of
  64 elements, each bucket ends on a multiple of lcm(DP, 128)).
- optimizer: Adam's two fp32 moments, plus an fp32 master copy of each bf16 parameter; with
  the distributed optimizer (ZeRO-1) only for this DP rank's shard of each bucket. Adam's
  per-tensor step counters (4 bytes each) are not counted.
- activations: bytes held for the backward pass per micro-batch, layer by layer (inputs saved
  by each norm, linear, activation function and core attention; the cross-entropy's fp32
  softmax on the last stage), times the micro-batches in flight under 1F1B; plus the largest
  transient (logits at the loss, the recomputed layer with full recompute, megatron's score
  buffer). Modelled on the local spec; TE layers are close but not identical.

``plan_memory`` gives each pipeline stage's worst DP rank; ``search_layouts`` tries layouts
for a world size and keeps those that fit.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_align.config import ConfigError, RunConfig
from megatron_align.model.presets import Architecture, padded_vocab_size, resolve_architecture

from .layout import ParallelLayout, check_run_config

FP32, BF16 = 4, 2
GiB = 1024 ** 3
DDP_BUCKET_MIN = 40_000_000  # megatron-core's default bucket size (elements) with overlap_grad_reduce
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``81920MiB``, ``1e9`` -> bytes."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):]
    try:
        if unit not in _UNITS:
            raise ValueError
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 80GiB, 80GB, 81920MiB)") from None


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    shared_embedding: bool = False  # megatron-core gives it its own DDP bucket (DO, PP > 1)
    norm: bool = False  # torch norms (local spec) keep fp32 weights in a bf16 model


def stage_layers(arch: Architecture, pipeline: int, virtual_pipeline: Optional[int]) -> int:
    """Transformer layers in one model chunk."""
    return arch.num_layers // (pipeline * (virtual_pipeline or 1))


def chunk_parameters(arch: Architecture, padded_vocab: int, tensor: int, layers: int,
                     pre_process: bool, post_process: bool, pipeline: int) -> list[Param]:
    """One model chunk's parameters in ``named_parameters`` order (DDP's order)."""
    h, t = arch.hidden_size, tensor
    head_dim = h // arch.num_attention_heads
    qkv_out = (arch.num_attention_heads + 2 * arch.kv_groups) * head_dim // t
    fc1_out = arch.ffn_hidden_size * (2 if arch.activation == "swiglu" else 1) // t
    norm = ["weight"] if arch.normalization == "RMSNorm" else ["weight", "bias"]
    bias = arch.add_bias_linear
    tied_copy = arch.tie_embeddings and pipeline > 1
    params = []
    if pre_process:
        params.append(Param("embedding.word_embeddings.weight", padded_vocab // t * h,
                            shared_embedding=tied_copy and not post_process))
    for i in range(layers):
        prefix = f"decoder.layers.{i}."
        params += [Param(prefix + "input_layernorm." + n, h, norm=True) for n in norm]
        params.append(Param(prefix + "self_attention.linear_proj.weight", h * (h // t)))
        if bias:
            params.append(Param(prefix + "self_attention.linear_proj.bias", h))
        params.append(Param(prefix + "self_attention.linear_qkv.weight", qkv_out * h))
        if bias:
            params.append(Param(prefix + "self_attention.linear_qkv.bias", qkv_out))
        params += [Param(prefix + "pre_mlp_layernorm." + n, h, norm=True) for n in norm]
        params.append(Param(prefix + "mlp.linear_fc1.weight", fc1_out * h))
        if bias:
            params.append(Param(prefix + "mlp.linear_fc1.bias", fc1_out))
        params.append(Param(prefix + "mlp.linear_fc2.weight", h * (arch.ffn_hidden_size // t)))
        if bias:
            params.append(Param(prefix + "mlp.linear_fc2.bias", h))
    if post_process:
        params += [Param("decoder.final_layernorm." + n, h, norm=True) for n in norm]
        if not (arch.tie_embeddings and pre_process):
            params.append(Param("output_layer.weight", padded_vocab // t * h,
                                shared_embedding=tied_copy))
    return params


@dataclass(frozen=True)
class GradBuffer:
    """DDP's contiguous buffer for one chunk: ``param_ranges`` [start, end) per parameter and
    ``buckets`` [start, end), in buffer order."""
    numel: int
    param_ranges: tuple[tuple[int, int], ...]
    buckets: tuple[tuple[int, int], ...]


def ddp_buffer(params: list[Param], data_parallel: int, distributed_optimizer: bool,
               bucket_size: Optional[int]) -> GradBuffer:
    """megatron-core's ``_ParamAndGradBuffer`` layout (parameters in reverse order)."""
    def pad(n: int, divisor: int) -> int:
        return -(-n // divisor) * divisor

    def bucket_end(index: int) -> int:
        return pad(index, math.lcm(data_parallel, 128)) if distributed_optimizer else index

    ranges, buckets = [], []
    start = bucket_start = 0
    in_bucket = 0
    for param in params[::-1]:
        if distributed_optimizer:
            start = pad(start, 64)
        own_bucket = param.shared_embedding and distributed_optimizer
        if own_bucket and in_bucket:
            end = bucket_end(start)
            buckets.append((bucket_start, end))
            start = bucket_start = end
            in_bucket = 0
        ranges.append((start, start + param.numel))
        in_bucket += 1
        stop = start + param.numel
        if (bucket_size is not None and stop - bucket_start >= bucket_size) or own_bucket:
            end = bucket_end(stop)
            buckets.append((bucket_start, end))
            start = bucket_start = end
            in_bucket = 0
        else:
            start = stop
    if in_bucket:
        buckets.append((bucket_start, bucket_end(start)))
    return GradBuffer(buckets[-1][1] if buckets else 0, tuple(ranges), tuple(buckets))


def optimizer_shard_numel(buffer: GradBuffer, data_parallel: int, dp_rank: int) -> int:
    """Elements of real parameters in this DP rank's shard of every bucket (the distributed
    optimizer keeps state only for those)."""
    total = 0
    for bucket_start, bucket_stop in buffer.buckets:
        shard = (bucket_stop - bucket_start) // data_parallel
        lo = bucket_start + dp_rank * shard
        hi = lo + shard
        for start, stop in buffer.param_ranges:
            total += max(0, min(stop, hi) - max(start, lo))
    return total


# ---------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationModel:
    """What one micro-batch keeps for backward (bytes), for one transformer layer and the rest."""
    per_layer: int  # a layer without recompute
    per_layer_kept: int  # what each layer keeps under the recompute setting
    embedding: int  # first stage
    loss: int  # last stage: final norm + output layer + cross-entropy
    stage_output: int  # the tensor a stage hands on (held until its backward)
    transient: int  # the largest short-lived allocation on the last stage (not per micro-batch)
    layer_transient: int  # the same on the other stages
    attention_workspace: int  # megatron's persistent score buffer (once per rank)


def activation_model(arch: Architecture, tensor: int, micro_batch: int, seq: int, dtype_bytes: int,
                     attention: str, recompute: str, padded_vocab: int,
                     composite_rms_norm: bool = False) -> ActivationModel:
    """``composite_rms_norm``: torch's RMSNorm without a fused kernel (CPU) also keeps the
    normalised input."""
    s, b, h, t, d = seq, micro_batch, arch.hidden_size, tensor, dtype_bytes
    sb = s * b
    head_dim = h // arch.num_attention_heads
    heads = arch.num_attention_heads // t
    groups = arch.kv_groups // t if arch.kv_groups >= t else 1
    q = sb * heads * head_dim * d
    kv = sb * groups * head_dim * d
    qkv = q + 2 * kv
    f = arch.ffn_hidden_size // t
    sbh = sb * h * d
    rotary = int(head_dim * arch.rotary_percent)
    cos_sin = 4 * s * rotary * d  # cos and sin, cast per call, for the query and the key

    # the norms' inputs (one tensor with the parallel residual) and statistics, and their
    # outputs (saved by the QKV and FC1 linears)
    if arch.normalization == "RMSNorm" and composite_rms_norm:
        final_norm = 2 * sb * h * FP32 + sb * FP32  # input (as fp32) and normalised input, rstd
        norms = 2 * final_norm + 2 * sbh
    else:
        final_norm = sb * FP32 * (2 if arch.normalization == "LayerNorm" else 1)  # input: the stage output
        norms = sbh * (1 if arch.parallel_residual else 2) + 2 * final_norm + 2 * sbh
    # rotated query and key (new tensors); the value is a view that keeps the QKV output alive
    attn_inputs = q + kv + qkv
    gqa = heads != groups
    if attention == "megatron":
        core = b * heads * s * s * (d + (FP32 if d < FP32 else 0))  # fp32 softmax out + cast copy
        # with GQA, key and value are repeated to every head and the QKV output is dropped
        held_inputs = 3 * q if gqa else attn_inputs
    else:  # sdpa / te / flash: the log-sum-exp; the output is the projection's input (a view)
        core = b * heads * s * FP32
        held_inputs = attn_inputs
    context = q  # the core attention's output, saved by the output projection
    # gelu: its input (after the bias) and output; swiglu: FC1's output, silu's output, the
    # linear half (copied by the GLU's offset add) and the product
    mlp = f * sb * d * (5 if arch.activation == "swiglu" else 2)
    per_layer = norms + cos_sin + held_inputs + core + context + mlp
    if recompute == "full":
        kept = sbh  # each layer's input
    elif recompute == "selective":  # the core attention keeps only its inputs
        kept = norms + cos_sin + attn_inputs + context + mlp
    else:
        kept = per_layer

    embedding = sb * 8 + (sb * 9 if t > 1 else 0)  # token ids (and the masked ids and mask)
    logits_fp32 = sb * (padded_vocab // t) * FP32
    loss = final_norm + sbh + logits_fp32 + sb * 9  # final norm; CE softmax, target ids and mask
    # inside a layer's backward: megatron's score gradient; with recomputation the layer's
    # recomputed activations (full), or the recomputed attention output plus the gradients of
    # q, k and v (selective)
    layer_transient = b * heads * s * s * d if attention == "megatron" else 0
    if recompute == "full":
        layer_transient = max(layer_transient, per_layer)
    elif recompute == "selective":
        layer_transient = max(layer_transient, core + q + qkv + context)
    # on the last stage also the logits (their fp32 copy becomes the cross-entropy's softmax)
    transient = max(sb * (padded_vocab // t) * d, layer_transient)
    workspace = b * heads * s * s * d if attention == "megatron" else 0  # persistent score buffer
    return ActivationModel(per_layer, kept, embedding, loss, sbh, transient, layer_transient, workspace)


def in_flight_microbatches(pipeline: int, virtual_pipeline: Optional[int], stage: int,
                           num_microbatches: int) -> int:
    """Chunk-micro-batches whose activations one stage holds at once under (interleaved) 1F1B."""
    chunks = virtual_pipeline or 1
    total = num_microbatches * chunks
    if pipeline == 1:
        return 1
    if virtual_pipeline is None:
        warmup = pipeline - stage - 1
    else:
        warmup = (pipeline - stage - 1) * 2 + (chunks - 1) * pipeline
    return min(warmup + 1, total)


# ---------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RankMemory:
    stage: int
    dp_rank: int
    parameters: int
    gradients: int
    optimizer: int
    activations_per_microbatch: int  # one micro-batch through every chunk of this stage
    in_flight: int  # chunk-micro-batches held at once
    activations: int  # held at the 1F1B peak
    transient: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.transient


@dataclass
class MemoryPlan:
    layout: ParallelLayout
    recompute: str
    distributed_optimizer: bool
    attention: str
    dtype: str
    seq_length: int
    ranks: list[RankMemory] = field(default_factory=list)  # worst DP rank of each stage

    @property
    def peak(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    def describe_layout(self) -> str:
        zero = " ZeRO-1" if self.distributed_optimizer else ""
        return f"{self.layout.describe()} recompute={self.recompute}{zero}"

    def to_dict(self) -> dict:
        return {"layout": {"world_size": self.layout.world_size, "tensor": self.layout.tensor,
                           "pipeline": self.layout.pipeline,
                           "virtual_pipeline": self.layout.virtual_pipeline,
                           "data": self.layout.data, "micro_batch_size": self.layout.micro_batch_size,
                           "global_batch_size": self.layout.global_batch_size,
                           "recompute": self.recompute,
                           "distributed_optimizer": self.distributed_optimizer},
                "attention_backend": self.attention, "dtype": self.dtype,
                "seq_length": self.seq_length,
                "stages": [{**r.__dict__, "total": r.total} for r in self.ranks],
                "peak_bytes": self.peak.total}


def planned_dtype(config: RunConfig, on_gpu: bool) -> str:
    precision = config.train.precision
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


def planned_te_layers(config: RunConfig, on_gpu: bool) -> bool:
    """TransformerEngine layers: asked for, or ``auto`` on a GPU (the NGC containers ship TE)."""
    impl = config.model.transformer_impl
    return impl == "transformer_engine" or (impl == "auto" and on_gpu)


def planned_attention(config: RunConfig) -> str:
    """Only megatron's DotProductAttention keeps the s x s probabilities; te and sdpa (auto
    resolves to one of them) keep the output and log-sum-exp."""
    return "megatron" if config.model.attention_backend == "megatron" else (
        "te" if config.model.attention_backend == "te" else "sdpa")


def rank_memory(config: RunConfig, layout: ParallelLayout, stage: int, dp_rank: int,
                dtype: str, te_layers: bool, on_gpu: bool, arch: Optional[Architecture] = None) -> RankMemory:
    """Bytes on the rank at pipeline ``stage`` and data-parallel rank ``dp_rank``."""
    arch = arch or resolve_architecture(config.model)
    vocab = config.model.vocab_size or arch.default_vocab_size
    padded = padded_vocab_size(vocab, config.model.make_vocab_size_divisible_by, layout.tensor)
    param_bytes = BF16 if dtype == "bf16" else FP32
    distributed = config.parallel.distributed_optimizer
    chunks = layout.virtual_pipeline or 1
    layers = stage_layers(arch, layout.pipeline, layout.virtual_pipeline)
    parameters = gradients = optimizer = 0
    for chunk in range(chunks):
        pre = stage == 0 and chunk == 0
        post = stage == layout.pipeline - 1 and chunk == chunks - 1
        params = chunk_parameters(arch, padded, layout.tensor, layers, pre, post, layout.pipeline)
        # DDP buckets: one per chunk unless overlap_grad_reduce on the first chunk of stage 0
        bucket = (max(DDP_BUCKET_MIN, 1_000_000 * layout.data)
                  if config.parallel.overlap_grad_reduce and chunk == 0 and stage == 0 else None)
        # DDP keeps one buffer per parameter dtype: fp32 torch-norm weights in a bf16 model
        # (local spec) get their own
        fp32_norms = dtype == "bf16" and not te_layers
        groups = [[p for p in params if not (fp32_norms and p.norm)], [p for p in params if fp32_norms and p.norm]]
        for group, width in zip(groups, (param_bytes, FP32)):
            if not group:
                continue
            buffer = ddp_buffer(group, layout.data, distributed, bucket)
            gradients += buffer.numel * FP32
            if distributed:
                parameters += buffer.numel * width
                shard = optimizer_shard_numel(buffer, layout.data, dp_rank)
            else:
                parameters += sum(p.numel for p in group) * width
                shard = sum(p.numel for p in group)
            # Adam's two fp32 moments, and an fp32 master copy of every bf16 parameter
            optimizer += shard * (2 * FP32 + (FP32 if width == BF16 else 0))

    model = activation_model(arch, layout.tensor, layout.micro_batch_size, config.train.seq_length,
                             param_bytes, planned_attention(config), config.train.recompute, padded,
                             composite_rms_norm=not (on_gpu or te_layers))
    per_micro = layers * chunks * model.per_layer_kept + model.stage_output * chunks
    if stage == 0:
        per_micro += model.embedding
    if stage == layout.pipeline - 1:
        per_micro += model.loss
    in_flight = in_flight_microbatches(layout.pipeline, layout.virtual_pipeline, stage,
                                       layout.num_microbatches)
    activations = per_micro * in_flight // chunks
    transient = model.attention_workspace + (model.transient if stage == layout.pipeline - 1
                                             else model.layer_transient)
    return RankMemory(stage, dp_rank, parameters, gradients, optimizer, per_micro, in_flight,
                      activations, transient)


def plan_memory(config: RunConfig, world_size: int, on_gpu: bool = True) -> MemoryPlan:
    """Every pipeline stage's worst DP rank, for the config's layout (checked first)."""
    layout = check_run_config(config, world_size)
    arch = resolve_architecture(config.model)
    dtype = planned_dtype(config, on_gpu)
    te_layers = planned_te_layers(config, on_gpu)
    plan = MemoryPlan(layout, config.train.recompute, config.parallel.distributed_optimizer,
                      planned_attention(config), dtype, config.train.seq_length)
    for stage in range(layout.pipeline):
        ranks = [rank_memory(config, layout, stage, dp, dtype, te_layers, on_gpu, arch)
                 for dp in (range(layout.data) if config.parallel.distributed_optimizer else [0])]
        plan.ranks.append(max(ranks, key=lambda r: r.total))
    return plan


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_layouts(config: RunConfig, world_size: int, gpu_bytes: int, on_gpu: bool = True,
                   headroom: float = 0.9) -> list[MemoryPlan]:
    """Layouts of ``world_size`` ranks whose peak rank fits in ``headroom`` x ``gpu_bytes``,
    cheapest in communication and recompute first (less TP x PP, no recompute, bigger
    micro-batches). Global batch and sequence length stay as configured."""
    fits = []
    arch = resolve_architecture(config.model)
    for tensor in _divisors(world_size):
        if tensor > 8 or arch.num_attention_heads % tensor:
            continue
        for pipeline in _divisors(world_size // tensor):
            vpps = [None] + [v for v in (2, 3, 4) if pipeline >= 3 and arch.num_layers % (pipeline * v) == 0]
            for vpp in vpps:
                data = world_size // (tensor * pipeline)
                for micro in (m for m in (1, 2, 4, 8, 16) if config.train.global_batch_size % (m * data) == 0):
                    for recompute in ("none", "selective", "full"):
                        for distributed in ((False, True) if data > 1 else (False,)):
                            candidate = copy.deepcopy(config)
                            candidate.parallel.tensor, candidate.parallel.pipeline = tensor, pipeline
                            candidate.parallel.virtual_pipeline = vpp
                            candidate.parallel.distributed_optimizer = distributed
                            candidate.train.micro_batch_size, candidate.train.recompute = micro, recompute
                            try:
                                plan = plan_memory(candidate, world_size, on_gpu)
                            except ConfigError:
                                continue
                            if plan.peak.total <= headroom * gpu_bytes:
                                fits.append(plan)
    rank = {"none": 0, "selective": 1, "full": 2}
    fits.sort(key=lambda p: (p.layout.tensor * p.layout.pipeline, rank[p.recompute],
                             -p.layout.micro_batch_size, p.layout.virtual_pipeline or 1,
                             p.distributed_optimizer, p.peak.total))
    return fits


def report(plan: MemoryPlan, gpu_bytes: Optional[int] = None) -> str:
    """One screen: the layout, a row per stage, and whether the peak rank fits."""
    lines = [f"layout: {plan.describe_layout()}",
             f"dtype {plan.dtype}, seq {plan.seq_length}, attention {plan.attention}; bytes per rank "
             f"(the worst DP rank of each pipeline stage):",
             f"{'stage':>5} {'params':>11} {'grads':>11} {'optimizer':>11} {'act/micro':>11} "
             f"{'in flight':>9} {'activations':>11} {'transient':>11} {'total':>11}"]
    for r in plan.ranks:
        lines.append(f"{r.stage:>5} {format_bytes(r.parameters):>11} {format_bytes(r.gradients):>11} "
                     f"{format_bytes(r.optimizer):>11} {format_bytes(r.activations_per_microbatch):>11} "
                     f"{r.in_flight:>9} {format_bytes(r.activations):>11} {format_bytes(r.transient):>11} "
                     f"{format_bytes(r.total):>11}")
    peak = plan.peak
    line = f"peak: stage {peak.stage}, {format_bytes(peak.total)}"
    if gpu_bytes:
        verdict = "fits" if peak.total <= 0.9 * gpu_bytes else "does NOT fit"
        line += f" of {format_bytes(gpu_bytes)} ({verdict} with 10% left for the CUDA context and fragmentation)"
    lines.append(line)
    return "\n".join(lines)


def fit_warning(config: RunConfig, world_size: int, gpu_bytes: int) -> Optional[str]:
    """A one-line warning when the planned peak rank exceeds ``gpu_bytes``, else None."""
    plan = plan_memory(config, world_size)
    peak = plan.peak
    if peak.total <= gpu_bytes:
        return None
    return (f"planned memory per rank {format_bytes(peak.total)} (pipeline stage {peak.stage}: "
            f"parameters {format_bytes(peak.parameters)}, gradients {format_bytes(peak.gradients)}, "
            f"optimizer {format_bytes(peak.optimizer)}, activations {format_bytes(peak.activations)} + "
            f"{format_bytes(peak.transient)} transient) exceeds this GPU's {format_bytes(gpu_bytes)}; "
            f"see `megatron-align plan-memory CONFIG --gpu-memory {gpu_bytes / GiB:.0f}GiB "
            f"--world {world_size}` for layouts that fit")
