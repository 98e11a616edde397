"""Step time of the tiny gpt-neox at TP=1 / TP=2 / PP=2 / DP=2 on CPU: megatron-align's trainer vs a bare
megatron-core loop over the same model (our overhead; target <= 1.05x).

    python benchmarks/bench_train_step.py [--steps 40] [--repeats 3] [--layouts TP=1 TP=2 PP=2 DP=2]
                                          [--interleaved-steps 200]

Both sides: global batch 8, micro batch 2, seq 128, synthetic tokens, fp32, 1 thread per rank.
Each launch gives the median step time over the steps after a 5-step warm-up. The two sides
alternate (bare, ours, bare, ours, ...) so that a change in load hits both; the table shows the
best launch of each side and its ratio, and the median over rounds of the paired ratio ours/bare
with its range. Launches of the same command spread by 10-60% on a 2-core VM, so read a ratio
with its range.

The second table takes launch-to-launch spread out of it: in one launch per layout
(`interleaved_train_step.py`) the trainer's step and the bare step alternate on the same model
and optimizer; it gives the median of each and the median of the per-round ratios with its
interquartile range.
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
LAYOUTS = {"TP=1": (1, 1, 1), "TP=2": (2, 2, 1), "PP=2": (2, 1, 2), "DP=2": (2, 1, 1)}
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


def _torchrun(script, nproc, tp, pp, steps, tmp):
    """Run benchmarks/SCRIPT under torchrun; what it wrote to its output JSON."""
    out = Path(tmp) / f"{Path(script).stem}-{tp}-{pp}.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    str(REPO / "benchmarks" / script), str(tp), str(pp), str(steps), str(out)],
                   check=True, env=_env(), capture_output=True)
    return json.loads(out.read_text())


def bare(nproc, tp, pp, steps, tmp):
    times = _torchrun("bare_megatron_loop.py", nproc, tp, pp, steps, tmp)["step_time_s"]
    return statistics.median(times[WARMUP:])


def interleaved(nproc, tp, pp, steps, tmp):
    times = _torchrun("interleaved_train_step.py", nproc, tp, pp, steps, tmp)
    return times["bare_s"][WARMUP:], times["ours_s"][WARMUP:]


def _quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="launches per side (0: skip them)")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--interleaved-steps", type=int, default=200,
                        help="rounds of the one-process interleaved comparison (0: skip it)")
    args = parser.parse_args()
    print(f"load average at start: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.repeats > 0:
            print(f"separate launches, {args.repeats} per side")
            print(f"{'layout':8} {'bare megatron-core':>20} {'megatron-align':>16} {'best/best':>10} "
                  f"{'paired ratio, median [min, max]':>32}")
        for name in args.layouts if args.repeats > 0 else ():
            nproc, tp, pp = LAYOUTS[name]
            runs = [(bare(nproc, tp, pp, args.steps, tmp), ours(nproc, tp, pp, args.steps, tmp))
                    for _ in range(args.repeats)]
            b, o = min(r[0] for r in runs), min(r[1] for r in runs)
            paired = sorted(ours_s / bare_s for bare_s, ours_s in runs)
            print(f"{name:8} {b * 1000:17.1f} ms {o * 1000:13.1f} ms {o / b:9.3f}x "
                  f"{statistics.median(paired):15.3f}x [{paired[0]:.3f}, {paired[-1]:.3f}]", flush=True)
        if args.interleaved_steps > WARMUP + 1:
            print(f"\ninterleaved in one launch, {args.interleaved_steps} rounds")
            print(f"{'layout':8} {'bare megatron-core':>20} {'megatron-align':>16} {'ratio of medians':>17} "
                  f"{'per-round ratio, median [IQR]':>31}")
            for name in args.layouts:
                bare_s, ours_s = interleaved(*LAYOUTS[name], args.interleaved_steps, tmp)
                b, o = statistics.median(bare_s), statistics.median(ours_s)
                q1, q2, q3 = _quartiles([x / y for x, y in zip(ours_s, bare_s)])
                print(f"{name:8} {b * 1000:17.1f} ms {o * 1000:13.1f} ms {o / b:16.3f}x "
                      f"{q2:14.3f}x [{q1:.3f}, {q3:.3f}]", flush=True)


if __name__ == "__main__":
    main()
