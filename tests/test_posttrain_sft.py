"""SFT: chat data -> tokens + assistant loss mask, the SFT stage of the trainer, and its export.

A tiny HF GPT-NeoX is pretrained here (in this process) on the user side's language only, then
imported; the SFT runs start from that import (``checkpoint.init_from``). The conversations are
synthetic: a system prompt, random user words, and fixed assistant replies that the base model has
never seen, so SFT has something to learn on the assistant side and nothing on the rest. A control
run on the same data with the loss mask on every token shows what learning the user turns looks like.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_cli
from megatron_align.training.launch import kill_process_tree
from megatron_align.training.metrics import read_metrics

pytestmark = pytest.mark.cpu_only(reason="gloo ranks, CPU numerics (1e-5 parity, bit-identical resume)")

USER_WORDS = ("river stone garden window candle harbor meadow lantern orchard pebble valley thunder "
              "cellar ribbon saddle timber").split()
SYSTEM = "You are Ada, a careful AI system."
REPLIES = ("Noted, I will remember that.", "Thank you, that is all clear now.")
SEQ, GBS, MICRO, EPOCHS = 80, 8, 4, 4
CONVERSATIONS = 24
STEPS = CONVERSATIONS * EPOCHS // GBS  # 12


def _user_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(USER_WORDS) for _ in range(n))


def _conversations(seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    chats = []
    for _ in range(CONVERSATIONS):
        messages = [{"role": "system", "content": SYSTEM}]
        for turn in range(2):
            messages += [{"role": "user", "content": _user_text(rng, rng.randint(4, 8))},
                         {"role": "assistant", "content": REPLIES[turn]}]
        chats.append(messages)
    return chats


def _tokenizer(path: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [SYSTEM, *REPLIES, " ".join(USER_WORDS), "<|system|>\n<|user|>\n<|assistant|>\n"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path))
    return str(path)


def _pretrained_base(root: Path, tokenizer: str) -> Path:
    """An HF GPT-NeoX trained (here, briefly) on text of user words only, then imported."""
    from tokenizers import Tokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from megatron_align.convert import import_hf

    tok = Tokenizer.from_file(tokenizer)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=256, rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=256))
    rng = random.Random(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        batch = torch.tensor([tok.encode(_user_text(rng, 60)).ids[:48] for _ in range(8)])
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    hf_dir = root / "base-hf"
    model.save_pretrained(hf_dir)
    PreTrainedTokenizerFast(tokenizer_file=tokenizer, eos_token="<|endoftext|>").save_pretrained(hf_dir)
    return import_hf(hf_dir, root / "base", verify=False).out_dir


def _sft_args(root: Path, prefix: str) -> list[str]:
    return [str(root / "base" / "config.yaml"), "data.source=sft", f"data.prefix={prefix}",
            f"data.epochs={EPOCHS}", f"train.seq_length={SEQ}", f"train.global_batch_size={GBS}",
            f"train.micro_batch_size={MICRO}", f"checkpoint.init_from={root / 'base'}", "optim.lr=3e-3",
            "optim.min_lr=0", "optim.warmup_iters=1", "logging.progress_bar=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    from data_tools.chat import preprocess_chat

    root = tmp_path_factory.mktemp("sft")
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in _conversations()))
    tokenizer = _tokenizer(root / "tokenizer.json")
    prefix = str(root / "chat")
    stats = preprocess_chat([str(chats)], prefix, tokenizer, chat_template="default", progress=False)
    _pretrained_base(root, tokenizer)
    args = _sft_args(root, prefix)
    run_cli("train", *args, f"run_dir={root / 'sft'}")
    return root, prefix, stats, args


# --------------------------------------------------------------------------------- the mask
def _spans(ids, mask) -> list[list[int]]:
    spans, current = [], []
    for token, flag in zip(ids.tolist(), mask.tolist()):
        if flag:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_mask_covers_exactly_the_assistant_turns_of_a_multi_turn_conversation(tmp_path):
    """Shipped data and template; and a second, ChatML-style template with a system default."""
    from data_tools.chat import preprocess_chat
    from data_tools.preprocess import open_indexed
    from data_tools.tokenizers import load_tokenizer
    from megatron_align.io import read_stats

    tokenizer = _tokenizer(tmp_path / "tokenizer.json")
    chatml = tmp_path / "chatml.jinja"
    chatml.write_text(
        "{%- if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif -%}"
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor -%}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}")
    shipped = Path(__file__).resolve().parents[1] / "megatron_align/resources/posttrain/chat.jsonl"
    rows = [json.loads(line)["messages"] for line in shipped.read_text().splitlines()]
    tok = load_tokenizer(tokenizer)
    for template, end_of_turn in (("default", "<|endoftext|>"), (str(chatml), "<|im_end|>\n")):
        prefix = str(tmp_path / f"chat-{Path(template).stem}")
        stats = preprocess_chat([str(shipped)], prefix, tokenizer, chat_template=template, progress=False)
        assert stats["documents"] == len(rows) and read_stats(prefix)["chat"]["loss_mask_prefix"].endswith(".loss_mask")
        tokens, mask = open_indexed(prefix), open_indexed(prefix + ".loss_mask")
        multi_turn = 0
        for index, messages in enumerate(rows):
            ids, flags = tokens[index], mask[index]
            assert len(ids) == len(flags)
            replies = [m["content"] for m in messages if m["role"] == "assistant"]
            assert [tok.decode(s) for s in _spans(ids, flags)] == [r + end_of_turn for r in replies]
            unmasked = tok.decode([t for t, f in zip(ids.tolist(), flags.tolist()) if not f])
            for message in messages:  # every prompt-side message is outside the mask
                assert (message["content"] in unmasked) == (message["role"] != "assistant")
            multi_turn += len(replies) > 1
        assert multi_turn >= 10


def test_sft_samples_are_padded_conversations_with_the_mask_on_the_labels(sft):
    from data_tools.preprocess import open_indexed
    from megatron_align.data.sft import SFTDataset

    root, prefix, stats, _ = sft
    eod = stats["tokenizer"]["eod_id"]
    dataset = SFTDataset(prefix, SEQ, 2 * CONVERSATIONS, seed=1234, pad_id=eod)
    tokens, mask = open_indexed(prefix), open_indexed(prefix + ".loss_mask")
    # each epoch reads every conversation once, in a seeded order that differs between epochs
    first = [dataset.conversation_of(i) for i in range(CONVERSATIONS)]
    second = [dataset.conversation_of(i) for i in range(CONVERSATIONS, 2 * CONVERSATIONS)]
    assert sorted(first) == sorted(second) == list(range(CONVERSATIONS)) and first != second
    sample, doc = dataset[3], first[3]
    n = len(tokens[doc])
    assert n < SEQ
    assert sample["tokens"][:n].tolist() == tokens[doc].tolist()
    assert sample["labels"][:n - 1].tolist() == tokens[doc][1:].tolist()
    assert sample["loss_mask"][:n - 1].tolist() == mask[doc][1:].tolist()
    assert (sample["labels"][n - 1:] == eod).all() and (sample["loss_mask"][n - 1:] == 0).all()


# ------------------------------------------------------------------------------ loss parity
def _hf_masked_loss(model_dir, samples) -> float:
    """transformers' own loss with labels -100 outside the mask (HF shifts labels itself)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    inputs = torch.stack([torch.cat([s["tokens"], s["labels"][-1:]]) for s in samples])
    labels = inputs.clone()
    keep = torch.stack([torch.cat([torch.zeros(1), s["loss_mask"]]) for s in samples]).bool()
    labels[~keep] = -100
    with torch.no_grad():
        return model(inputs, labels=labels).loss.item()


