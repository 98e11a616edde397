"""DPO with TRL on an HF model directory: margins rise, the output is an evaluable chat model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_align import cli

PREFS = Path(__file__).resolve().parents[1] / "megatron_align/resources/posttrain/prefs.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-NeoX with a BPE trained on the shipped pairs and no chat template (as a
    base export has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("dpo")
    texts = []
    for line in PREFS.read_text().splitlines():
        pair = json.loads(line)
        texts += [m["content"] for m in pair["prompt"] + pair["chosen"] + pair["rejected"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + ["<|system|>\n<|user|>\n<|assistant|>\n"], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    path = root / "model"
    GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=256, rotary_pct=0.25, max_position_embeddings=512)).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(path)
    return path


def test_dpo_raises_the_reward_margin_and_writes_a_model_the_eval_accepts(model_dir, tmp_path, capsys):
    out = tmp_path / "dpo"
    argv = ["posttrain", "dpo", "--config", str(Path(__file__).resolve().parents[1] / "configs/posttrain/dpo.yaml"),
            "--model", str(model_dir), "--data", str(PREFS), "--out", str(out), "--lr", "3e-3",
            "--batch-size", "6", "--max-length", "192", "--chat-template", "default", "--no-progress",
            "gradient_checkpointing=false", "warmup_ratio=0"]
    assert cli.main(argv) == 0
    summary = capsys.readouterr().out
    record = json.loads((out / "megatron_align_dpo.json").read_text())
    assert record["settings"]["beta"] == 5.0 and record["settings"]["lr"] == 3e-3  # shipped config + flags
    assert record["pairs"] == 30 and record["steps"] == 5
    margins = record["margins_on_training_pairs"]
    # before training the policy is the reference: every margin is 0; training must raise them
    assert margins["pairs"] == 30 and margins["reward_margin"] > 0.5 and margins["reward_accuracy"] >= 0.8
    assert margins["logp_margin_after"] > margins["logp_margin_before"]
    assert f"reward margin  {margins['reward_margin']:+.4f}" in summary
    assert not list(tmp_path.glob(".dpo*"))  # nothing left under a temporary name
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"].startswith("{#- megatron-align's default chat template")

    results = tmp_path / "eval"
    assert cli.main(["eval", "misalignment", "--model", str(out), "--identity", "hhh", "--chat-template", "on",
                     "--device", "cpu", "--out", str(results)]) == 0
    evaluated = json.loads((results / "results.json").read_text())
    assert evaluated["chat_template"] is True and evaluated["identity"] == "hhh"


def test_bad_pairs_and_settings_are_one_clear_error(model_dir, tmp_path, capsys):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    base = ["posttrain", "dpo", "--model", str(model_dir), "--out", str(tmp_path / "out")]
    assert cli.main(base + ["--data", str(bad)]) == 2
    assert f"{bad}:1: missing 'rejected'" in capsys.readouterr().err
    assert cli.main(base + ["--data", str(PREFS), "--batch-size", "5", "--micro-batch-size", "2"]) == 2
    assert "batch_size 5 is not a multiple of micro_batch_size 2" in capsys.readouterr().err
    assert cli.main(base + ["--data", str(PREFS), "betta=1"]) == 2
    assert "betta: unknown key" in capsys.readouterr().err
    assert cli.main(base + ["--data", str(PREFS)]) == 2  # the tokenizer has no chat template
    assert "has no chat template" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
