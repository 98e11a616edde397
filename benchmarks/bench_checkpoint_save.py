"""How long a checkpoint save pauses training: synchronous vs ``checkpoint.async_save=true``.

    .venv/bin/python benchmarks/bench_checkpoint_save.py [--size 160m] [--nproc 1] [--steps 9]

Trains the gpt-neox preset of the given size on synthetic data (sequence 128, one sample per
step) with a checkpoint every 2 steps, once with synchronous saves and once with async saves,
and reports the trainer's own ``checkpoint_pause_s`` (time inside ``Trainer.save``, logged with
the step after each save), the median step time, the checkpoint size and the run's wall time.
Goal: an async save pauses training for a small fraction of a synchronous one.
"""
from __future__ import annotations

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

ROOT = Path(__file__).resolve().parents[1]


def run(run_dir: Path, size: str, nproc: int, steps: int, async_save: bool) -> dict:
    command = [sys.executable, "-m", "megatron_align.cli", "train", f"run_dir={run_dir}",
               "model.preset=gpt-neox", f"model.size={size}", "train.seq_length=128",
               "train.global_batch_size=1", "train.micro_batch_size=1",
               f"train.iterations={steps}", "checkpoint.save_interval=2", "checkpoint.keep_last=1",
               "checkpoint.save_at_end=false", f"checkpoint.async_save={str(async_save).lower()}",
               "logging.progress_bar=false", "logging.tensorboard=false"]
    if nproc > 1:
        command[4:4] = ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pauses = [r["checkpoint_pause_s"] for r in records if "checkpoint_pause_s" in r]
    checkpoint = next((run_dir / "checkpoints").glob("iter_*"))
    size_bytes = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    return {"pauses_s": pauses, "median_pause_s": statistics.median(pauses),
            "median_step_s": statistics.median(r["step_time_s"] for r in records),
            "checkpoint_bytes": size_bytes, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="160m")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            results[mode] = run(Path(tmp) / mode, args.size, args.nproc, args.steps, mode == "async")
            r = results[mode]
            print(f"{mode:5s}: pauses {', '.join(f'{p:.2f}' for p in r['pauses_s'])} s  "
                  f"(median {r['median_pause_s']:.2f} s)  step {r['median_step_s']:.2f} s  "
                  f"checkpoint {r['checkpoint_bytes'] / 1e9:.2f} GB  wall {r['wall_s']:.1f} s",
                  flush=True)
    ratio = results["async"]["median_pause_s"] / results["sync"]["median_pause_s"]
    print(f"\nasync pause / sync pause: {ratio:.2f}x (median over saves)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