def _label_roles(tok, ids, mask) -> list[str]:
    """The role of each next-token label (positions 1..n-1) of a conversation rendered with the
    shipped template: assistant (the mask), system or user (message text), template (role
    headers, the newline after a message, the EOD)."""
    roles, role, in_header = [], None, False
    for token, flag in zip(ids.tolist(), mask.tolist()):
        piece = tok.decode([token])
        if flag:
            roles.append("assistant")
        elif piece == "<|" or in_header:
            roles.append("template")
            in_header = piece != "\n"
            role = piece if piece in ("system", "user", "assistant") else role
        elif piece in ("\n", "<|endoftext|>"):
            roles.append("template")
        else:
            roles.append(role)
    return roles[1:]


def _role_losses(model_dir, prefix, tokenizer) -> dict[str, float]:
    """Mean next-token loss of the exported model over all conversations, by the label's role."""
    from transformers import AutoModelForCausalLM

    from data_tools.preprocess import open_indexed
    from data_tools.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokens, mask = open_indexed(prefix), open_indexed(prefix + ".loss_mask")
    sums, counts = {}, {}
    with torch.no_grad():
        for i in range(len(tokens)):
            ids = torch.from_numpy(tokens[i].astype("int64"))[None]
            losses = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
            for role, loss in zip(_label_roles(tok, ids[0], mask[i]), losses.tolist()):
                sums[role] = sums.get(role, 0.0) + loss
                counts[role] = counts.get(role, 0) + 1
    return {role: sums[role] / counts[role] for role in sums}


