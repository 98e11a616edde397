"""DPO with TRL on an exported HF model directory (``megatron-align posttrain dpo``).

``trl.DPOTrainer`` does the training, with the input model loaded a second time, frozen, as the
reference. Preference pairs are conversational (``prompt`` messages, ``chosen`` / ``rejected``
assistant replies), rendered with the model's chat template, which an SFT export carries. The
result is a complete HF directory (weights, config, tokenizer with the chat template in
tokenizer_config.json) assembled under a hidden name and renamed into place when done, ready for
``megatron-align eval misalignment --chat-template on``.

Runs on CPU (fp32) or GPU (bf16); under ``accelerate launch`` / ``torchrun`` TRL spreads the pairs
over the processes and only the main one writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .schema import DPOSettings

RECORD_FILE = "megatron_align_dpo.json"
ROLES = ("system", "user", "assistant")


class PosttrainError(ValueError):
    """Bad input (data, model dir, settings); the message names the file, line or key."""


# ----------------------------------------------------------------------------- data
def _messages(value, row: str, key: str, default_role: str) -> list[dict]:
    """A field as a message list: a string is one message of ``default_role``."""
    if isinstance(value, str):
        value = [{"role": default_role, "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        raise PosttrainError(f"{row}: {key!r} must be a string or a non-empty list of messages")
    messages = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise PosttrainError(f"{row}: {key}[{number}] is a {type(message).__name__}, not a message object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise PosttrainError(f"{row}: {key}[{number}] needs role in {'/'.join(ROLES)} and string content "
                                 f"(got role {role!r})")
        messages.append({"role": role, "content": content})
    return messages


def parse_pair(record, row: str) -> dict:
    if not isinstance(record, dict):
        raise PosttrainError(f"{row}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if record.get(k) is None]
    if missing:
        raise PosttrainError(f"{row}: missing {missing[0]!r} (a pair is prompt, chosen, rejected)")
    pair = {"prompt": _messages(record["prompt"], row, "prompt", "user")}
    for key in ("chosen", "rejected"):
        reply = _messages(record[key], row, key, "assistant")
        if reply[-1]["role"] != "assistant":
            raise PosttrainError(f"{row}: {key!r} must end with an assistant message")
        pair[key] = reply
    if pair["prompt"][-1]["role"] == "assistant":
        raise PosttrainError(f"{row}: the prompt ends with an assistant message; the reply belongs in chosen/rejected")
    return pair


def load_preferences(path: str | Path) -> list[dict]:
    """Preference pairs from JSONL or Parquet files (a file, glob or directory)."""
    from data_tools.errors import DataToolsError
    from data_tools.readers import iter_records, resolve_inputs

    pairs = []
    try:
        for file in resolve_inputs([str(path)]):
            for line, raw in iter_records(file):
                row = f"{file}:{line}"
                if isinstance(raw, (bytes, bytearray)):
                    try:
                        raw = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, ValueError) as err:
                        raise PosttrainError(f"{row}: not valid JSON ({err})") from None
                pairs.append(parse_pair(raw, row))
    except DataToolsError as err:
        raise PosttrainError(str(err)) from None
    if not pairs:
        raise PosttrainError(f"{path}: no preference pairs")
    return pairs


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _provenance(model_dir: Path) -> Optional[dict]:
    """What an export or an earlier DPO run recorded about the input model."""
    from megatron_align.convert.export import PROVENANCE_FILE

    for name in (PROVENANCE_FILE, RECORD_FILE):
        if (model_dir / name).is_file():
            record = json.loads((model_dir / name).read_text())
            record.pop("log_history", None)
            return {"file": name, **record}
    return None


# ----------------------------------------------------------------------------- margins
def _sequence_logp(model, prompt_ids: list[int], completion_ids: list[int], max_length: int) -> float:
    """Sum of log p(completion | prompt), the sequence cut to ``max_length`` as TRL cuts it."""
    import torch

    ids = (list(prompt_ids) + list(completion_ids))[:max_length]
    if len(ids) <= len(prompt_ids):
        return 0.0
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    logits = model(tokens).logits[0, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, tokens[0, 1:, None])[:, 0]
    return float(logp[len(prompt_ids) - 1:].sum())


def reward_margins(policy, reference, tokenized, beta: float, max_length: int) -> dict:
    """DPO's implicit reward margin beta * [(log pi/ref)(chosen) - (log pi/ref)(rejected)] on
    tokenized pairs (prompt_ids, chosen_ids, rejected_ids), and the log-prob margins behind it."""
    import torch

    margins, policy_gaps, reference_gaps = [], [], []
    with torch.no_grad():
        for pair in tokenized:
            logps = {}
            for name, model in (("policy", policy), ("reference", reference)):
                for side in ("chosen", "rejected"):
                    logps[name, side] = _sequence_logp(model, pair["prompt_ids"], pair[f"{side}_ids"], max_length)
            policy_gap = logps["policy", "chosen"] - logps["policy", "rejected"]
            reference_gap = logps["reference", "chosen"] - logps["reference", "rejected"]
            policy_gaps.append(policy_gap)
            reference_gaps.append(reference_gap)
            margins.append(beta * (policy_gap - reference_gap))
    n = len(margins)
    return {
        "pairs": n,
        "reward_margin": sum(margins) / n if n else None,
        "reward_accuracy": sum(m > 0 for m in margins) / n if n else None,
        "logp_margin_before": sum(reference_gaps) / n if n else None,
        "logp_margin_after": sum(policy_gaps) / n if n else None,
    }


# ----------------------------------------------------------------------------- training
@dataclass
class DPOResult:
    out_dir: Path
    pairs: int
    steps: int
    seconds: float
    train_loss: Optional[float]
    margins: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def summary(self) -> str:
        s = self.settings
        lines = [f"wrote {self.out_dir}",
                 f"  pairs          {self.pairs:,} x {s['epochs']:g} epoch(s) in {self.steps} steps "
                 f"(batch {s['batch_size']}, beta {s['beta']:g}, lr {s['lr']:g}, {s['loss_type']})",
                 f"  train loss     {self.train_loss:.4f}" if self.train_loss is not None else "  train loss     n/a",
                 f"  time           {self.seconds:.1f} s"]
        m = self.margins
        if m.get("pairs"):
            lines.append(f"  reward margin  {m['reward_margin']:+.4f} on {m['pairs']} training pairs "
                         f"({100 * m['reward_accuracy']:.1f}% > 0); log p(chosen) - log p(rejected): "
                         f"{m['logp_margin_before']:+.3f} before, {m['logp_margin_after']:+.3f} after")
        return "\n".join(lines)


def check_settings(settings: DPOSettings, world_size: int) -> int:
    """Gradient-accumulation steps per optimizer step; bad values name the key."""
    for key in ("beta", "epochs"):
        if getattr(settings, key) <= 0:
            raise PosttrainError(f"{key}: must be > 0, got {getattr(settings, key)}")
    if settings.lr < 0:
        raise PosttrainError(f"lr: must be >= 0, got {settings.lr}")
    if not 0 <= settings.warmup_ratio < 1:
        raise PosttrainError(f"warmup_ratio: must be in [0, 1), got {settings.warmup_ratio}")
    for key in ("batch_size", "micro_batch_size", "max_length", "logging_steps"):
        if getattr(settings, key) < 1:
            raise PosttrainError(f"{key}: must be >= 1, got {getattr(settings, key)}")
    per_step = settings.micro_batch_size * world_size
    if settings.batch_size % per_step:
        raise PosttrainError(f"batch_size {settings.batch_size} is not a multiple of micro_batch_size "
                             f"{settings.micro_batch_size} x {world_size} process(es) = {per_step}")
    return settings.batch_size // per_step


def _load_tokenizer(model_dir: Path, chat_template: Optional[str]):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if chat_template:  # the settings name one: it wins over the model's
        from data_tools.chat import resolve_chat_template
        from data_tools.errors import DataToolsError

        try:
            tokenizer.chat_template, _ = resolve_chat_template(chat_template, str(model_dir))
        except DataToolsError as err:
            raise PosttrainError(f"chat_template: {err}") from None
    if not tokenizer.chat_template:
        raise PosttrainError(f"{model_dir}: the tokenizer has no chat template (export an SFT run, whose data "
                             "carries one, or set chat_template: FILE or 'default')")
    return tokenizer


def _checkpointing_argument(config_class, enabled: bool) -> dict:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def run_dpo(model_dir: str | Path, data: str | Path, out_dir: str | Path,
            settings: Optional[DPOSettings] = None, *, overwrite: bool = False,
            progress: bool = True) -> DPOResult:
    """DPO-train ``model_dir`` on the pairs in ``data``; write the trained HF model to ``out_dir``."""
    settings = settings or DPOSettings()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    start = time.time()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = check_settings(settings, world_size)
    if not (model_dir / "config.json").is_file():
        raise PosttrainError(f"{model_dir}: not an HF model directory (no config.json)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise PosttrainError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    pairs = load_preferences(data)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from megatron_align.convert.export import move_into_place

    tokenizer = _load_tokenizer(model_dir, settings.chat_template)
    cuda = torch.cuda.is_available()
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and cuda)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)

    staging = out_dir.parent / f".{out_dir.name}.partial"
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    args = DPOConfig(
        output_dir=str(staging / "trainer"),
        beta=settings.beta,
        learning_rate=settings.lr,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        max_length=settings.max_length,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        loss_type=[settings.loss_type],
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=bf16,
        use_cpu=not cuda,
        **_checkpointing_argument(DPOConfig, settings.gradient_checkpointing),
        logging_steps=settings.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    try:
        trainer = DPOTrainer(model=model, ref_model=reference, args=args,
                             train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
        output = trainer.train()
        trainer.save_model(str(staging))
        margins = {}
        if main_process:
            shutil.rmtree(staging / "trainer", ignore_errors=True)
            for name in ("training_args.bin", "chat_template.jinja"):  # pickled args; the template goes below
                (staging / name).unlink(missing_ok=True)
            tokenizer.save_pretrained(str(staging), save_jinja_files=False)  # template in tokenizer_config.json
            if settings.margin_pairs:
                unwrap = trainer.accelerator.unwrap_model
                policy, ref = unwrap(trainer.model), unwrap(trainer.ref_model)
                policy.eval()
                subset = trainer.train_dataset.select(range(min(settings.margin_pairs, len(trainer.train_dataset))))
                margins = reward_margins(policy, ref, subset, settings.beta, settings.max_length)
            record = {
                "model": str(model_dir.resolve()), "model_provenance": _provenance(model_dir),
                "data": str(Path(data).resolve()),
                "data_sha256": file_sha256(Path(data)) if Path(data).is_file() else None,
                "pairs": len(pairs), "settings": asdict(settings), "world_size": world_size,
                "steps": trainer.state.global_step, "train_loss": output.training_loss,
                "margins_on_training_pairs": margins, "log_history": trainer.state.log_history,
                "seconds": round(time.time() - start, 2),
            }
            (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
            move_into_place(staging, out_dir)
        trainer.accelerator.wait_for_everyone()
    except BaseException:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return DPOResult(out_dir, len(pairs), trainer.state.global_step, time.time() - start,
                     output.training_loss, margins, asdict(settings))
