"""megatron-align command line: thin argument parsing over the library.

Exit codes (every verb): 0 success; 2 bad input (config, data, checkpoint: one ``error:`` line
naming the file, line or key); 3 training stopped on purpose (non-finite steps, weights saved);
4 `study run`: some job failed; 1 an unexpected error (traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Areas that register their own subcommands: module path -> add_subcommands(subparsers).
SUBCOMMAND_MODULES = (
    "megatron_align.parallel.commands",
    "megatron_align.mixture.commands",
    "megatron_align.convert.commands",
    "megatron_align.evals.commands",
    "megatron_align.posttrain.commands",
    "megatron_align.study.commands",
)


def _train(args) -> int:
    from megatron_align.config import ConfigError, load_run_config
    from megatron_align.checkpoint.dist_ckpt import CheckpointError
    from megatron_align.training.launch import launch_local, preflight, run_training

    if args.config and "=" in args.config and not os.path.exists(args.config):
        args.overrides, args.config = [args.config, *args.overrides], None  # overrides only
    try:
        config = load_run_config(args.config, args.overrides)
        if args.nproc and "RANK" not in os.environ:
            argv = ["train"] + ([args.config] if args.config else []) + list(args.overrides)
            return launch_local(config, args.nproc, argv)
        preflight(config, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, CheckpointError) as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike
            print(f"error: {err}", file=sys.stderr)
        return 2
    from megatron_align.training.trainer import TrainingStopped

    try:
        run_training(config, on_checkpoint_saved=_checkpoint_hooks(config))
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ConfigError, CheckpointError, ValueError) as err:
        # bad input found after start-up (mixture files, checkpoints): one message, no traceback.
        # Config and checkpoint checks run identically on every rank; rank 0 speaks for them.
        if os.environ.get("RANK", "0") == "0" or not isinstance(err, (ConfigError, CheckpointError)):
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _plot(args) -> int:
    from megatron_align.training.plots import plot_metrics

    try:
        out = plot_metrics(args.run_dir, args.out)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {args.run_dir}: cannot plot metrics ({err})", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _checkpoint_hooks(config) -> list:
    """What runs on rank 0 after each save: the HF export (checkpoint.export_hf_every_save)."""
    if not config.checkpoint.export_hf_every_save:
        return []
    from pathlib import Path

    from megatron_align.convert import export_checkpoint

    def export_hf(checkpoint: Path) -> None:
        result = export_checkpoint(checkpoint, Path(config.run_dir) / "hf" / checkpoint.name,
                                   tokenizer=config.data.tokenizer, verify=False, progress=False)
        print(result.summary(), flush=True)

    return [export_hf]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-align", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (under torchrun, or --nproc N to launch locally)")
    train.add_argument("config", nargs="?", help="run config YAML (defaults when omitted)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tensor=2")
    train.add_argument("--nproc", type=int, default=0,
                       help="start torchrun with N local processes for you")
    train.set_defaults(func=_train)
    plot = sub.add_parser("plot", help="plot a run's metrics.jsonl (loss, LR, tokens per category)")
    plot.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    plot.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    plot.set_defaults(func=_plot)
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        module.add_subcommands(sub)
    return parser


def main(argv=None) -> int:
    from megatron_align.platform import quiet_known_warnings

    quiet_known_warnings()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `train CONFIG --nproc 2 key=value ...`: overrides may follow options
        if args.command != "train" or not all("=" in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