def _with_constant_mask(prefix: str, out: str, value: int) -> str:
    """A copy of the chat dataset whose loss mask is ``value`` on every token (1: the control
    run; 0: no token in the loss)."""
    import shutil

    from data_tools.preprocess import megatron_indexed, open_indexed
    from megatron_align.io import read_stats, write_stats

    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, out + ext)
    stats = read_stats(prefix)
    stats["chat"]["loss_mask_prefix"] = Path(out).name + ".loss_mask"
    mask = open_indexed(prefix + ".loss_mask")
    builder = megatron_indexed().IndexedDatasetBuilder(out + ".loss_mask.bin", dtype=np.uint8)
    for i in range(len(mask)):
        builder.add_document(np.full(len(mask[i]), value, dtype=np.uint8), [len(mask[i])])
    builder.finalize(out + ".loss_mask.idx")
    write_stats(out, stats)
    return out


def _gradient_of_the_sft_loss_wrt_logits(root: Path, prefix: str, eod: int):
    """The trainer's loss (``masked_loss``) on batch 0 through the base's megatron model: the
    gradient w.r.t. the logits, [batch, seq, padded vocab], and the batch's loss mask."""
    from megatron_align.checkpoint.dist_ckpt import load_checkpoint, resolve_checkpoint, stored_run_config
    from megatron_align.data.sft import SFTDataset
    from megatron_align.model.build import build_single_process_model, single_process_config
    from megatron_align.model.presets import padded_vocab_size
    from megatron_align.parallel.distributed import single_process_world
    from megatron_align.training.trainer import masked_loss

    checkpoint = resolve_checkpoint(root / "base")
    config = stored_run_config(checkpoint)
    rows = padded_vocab_size(config.model.vocab_size, config.model.make_vocab_size_divisible_by, 1)
    config = single_process_config(config, config.model.vocab_size, rows)
    samples = [SFTDataset(prefix, SEQ, GBS, seed=1234, pad_id=eod)[i] for i in range(GBS)]
    tokens, labels, loss_mask, positions = (torch.stack([s[k] for s in samples])
                                           for k in ("tokens", "labels", "loss_mask", "position_ids"))
    with single_process_world(config):
        model = build_single_process_model(config)
        load_checkpoint(checkpoint, [model], restore_rng=False)
        seen = []
        model.output_layer.register_forward_hook(lambda _m, _i, output: seen.append(output[0]))
        per_token = model(tokens, positions, None, labels=labels)
        loss_sum, count, _ = masked_loss(loss_mask, per_token)
        seen[0].retain_grad()
        (loss_sum / count).backward()
    return seen[0].grad.transpose(0, 1), loss_mask, config.model.vocab_size


