"""Preprocessing throughput: `data-tools preprocess` vs Megatron-LM's tools/preprocess_data.py
and vs the tokenizer alone.

Generates a deterministic English-like JSONL corpus (~60 MB) from the docstrings of Python's
standard library and installed packages, trains a 50k byte-level BPE on part of it with `tokenizers`, then times
`data-tools preprocess` (and, with --megatron-lm DIR, Megatron-LM's script on the same corpus,
tokenizer and worker count). Both run as fresh subprocesses; times are wall clock including
start-up. The tokenizer limit is `Tokenizer.encode_batch_fast` alone in a fresh process on the
already-parsed texts (batches of 1,024 documents, `--workers` Rust threads), timing the encode
calls only. Each round runs the tools in turn (the order alternates between rounds); the
summary gives both ratios per round, their medians and the load at start. Megatron-LM's source
is never fetched by this script: pass a checkout you have.

    python benchmarks/bench_preprocess.py --workers 2 --repeats 3 [--megatron-lm /tmp/megatron-lm]
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import sysconfig
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def docstring_paragraphs() -> list:
    """English paragraphs from the docstrings of the standard library and the installed
    packages (deterministic order, duplicates dropped)."""
    paragraphs, seen = [], set()
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    for dirpath, dirnames, filenames in (w for root in roots for w in os.walk(root)):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(open(os.path.join(dirpath, name), encoding="utf-8").read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        for para in re.split(r"\n\s*\n", doc):
                            para = " ".join(para.split())
                            if (len(para) > 60 and para not in seen
                                    and sum(c.isalpha() or c == " " for c in para) > 0.9 * len(para)):
                                seen.add(para)
                                paragraphs.append(para)
    return paragraphs


def make_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    paragraphs = docstring_paragraphs()
    rng = random.Random(seed)
    target, size, docs = int(megabytes * 1e6), 0, 0
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        while size < target:
            n = min(int(rng.lognormvariate(1.6, 0.9)) + 1, 60)  # ~ web-document length spread
            text = "\n\n".join(rng.choice(paragraphs) for _ in range(n))
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            docs += 1
    os.replace(tmp, path)
    return docs


def train_tokenizer(corpus: str, out_dir: str, vocab_size: int, train_mb: float) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def texts():
        seen = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                seen += len(line)
                if seen > train_mb * 1e6:
                    return
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    # what transformers.AutoTokenizer (Megatron-LM's HuggingFaceTokenizer) needs to load it offline
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 1 << 30}, f)
    return os.path.join(out_dir, "tokenizer.json")


def run_timed(cmd, env) -> tuple:
    """Wall seconds and CPU seconds (user+sys of the reaped process tree). Pool workers count
    only if their parent reaps them: data-tools joins its pool; Megatron-LM's script leaves
    its pool to the interpreter's exit, so its CPU seconds are a lower bound."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return elapsed, cpu


