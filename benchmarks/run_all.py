"""`make bench`: every benchmark behind BENCHMARKS.md, one after the other, with its defaults.

Long ones (the 410m export, the 160m eval, the kill/resume stress) take tens of minutes on a
2-core CPU box. The Megatron-LM preprocessing comparison needs `--megatron-lm DIR` (see
BENCHMARKS.md) and is run here for our side only. `gpu_mfu.py` needs a GPU and is not in this list.
Pass names to run a subset:
    python benchmarks/run_all.py train_step mixture
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "train_step": ["bench_train_step.py"],
    "attention": ["bench_attention.py"],
    "preprocess": ["bench_preprocess.py"],
    "filter": ["bench_filter.py"],
    "mixture": ["bench_mixture.py"],
    "export": ["bench_export.py"],
    "eval": ["bench_eval.py"],
    "checkpoint_save": ["bench_checkpoint_save.py"],
    "kill_resume": ["kill_resume_stress.py"],
}


def main(names) -> int:
    failed = []
    for name in names or BENCHMARKS:
        script, *args = BENCHMARKS[name]
        print(f"\n##### {name}: {script} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *args]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