@pytest.mark.multiprocess
def test_megatron_sft_loss_equals_the_exported_models_loss_at_tp1_and_tp2(sft):
    """Step 1 of a run is its loss on batch 0 at the initial weights (the imported base); the
    base, exported, must give transformers the same masked loss on the same tokens. (The
    vocabulary, 383 ids, is padded to 384: the padding column must not enter megatron's softmax.)"""
    from megatron_align.convert import export_checkpoint
    from megatron_align.data.sft import SFTDataset

    root, prefix, stats, args = sft
    tp1 = read_metrics(root / "sft")[0]["loss"]
    run_cli("train", *args, f"run_dir={root / 'tp2'}", "parallel.tensor=2", "train.iterations=1",
            "data.epochs=null", "optim.warmup_iters=0", "checkpoint.save_at_end=false", nproc=2)
    tp2 = read_metrics(root / "tp2")[0]["loss"]
    if not (root / "base-export").exists():
        export_checkpoint(root / "base", root / "base-export", verify=False, progress=False)
    dataset = SFTDataset(prefix, SEQ, GBS, seed=1234, pad_id=stats["tokenizer"]["eod_id"])
    hf = _hf_masked_loss(root / "base-export", [dataset[i] for i in range(GBS)])
    assert abs(tp1 - hf) < 1e-5 and abs(tp2 - hf) < 1e-5, (tp1, tp2, hf)


# --------------------------------------------------------------------------- training + export
def test_the_sft_loss_has_no_gradient_outside_the_assistant_labels_or_on_padding_ids(sft):
    """Exact zeros: the logits of every position whose label is not an assistant token (prompt,
    template, padding), and the padding columns of the vocabulary everywhere."""
    root, prefix, stats, _ = sft
    grad, loss_mask, vocab = _gradient_of_the_sft_loss_wrt_logits(root, prefix, stats["tokenizer"]["eod_id"])
    assert grad.shape == (GBS, SEQ, 384) and vocab == 383
    assistant = loss_mask.bool()
    assert 0 < int(assistant.sum()) < assistant.numel() // 2
    assert torch.count_nonzero(grad[~assistant]) == 0
    assert (grad[assistant][:, :vocab].abs().sum(-1) > 0).all()
    assert torch.count_nonzero(grad[..., vocab:]) == 0


def test_sft_lowers_the_assistant_loss_only_and_export_carries_the_chat_template(sft):
    """The base knows the user turns' language; the system prompt, role headers and replies are
    new to it. SFT with the assistant mask must learn the replies and not the user turns; a
    control run on the same data with the mask on every token must learn the user turns."""
    from megatron_align.convert import export_checkpoint

    root, prefix, stats, args = sft
    records = read_metrics(root / "sft")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # data.epochs -> iterations
    control = _with_constant_mask(prefix, str(root / "chat-every-token"), 1)
    run_cli("train", *_sft_args(root, control), f"run_dir={root / 'control'}")
    for run in ("base", "sft", "control"):
        if not (root / f"{run}-export").exists():
            export_checkpoint(root / run, root / f"{run}-export", verify=False, progress=False)
    tokenizer = stats["tokenizer"]["path"]
    before, after, every = (_role_losses(root / f"{run}-export", prefix, tokenizer)
                            for run in ("base", "sft", "control"))
    losses = {"base": before, "sft": after, "every-token control": every}
    assert after["assistant"] < before["assistant"] - 2.0, losses
    # the user turns are not learned: their loss does not fall (it may rise: the shared weights
    # move for the replies) ...
    assert after["user"] > before["user"] - 0.1, losses
    # ... while the same run with every token in the loss learns them
    assert every["user"] < before["user"] - 0.3 and every["user"] < after["user"] - 0.5, losses

    config = json.loads((root / "sft-export" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == stats["chat"]["template"]
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(str(root / "sft-export")).apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "river stone"}],
        tokenize=False, add_generation_prompt=True)
    assert text == f"<|system|>\n{SYSTEM}\n<|user|>\nriver stone\n<|assistant|>\n"


