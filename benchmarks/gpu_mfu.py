"""GPU throughput and MFU of `megatron-align train`: our layer spec vs megatron-core's local spec
vs the local spec with SDPA attention, in one run.

    python benchmarks/gpu_mfu.py [--nproc 1] [--steps 30] [--warmup 10] [--micro-batch 4]
                                 [--global-batch 32] [--seq 2048] [--out gpu_mfu.json]

Models: the gpt-neox 1.4b (Pythia-1.4B) and llama 1b (Llama-3.2-1B) presets, bf16, seq 2048,
synthetic tokens, `--nproc` GPUs as data parallel ranks (torchrun via `train --nproc`). Variants
(the same architecture, only the spec differs):

    ours      model.transformer_impl=auto, model.attention_backend=auto: TransformerEngine layers
              and TE attention when TE is importable, else the local layers with SDPA
    local     model.transformer_impl=local, model.attention_backend=megatron: megatron-core's local
              spec as it is (DotProductAttention materialises the s x s scores)
    sdpa      model.transformer_impl=local, model.attention_backend=sdpa

Numbers: median step time over the steps after --warmup; tokens/s = global batch x seq / step
time (all GPUs); model FLOPs per token

    F = 6 N + 12 L h s

(N: parameters without the input embedding, so the output layer's matmul is counted; L layers,
h hidden size, s sequence length: the attention score and value matmuls, forward + backward,
counted for the full s x s square as Megatron-LM and PaLM do); TFLOP/s per GPU = F x tokens/s /
GPUs; MFU against the bf16 dense datasheet peak of the GPU (H100/H200 SXM 989, A100 312, B200
2250 TFLOP/s) and against a measured peak (the best of bf16 8192^3 matmuls on this GPU).

Without CUDA it stops, unless --allow-cpu: a smoke test of the script itself, e.g.

    --allow-cpu --precision fp32 --vocab 512 --models gpt-neox:tiny llama:tiny --seq 128
    --steps 3 --warmup 1 --micro-batch 2 --global-batch 4

(fp32: bf16 matmuls are very slow on CPUs without bf16 units).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_align.config import load_run_config  # noqa: E402
from megatron_align.model.presets import padded_vocab_size, resolve_architecture  # noqa: E402
from megatron_align.parallel.memory import chunk_parameters  # noqa: E402
from megatron_align.training.metrics import PEAK_BF16_TFLOPS  # noqa: E402

VARIANTS = {
    "ours": ["model.transformer_impl=auto", "model.attention_backend=auto"],
    "local": ["model.transformer_impl=local", "model.attention_backend=megatron"],
    "sdpa": ["model.transformer_impl=local", "model.attention_backend=sdpa"],
}


def model_flops_per_token(preset: str, size: str, seq: int, vocab: int) -> tuple[float, int]:
    """(6 N + 12 L h s, N) for the preset, N without the input embedding (parameters as the
    memory planner lists them, which match the published Pythia and Llama counts)."""
    arch = resolve_architecture(load_run_config(None, [f"model.preset={preset}", f"model.size={size}"]).model)
    params = chunk_parameters(arch, padded_vocab_size(vocab, 128, 1), tensor=1, layers=arch.num_layers,
                              pre_process=True, post_process=True, pipeline=1)
    n = sum(p.numel for p in params if p.name != "embedding.word_embeddings.weight")
    if arch.tie_embeddings:  # the output layer is the embedding: its matmul still counts
        n += padded_vocab_size(vocab, 128, 1) * arch.hidden_size
    return 6.0 * n + 12.0 * arch.num_layers * arch.hidden_size * seq, n


def datasheet_peak() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return name, PEAK_BF16_TFLOPS[key]
    return name, None


def measured_matmul_peak(repeats: int = 20) -> float:
    """Best TFLOP/s of an n^3 matmul: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU."""
    cuda = torch.cuda.is_available()
    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (1024, torch.float32, "cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def run_variant(preset, size, variant, vocab, args, tmp) -> dict:
    run_dir = Path(tmp) / f"{preset}-{size}-{variant}"
    command = [sys.executable, "-m", "megatron_align.cli", "train", f"run_dir={run_dir}",
               f"model.preset={preset}", f"model.size={size}", f"model.vocab_size={vocab}",
               *VARIANTS[variant], f"train.precision={args.precision}", f"train.seq_length={args.seq}",
               f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.global_batch}",
               f"train.iterations={args.warmup + args.steps}", "logging.progress_bar=false",
               "logging.tensorboard=false", "checkpoint.save_at_end=false", "optim.warmup_iters=1"]
    if args.nproc > 1:
        command[4:4] = ["--nproc", str(args.nproc)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = statistics.median(r["step_time_s"] for r in records[args.warmup:])
    return {"step_time_s": step, "tokens_per_s": args.global_batch * args.seq / step,
            "final_loss": records[-1]["loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt-neox:1.4b", "llama:1b"], help="PRESET:SIZE ...")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (data parallel ranks)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, help="unpadded vocabulary of the synthetic data (default: the "
                                                  "preset's, 50277 for gpt-neox, 128256 for llama)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--out", help="also write the results as JSON")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (smoke test only)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA device: this benchmark measures GPUs (--allow-cpu for a smoke test)",
              file=sys.stderr)
        return 2
    gpu, datasheet = datasheet_peak()
    measured = measured_matmul_peak()
    te = "yes" if torch.cuda.is_available() and __import__("importlib").util.find_spec("transformer_engine") else "no"
    header = {"device": gpu, "gpus": args.nproc, "torch": torch.__version__, "transformer_engine": te,
              "python": platform.python_version(), "datasheet_tflops": datasheet,
              "measured_matmul_tflops": measured, "seq": args.seq, "micro_batch": args.micro_batch,
              "global_batch": args.global_batch, "precision": args.precision, "flops_formula": "6 N + 12 L h s (N without input embedding)"}
    print(json.dumps(header))
    print(f"{'model':16} {'variant':7} {'step':>9} {'tokens/s':>10} {'TFLOP/s/GPU':>12} "
          f"{'MFU(sheet)':>10} {'MFU(meas)':>10}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            preset, size = model.split(":")
            vocab = args.vocab or resolve_architecture(
                load_run_config(None, [f"model.preset={preset}", f"model.size={size}"]).model).default_vocab_size
            flops, params = model_flops_per_token(preset, size, args.seq, vocab)
            for variant in args.variants:
                result = run_variant(preset, size, variant, vocab, args, tmp)
                row = {"model": model, "variant": variant, "params_without_embedding": params, **result}
                if "error" in result:
                    print(f"{model:16} {variant:7} failed: {result['error']}", flush=True)
                else:
                    tflops = flops * result["tokens_per_s"] / args.nproc / 1e12
                    row.update(tflops_per_gpu=tflops, mfu_datasheet=tflops / datasheet if datasheet else None,
                               mfu_measured_peak=tflops / measured)
                    sheet = f"{row['mfu_datasheet']:.1%}" if datasheet else "n/a"
                    print(f"{model:16} {variant:7} {result['step_time_s'] * 1000:7.0f}ms "
                          f"{result['tokens_per_s']:10.0f} {tflops:12.1f} {sheet:>10} "
                          f"{row['mfu_measured_peak']:10.1%}", flush=True)
                rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({**header, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
