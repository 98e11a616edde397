"""Export throughput (MB/s) and peak RSS versus weight size, gpt-neox 410m preset, CPU.

    .venv/bin/python benchmarks/bench_export.py [--workdir DIR] [--dtype fp32 bf16] [--verify]

Makes a 410m checkpoint once (``train.iterations=0``: initialise and save, one process, vocab
50277 with a matching word-level tokenizer), then exports it in a fresh process per dtype and
reports the export's own timing and the child's peak RSS (ru_maxrss). Goals: >= 500 MB/s and
peak RSS <= 1.3 x the exported weight bytes. Also reports the RSS of a process that only imports
the export code (interpreter + torch + megatron-core + transformers), for context.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50277

_CHILD = """
import json, resource, sys
from megatron_align.convert import export_checkpoint
result = export_checkpoint(sys.argv[1], sys.argv[2], dtype=sys.argv[3], verify=sys.argv[4] == "1",
                           progress=False, overwrite=True)
print(json.dumps({"seconds": result.seconds, "weights_seconds": result.weights_seconds,
                  "weight_bytes": result.weight_bytes,
                  "files": len(result.files), "parameters": result.num_parameters,
                  "verify": result.verify,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
_IMPORT_ONLY = """
import json, resource
import megatron_align.convert.export, megatron_align.convert.verify, transformers
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _word_level_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def _child(code: str, *args: str) -> dict:
    """Run ``python -c code args`` in a fresh process; its last stdout line is JSON (incl. its own
    peak RSS from getrusage)."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/bench_export")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--verify", action="store_true", help="also time the logit verification")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = work / "tokenizer.json"
    if not tokenizer.exists():
        _word_level_tokenizer(tokenizer)
    run_dir = work / "run-410m"
    if not (run_dir / "checkpoints" / "latest").exists():
        print("making the 410m checkpoint (train.iterations=0) ...", flush=True)
        start = time.time()
        subprocess.run([sys.executable, "-m", "megatron_align.cli", "train", f"run_dir={run_dir}",
                        "model.preset=gpt-neox", "model.size=410m", f"model.vocab_size={VOCAB}",
                        f"data.tokenizer={tokenizer}", "train.iterations=0", "train.seq_length=128",
                        "logging.progress_bar=false", "logging.tensorboard=false"],
                       check=True, cwd=ROOT, capture_output=True)
        print(f"  done in {time.time() - start:.0f} s", flush=True)

    baseline_rss = _child(_IMPORT_ONLY)["peak_rss_bytes"]
    rows = []
    for dtype in args.dtype:
        out = work / f"hf-{dtype}"
        result = _child(_CHILD, str(run_dir), str(out), dtype, "1" if args.verify else "0")
        rss = result["peak_rss_bytes"]
        weight_mb = result["weight_bytes"] / 1e6
        rows.append({
            "dtype": dtype, "parameters": result["parameters"], "weight_MB": round(weight_mb, 1),
            "files": result["files"], "seconds": round(result["seconds"], 2),
            "MB_per_s": round(weight_mb / result["seconds"], 1),
            "weights_seconds": round(result["weights_seconds"], 2),
            "streaming_MB_per_s": round(weight_mb / result["weights_seconds"], 1),
            "peak_rss_MB": round(rss / 1e6, 1),
            "rss_over_weights": round(rss / result["weight_bytes"], 2),
            "verify": None if not result["verify"] else
            {k: result["verify"][k] for k in ("passed", "max_abs_diff", "mean_kl", "top1_agreement")},
        })
        shutil.rmtree(out, ignore_errors=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "import_only_rss_MB": round(baseline_rss / 1e6, 1), "rows": rows}
    print(json.dumps(report, indent=2))
    print(f"\n{'dtype':6} {'weights MB':>11} {'total s':>8} {'MB/s':>7} {'stream MB/s':>12} "
          f"{'peak RSS MB':>12} {'RSS/weights':>12}")
    for row in rows:
        print(f"{row['dtype']:6} {row['weight_MB']:>11,.1f} {row['seconds']:>8.2f} {row['MB_per_s']:>7,.0f} "
              f"{row['streaming_MB_per_s']:>12,.0f} {row['peak_rss_MB']:>12,.0f} {row['rss_over_weights']:>12.2f}")
    print(f"(a process that only imports the export code peaks at {report['import_only_rss_MB']:,.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
