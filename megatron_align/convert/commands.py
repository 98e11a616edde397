"""CLI verbs: ``megatron-align export`` and ``megatron-align import`` (thin over the library)."""
from __future__ import annotations

import argparse
import sys


from .errors import ConvertError


def _errors():
    from data_tools.tokenizers import TokenizerError
    from megatron_align.checkpoint.dist_ckpt import CheckpointError
    from megatron_align.config import ConfigError

    from .errors import ConvertError, VerificationFailed

    return (ConvertError, VerificationFailed, CheckpointError, ConfigError, TokenizerError)


def _report(convert) -> int:
    """Run one conversion: its summary and exit 0, or one error line and exit 2."""
    try:
        result = convert()
    except _errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def _export(args) -> int:
    from .export import export_checkpoint

    def export():
        chat_template = None
        if args.chat_template:
            from data_tools.chat import resolve_chat_template
            from data_tools.errors import DataToolsError

            try:
                chat_template, _ = resolve_chat_template(args.chat_template, args.tokenizer or "")
            except DataToolsError as err:
                raise ConvertError(str(err)) from None
        return export_checkpoint(
            args.checkpoint, args.out_dir, tokenizer=args.tokenizer, dtype=args.dtype,
            verify=args.verify, max_shard_size=args.max_shard_size, threshold=args.threshold,
            overwrite=args.overwrite, progress=not args.no_progress, vocab_size=args.vocab_size,
            chat_template=chat_template)

    return _report(export)


def _import(args) -> int:
    from .hf_import import import_hf

    return _report(lambda: import_hf(
        args.hf_dir, args.out, tensor=args.tp, pipeline=args.pp, preset=args.preset,
        verify=args.verify, threshold=args.threshold, overwrite=args.overwrite))


def add_subcommands(subparsers) -> None:
    export = subparsers.add_parser(
        "export", help="megatron-align checkpoint (any TP/PP) -> Hugging Face model directory",
        description="Write an HF GPTNeoXForCausalLM / LlamaForCausalLM directory (sharded "
                    "safetensors, config, generation config, tokenizer) from a checkpoint, run dir "
                    "or checkpoints dir, in one process; verify logits against megatron-core.")
    export.add_argument("checkpoint", help="checkpoint dir (iter_XXXXXXX), run dir or checkpoints dir")
    export.add_argument("out_dir")
    export.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    export.add_argument("--tokenizer", help="tokenizer.json or SentencePiece .model "
                                            "(default: the run's data.tokenizer)")
    export.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="compare megatron and HF logits (default: on when both fit in memory)")
    export.add_argument("--threshold", type=float, default=1e-3, help="max |logit difference| allowed")
    export.add_argument("--vocab-size", type=int, metavar="N",
                        help="HF vocab_size, between the tokenizer's length and the checkpoint's "
                             "embedding rows (default: the run's model.vocab_size; e.g. 50304 "
                             "for Pythia's shape)")
    export.add_argument("--chat-template", metavar="FILE|default",
                        help="chat template for tokenizer_config.json (default: the one an SFT run's "
                             "data was rendered with, none for other runs; 'default': the shipped one)")
    export.add_argument("--max-shard-size", default="2GB")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    export.add_argument("--no-progress", action="store_true")
    export.set_defaults(func=_export)

    imp = subparsers.add_parser(
        "import", help="Hugging Face GPT-NeoX / Llama directory -> megatron-align checkpoint",
        description="Convert a local HF GPTNeoXForCausalLM or LlamaForCausalLM into OUT "
                    "(checkpoints/, config.yaml, tokenizer/); continue with "
                    "`megatron-align train OUT/config.yaml run_dir=NEW checkpoint.init_from=OUT`.")
    imp.add_argument("hf_dir")
    imp.add_argument("out")
    imp.add_argument("--tp", type=int, default=1, help="tensor parallel size the run will use")
    imp.add_argument("--pp", type=int, default=1, help="pipeline parallel size the run will use")
    imp.add_argument("--preset", choices=["auto", "gpt-neox", "llama"], default="auto")
    imp.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                     help="compare HF and megatron logits (default: on when both fit in memory)")
    imp.add_argument("--threshold", type=float, default=1e-3)
    imp.add_argument("--overwrite", action="store_true")
    imp.set_defaults(func=_import)
