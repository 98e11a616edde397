"""CLI verb ``megatron-align posttrain dpo`` (thin over ``megatron_align.posttrain.dpo``)."""
from __future__ import annotations

import os
import sys

# flag -> settings key; a flag given on the command line wins over --config
FLAGS = {"beta": "beta", "lr": "lr", "epochs": "epochs", "batch_size": "batch_size",
         "micro_batch_size": "micro_batch_size", "max_length": "max_length", "chat_template": "chat_template"}


def _dpo(args) -> int:
    from megatron_align.config import ConfigError, load_config

    from .dpo import PosttrainError, run_dpo
    from .schema import DPOSettings

    overrides = [f"{key}={getattr(args, flag)}" for flag, key in FLAGS.items() if getattr(args, flag) is not None]
    try:
        settings = load_config(DPOSettings, args.config, [*overrides, *args.overrides])
        result = run_dpo(args.model, args.data, args.out, settings, overwrite=args.overwrite,
                         progress=not args.no_progress)
    except (ConfigError, PosttrainError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.summary())
    return 0


def add_subcommands(subparsers) -> None:
    parser = subparsers.add_parser("posttrain", help="post-training of exported HF models (DPO with TRL)")
    verbs = parser.add_subparsers(dest="posttrain_command", metavar="{dpo}")
    verbs.required = True
    p = verbs.add_parser(
        "dpo", help="DPO (TRL DPOTrainer, the input model as frozen reference) on an HF model directory",
        description="Train an HF model directory (e.g. an exported SFT run) with DPO on preference pairs "
                    "(JSONL/Parquet: prompt messages, chosen and rejected assistant replies) and write the "
                    "trained model as an HF directory. Settings: --config YAML (configs/posttrain/dpo.yaml: "
                    "the paper's beta 5, LR 1e-6, 1 epoch), then the flags, then key=value overrides.")
    p.add_argument("--model", required=True, help="HF model directory (with a chat template, or see --chat-template)")
    p.add_argument("--data", required=True, help="preference pairs: JSONL or Parquet file, glob or directory")
    p.add_argument("--out", required=True, help="output HF model directory")
    p.add_argument("--config", default=None, help="DPO settings YAML (default: the built-in paper defaults)")
    p.add_argument("--beta", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, help="pairs per optimizer step, over all processes")
    p.add_argument("--micro-batch-size", type=int, help="pairs per forward pass per process")
    p.add_argument("--max-length", type=int, help="prompt + completion tokens")
    p.add_argument("--chat-template", metavar="FILE|default", help="template for a model whose tokenizer has none")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any DPO setting, e.g. warmup_ratio=0")
    p.set_defaults(func=_dpo)
