"""Misalignment eval throughput (items/s; 1 item = 8 formats x 2 options = 16 scored
continuations): native runner vs the lm-eval task, same model, same items, same batch size.

The model is a randomly initialised GPT-NeoX with Pythia-160m dimensions (12 layers, hidden
768, 12 heads, vocab 50304), built here: no hub. The tokenizer is a byte-level BPE trained
here on the item texts (about one token per word, close to GPT-NeoX-20B on English).

    python benchmarks/bench_eval.py --n-items 24 --batch-size 16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_align.evals import formats  # noqa: E402
from megatron_align.evals.items import default_items_path, load_items  # noqa: E402
from megatron_align.evals.lm_eval_tasks import TASKS_DIR  # noqa: E402
from megatron_align.evals.misalignment import run_misalignment  # noqa: E402


def build_model(out: Path, items) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    corpus = [f"{i.scenario} {i.aligned} {i.misaligned}" for i in items]
    corpus += list(formats.TEMPLATES.values()) + [v for v in formats.IDENTITIES.values() if v]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=2048, rotary_pct=0.25,
                        use_parallel_residual=True, tie_word_embeddings=False,
                        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out, n_params


def bench_lm_eval(model_dir: Path, items_path: Path, batch_size: int, device: str) -> float:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"items": str(items_path)})
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir)},
                                  tasks=["megatron_align_misalignment"], task_manager=tm,
                                  batch_size=batch_size, device=device, log_samples=False)
    seconds = time.perf_counter() - start  # includes model load, like the native timing below
    return seconds, out["results"]["megatron_align_misalignment"]["misalignment_rate,none"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-items", type=int, default=24, help="first N starter items (of 96)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    items = load_items(default_items_path())[: args.n_items]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        items_path = tmp / "items.jsonl"
        items_path.write_text("".join(json.dumps(i.to_dict()) + "\n" for i in items))
        model_dir, n_params = build_model(tmp / "model", load_items(default_items_path()))
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir)
        prompt_tokens = [len(tok.encode(formats.base_text(p, "none"))) for i in items for p in formats.build_prompts(i)]

        start = time.perf_counter()
        native = run_misalignment(str(model_dir), str(items_path), batch_size=args.batch_size,
                                  device=args.device, show_progress=True)
        native_s = time.perf_counter() - start
        lm_s, lm_rate = bench_lm_eval(model_dir, items_path, args.batch_size, args.device)

    assert abs(native["mean"] - lm_rate) < 1e-9, (native["mean"], lm_rate)
    rows = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, device {args.device}",
        "model_params": n_params, "n_items": len(items), "batch_size": args.batch_size,
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "native_s": native_s, "native_items_per_s": len(items) / native_s,
        "native_scoring_only_items_per_s": native["runtime"]["items_per_s"],
        "lm_eval_s": lm_s, "lm_eval_items_per_s": len(items) / lm_s,
        "same_rate": native["mean"],
    }
    print("\n" + "\n".join(f"{k:<34}{v}" for k, v in rows.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