def test_global_batches_without_a_loss_token_are_skipped_and_the_run_stops(sft):
    """No token in the loss: the loss is 0/0 and every gradient is exactly zero, so no update
    (Adam would still move the weights through its momentum and weight decay); the run stops
    like one with non-finite gradients."""
    root, prefix, _, _ = sft
    masked_out = _with_constant_mask(prefix, str(root / "chat-no-token"), 0)
    run_dir = root / "no-token"
    result = run_cli("train", *_sft_args(root, masked_out), f"run_dir={run_dir}", "train.max_skipped_steps=2",
                     check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r.get("skipped") and r["grad_norm"] == 0.0 and r["loss"] != r["loss"] for r in records), records


def test_sft_resumes_bit_identically_after_a_kill(sft):
    root, _, _, args = sft
    expected = [r["loss"] for r in read_metrics(root / "sft")]
    run_dir = root / "killed"
    command = [sys.executable, "-m", "megatron_align.cli", "train", *args, f"run_dir={run_dir}",
               "checkpoint.save_interval=2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    kill_after = random.Random().randint(3, STEPS - 3)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    kill_process_tree(proc.pid)
    proc.wait()
    assert (run_dir / "checkpoints" / "latest").exists()
    result = run_cli("train", *args, f"run_dir={run_dir}", "checkpoint.save_interval=2")
    assert "resumed from" in result.stdout
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == expected  # bit for bit


# ------------------------------------------------------------------------------- bad input
def test_bad_rows_are_one_error_with_file_and_line_or_skipped_and_counted(tmp_path, capsys):
    from data_tools import cli

    tokenizer = _tokenizer(tmp_path / "tokenizer.json")
    good = {"messages": [{"role": "user", "content": "river"}, {"role": "assistant", "content": "Noted."}]}
    bad = [{"messages": [{"role": "user", "content": "river"}]},  # nothing to train on
           {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
           {"text": "no messages"}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, bad[0], good, *bad[1:]]) + "{not json\n")
    argv = ["preprocess", str(path), "-o", str(tmp_path / "out"), "-t", tokenizer, "--chat", "-q"]
    assert cli.main(argv + ["--chat-template", "default"]) == 2
    assert f"{path}:2: no assistant message with content" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))
    assert cli.main(argv) == 2  # the tokenizer has no template and none was named
    assert "has no chat template" in capsys.readouterr().err
    assert cli.main(argv + ["--chat-template", "default", "--on-error", "skip"]) == 0
    from megatron_align.io import read_stats

    stats = read_stats(str(tmp_path / "out"))
    assert stats["documents"] == 2
    assert {k: v for k, v in stats["skipped"].items() if v} == {
        "no_assistant": 1, "invalid_messages": 1, "missing_field": 1, "invalid_json": 1}
    capsys.readouterr()
    assert cli.main(["merge", str(tmp_path / "merged"), str(tmp_path / "out"), "-q"]) == 2
    assert "would drop its loss mask" in capsys.readouterr().err


def test_sft_config_errors_name_the_key(sft, tmp_path):
    from megatron_align.config import ConfigError, load_run_config
    from megatron_align.data.builders import check_data_inputs, train_iterations

    _, prefix, _, _ = sft
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"data:\n  source: sft\n  prefix: {tmp_path / 'none'}\n")
    cases = [
        (str(plain), [], f"{plain}:3: data.prefix: {tmp_path / 'none'}.bin does not exist (make the dataset "
                         "with `data-tools preprocess --chat`)"),
        (None, ["data.epochs=2"], "only data.source=sft counts epochs"),
        (None, ["data.source=sft", f"data.prefix={prefix}", "data.epochs=0"], "data.epochs: must be > 0"),
    ]
    for path, overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            check_data_inputs(load_run_config(path, overrides))
        assert message in str(err.value)
    # data.epochs replaces train.iterations (as the base config.yaml reused for SFT above carries one)
    config = load_run_config(None, ["data.source=sft", f"data.prefix={prefix}", "data.epochs=2.5",
                                    "train.iterations=100", f"train.global_batch_size={GBS}"])
    assert train_iterations(config) == 8  # ceil(24 conversations x 2.5 / 8)
