"""Step time of the tiny gpt-neox at TP=1 / TP=2 / PP=2 on CPU: megatron-align's trainer vs a bare
megatron-core loop over the same model (our overhead; target <= 1.05x).

    python benchmarks/bench_train_step.py [--steps 40] [--repeats 3] [--layouts TP=1 TP=2 PP=2]

Both sides: global batch 8, micro batch 2, seq 128, synthetic tokens, fp32, 1 thread per rank.
Median step time over the steps after a 5-step warm-up; the best of --repeats launches, the
two sides alternating (bare, ours, bare, ours, ...) so that a change in load hits both.
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
LAYOUTS = {"TP=1": (1, 1, 1), "TP=2": (2, 2, 1), "PP=2": (2, 1, 2)}
WARMUP = 5


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def ours(nproc, tp, pp, steps, tmp):
    run_dir = Path(tmp) / f"ours-{tp}-{pp}"
    subprocess.run([sys.executable, "-m", "megatron_align.cli", "train", "--nproc", str(nproc),
                    f"run_dir={run_dir}", f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
                    f"train.iterations={steps}", "train.global_batch_size=8", "train.micro_batch_size=2",
                    "train.seq_length=128", "logging.progress_bar=false", "checkpoint.save_at_end=false",
                    "logging.tensorboard=false"],
                   check=True, env=_env(), capture_output=True)
    times = [json.loads(l)["step_time_s"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(times[WARMUP:])


def bare(nproc, tp, pp, steps, tmp):
    out = Path(tmp) / f"bare-{tp}-{pp}.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    str(REPO / "benchmarks" / "bare_megatron_loop.py"), str(tp), str(pp), str(steps), str(out)],
                   check=True, env=_env(), capture_output=True)
    return statistics.median(json.loads(out.read_text())["step_time_s"][WARMUP:])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    args = parser.parse_args()
    print(f"{'layout':8} {'bare megatron-core':>20} {'megatron-align':>16} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts:
            nproc, tp, pp = LAYOUTS[name]
            runs = [(bare(nproc, tp, pp, args.steps, tmp), ours(nproc, tp, pp, args.steps, tmp))
                    for _ in range(args.repeats)]
            b, o = min(r[0] for r in runs), min(r[1] for r in runs)
            print(f"{name:8} {b * 1000:17.1f} ms {o * 1000:13.1f} ms {o / b:6.3f}x", flush=True)


if __name__ == "__main__":
    main()
