"""Training-step time with SDPA core attention vs megatron-core's local DotProductAttention, on CPU.

    python benchmarks/bench_attention.py [--seq 512 2048] [--steps 8] [--repeats 2] [--preset gpt-neox llama]

Both sides are `megatron-align train` on one process (1 thread), fp32, synthetic tokens, global
batch 2 = micro batch 2, the tiny presets (2 layers, hidden 64, 4 heads; llama: 2 query groups),
differing only in `model.attention_backend` (sdpa | megatron). Median step time after 3 warm-up
steps; the best of --repeats launches, sides alternating. The load average at the start and
the end is printed: on a shared box, read the ratio, not the absolute times.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARMUP = 3


def step_time(backend: str, preset: str, seq: int, steps: int, tmp: str) -> float:
    run_dir = Path(tmp) / f"{preset}-{seq}-{backend}"
    subprocess.run([sys.executable, "-m", "megatron_align.cli", "train", f"run_dir={run_dir}",
                    f"model.preset={preset}", f"model.attention_backend={backend}",
                    f"train.seq_length={seq}", f"train.iterations={steps}", "train.global_batch_size=2",
                    "train.micro_batch_size=2", "train.precision=fp32", "logging.progress_bar=false",
                    "logging.tensorboard=false", "checkpoint.save_at_end=false"],
                   check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    times = [json.loads(line)["step_time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(times[WARMUP:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--preset", nargs="+", default=["gpt-neox", "llama"])
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"{'preset':9} {'seq':>5} {'megatron (local)':>17} {'sdpa':>10} {'sdpa/megatron':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.preset:
            for seq in args.seq:
                best = {"megatron": float("inf"), "sdpa": float("inf")}
                for _ in range(args.repeats):
                    for backend in best:
                        best[backend] = min(best[backend], step_time(backend, preset, seq, args.steps, tmp))
                print(f"{preset:9} {seq:5d} {best['megatron'] * 1000:14.1f} ms {best['sdpa'] * 1000:7.1f} ms "
                      f"{best['sdpa'] / best['megatron']:13.3f}x", flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