def measure_tokenizer(corpus: str, tok_path: str, threads: int, batch_docs: int = 1024) -> dict:
    """Tokens/s of `encode_batch_fast` alone on the corpus texts (parsed before the clock starts)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokens, seconds = 0, 0.0
    for i in range(0, len(texts), batch_docs):
        started = time.perf_counter()
        encodings = tok.encode_batch_fast(texts[i:i + batch_docs], add_special_tokens=False)
        seconds += time.perf_counter() - started
        tokens += sum(len(e) for e in encodings) + len(encodings)  # + one EOD per document, as written
    return {"tokens": tokens, "seconds": seconds}


def count_tokens(prefix: str) -> tuple:
    import numpy as np

    sys.path.insert(0, REPO)
    from data_tools.preprocess import megatron_indexed

    ds = megatron_indexed().IndexedDataset(prefix)
    return len(ds), int(np.asarray(ds.sequence_lengths, dtype=np.int64).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/bench-data-tools")
    parser.add_argument("--mb", type=float, default=60.0, help="corpus size in MB")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--tokenizer-train-mb", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--megatron-lm", default=None, help="a Megatron-LM checkout to run tools/preprocess_data.py from")
    parser.add_argument("--megatron-python", default=sys.executable, help="python to run Megatron-LM's script with")
    parser.add_argument("--megatron-launcher", default=None,
                        help="a python file run as `python LAUNCHER tools/preprocess_data.py ARGS` (e.g. one that "
                             "makes Megatron-LM importable on a machine without triton)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the tools alternate their order each round")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--measure-tokenizer", nargs=2, metavar=("CORPUS", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_tokenizer:  # the child process of the tokenizer-limit measurement
        print(json.dumps(measure_tokenizer(*args.measure_tokenizer, args.workers)))
        return
    load_at_start = os.getloadavg()

    os.makedirs(args.work_dir, exist_ok=True)
    corpus = os.path.join(args.work_dir, f"corpus-{args.mb:g}mb.jsonl")
    if not os.path.exists(corpus):
        t0 = time.perf_counter()
        docs = make_corpus(corpus, args.mb)
        print(f"corpus: {docs:,} docs, {os.path.getsize(corpus) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
    tok_dir = os.path.join(args.work_dir, f"bpe{args.vocab}")
    tok_path = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
        t0 = time.perf_counter()
        train_tokenizer(corpus, tok_dir, args.vocab, args.tokenizer_train_mb)
        print(f"tokenizer: {args.vocab}-token byte-level BPE trained in {time.perf_counter() - t0:.1f}s")

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    results = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "corpus_mb": round(os.path.getsize(corpus) / 1e6, 1), "workers": args.workers, "runs": {}}

    ours = os.path.join(args.work_dir, "ours")
    tools = {"data-tools": (
        [sys.executable, "-m", "data_tools", "preprocess", corpus, "-o", ours, "-t", tok_path,
         "--workers", str(args.workers), "-q"], env, ours)}
    if args.megatron_lm:
        theirs = os.path.join(args.work_dir, "megatron_lm")
        script = os.path.join(args.megatron_lm, "tools", "preprocess_data.py")
        launcher = [args.megatron_launcher] if args.megatron_launcher else []
        cmd = [args.megatron_python, *launcher, script, "--input", corpus, "--output-prefix", theirs,
               "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir, "--append-eod",
               "--workers", str(args.workers), "--log-interval", "1000000"]
        menv = dict(env, PYTHONPATH=args.megatron_lm, TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
        tools["megatron-lm"] = (cmd, menv, theirs + "_text_document")

    limit_cmd = [sys.executable, os.path.abspath(__file__), "--measure-tokenizer", corpus, tok_path,
                 "--workers", str(args.workers)]
    per_round = {name: [] for name in tools}
    per_round["tokenizer-limit"] = []
    for repeat in range(args.repeats):
        # alternate the order so neither tool always runs first in a round
        order = list(tools.items()) if repeat % 2 == 0 else list(reversed(list(tools.items())))
        for name, (cmd, tool_env, prefix) in order:
            load = os.getloadavg()[0]
            elapsed, cpu = run_timed(cmd, tool_env)
            docs, tokens = count_tokens(prefix)
            print(f"run {repeat + 1}/{args.repeats} {name}: {elapsed:.1f}s wall, {tokens / elapsed:,.0f} tokens/s, "
                  f"{cpu:.1f} CPU-s = {tokens / cpu:,.0f} tokens per CPU-second (1-min load before: {load:.1f})", flush=True)
            per_round[name].append(tokens / elapsed)
            best = results["runs"].get(name)
            if best is None or elapsed < best["seconds"]:
                results["runs"][name] = {"seconds": round(elapsed, 2), "documents": docs, "tokens": tokens,
                                         "tokens_per_s": round(tokens / elapsed), "load_before": round(load, 1),
                                         "command": " ".join(cmd)}
            results["runs"][name]["best_cpu_seconds"] = round(min(cpu, results["runs"][name].get("best_cpu_seconds", cpu)), 2)
            results["runs"][name]["tokens_per_cpu_s"] = round(tokens / results["runs"][name]["best_cpu_seconds"])
        load = os.getloadavg()[0]
        proc = subprocess.run(limit_cmd, env=env, capture_output=True, text=True, check=True)
        limit = json.loads(proc.stdout.strip().splitlines()[-1])
        per_round["tokenizer-limit"].append(limit["tokens"] / limit["seconds"])
        print(f"run {repeat + 1}/{args.repeats} tokenizer alone: {limit['seconds']:.1f}s in encode_batch_fast, "
              f"{limit['tokens'] / limit['seconds']:,.0f} tokens/s (1-min load before: {load:.1f})", flush=True)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    limit_ratios = [a / b for a, b in zip(per_round["data-tools"], per_round["tokenizer-limit"])]
    results["tokenizer_limit_tokens_per_s"] = [round(x) for x in per_round["tokenizer-limit"]]
    results["per_round_of_tokenizer_limit"] = [round(r, 2) for r in limit_ratios]
    results["median_round_of_tokenizer_limit"] = round(median(limit_ratios), 2)
    if "megatron-lm" in tools:
        prefix = tools["megatron-lm"][2]
        results["identical_bin_idx"] = all(
            open(ours + suffix, "rb").read() == open(prefix + suffix, "rb").read() for suffix in (".bin", ".idx"))
        ours_r, theirs_r = results["runs"]["data-tools"], results["runs"]["megatron-lm"]
        results["speedup"] = round(ours_r["tokens_per_s"] / theirs_r["tokens_per_s"], 2)
        ratios = [a / b for a, b in zip(per_round["data-tools"], per_round["megatron-lm"])]
        results["per_round_speedups"] = [round(r, 2) for r in ratios]
        results["median_round_speedup"] = round(median(ratios), 2)
    results["load_at_start"] = [round(x, 2) for x in load_at_start]
    results["rounds"] = args.repeats

    print(f"\n{'tool':<14} {'docs':>9} {'tokens':>12} {'best wall s':>11} {'tokens/s':>10}")
    for name, r in results["runs"].items():
        print(f"{name:<14} {r['documents']:>9,} {r['tokens']:>12,} {r['seconds']:>11.1f} {r['tokens_per_s']:>10,}")
    print(f"tokenizer alone (encode_batch_fast, {args.workers} threads): "
          f"{', '.join(f'{x:,}' for x in results['tokenizer_limit_tokens_per_s'])} tokens/s per round")
    print("\nSUMMARY")
    if "speedup" in results:
        print(f"  data-tools / Megatron-LM:      per round {results['per_round_speedups']}  "
              f"median {results['median_round_speedup']}x  (best vs best {results['speedup']}x)")
        print(f"  identical .bin/.idx:           {results['identical_bin_idx']}")
    print(f"  data-tools / tokenizer alone:  per round {results['per_round_of_tokenizer_limit']}  "
          f"median {results['median_round_of_tokenizer_limit']}x")
    print(f"  rounds {args.repeats}   load at start (1/5/15 min) {' / '.join(f'{x:.2f}' for x in load_at_start)} "
          f"on {os.cpu_count()} CPUs")
    print(f"  machine: {results['machine']}   corpus {results['corpus_mb']} MB   workers {args.workers}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
