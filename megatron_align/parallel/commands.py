"""``megatron-align plan-memory``: per-rank memory of a run config, and the layouts that fit a GPU."""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_subcommands(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan-memory", help="per-rank memory of a run config; layouts that fit a GPU size",
        description="Bytes per rank for parameters, gradients, optimizer state (ZeRO-1 included) and "
                    "activations (per micro-batch and in flight under 1F1B) for the config's layout, "
                    "planned for GPU (train.precision=auto means bf16). With --gpu-memory, also the "
                    "layouts (TP/PP/VPP/DP, micro-batch, recompute, ZeRO-1) of --world ranks that fit.")
    plan.add_argument("config", nargs="?", help="run config YAML (defaults when omitted)")
    plan.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.size=6.9b")
    plan.add_argument("--gpu-memory", help="GPU memory per rank, e.g. 80GiB, 80GB, 141GB")
    plan.add_argument("--world", type=int, help="ranks (GPUs) in the job (default: TP x PP of the config)")
    plan.add_argument("--top", type=int, default=10, help="how many fitting layouts to list (default 10)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.set_defaults(func=run_plan_memory)


def run_plan_memory(args: argparse.Namespace) -> int:
    from megatron_align.config import ConfigError, load_run_config

    from .memory import parse_bytes, plan_memory, report, search_layouts

    if args.config and "=" in args.config and not os.path.exists(args.config):
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        gpu_bytes = parse_bytes(args.gpu_memory) if args.gpu_memory else None
    except ValueError as err:
        print(f"error: --gpu-memory: {err}", file=sys.stderr)
        return 2
    try:
        config = load_run_config(args.config, args.overrides)
        world = args.world or config.parallel.tensor * config.parallel.pipeline
        if world < 1:
            print(f"error: --world: {world} must be >= 1", file=sys.stderr)
            return 2
        plan = plan_memory(config, world)
        fits = search_layouts(config, world, gpu_bytes) if gpu_bytes else []
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = {"plan": plan.to_dict(), "gpu_memory_bytes": gpu_bytes}
        if gpu_bytes:
            out["fitting_layouts"] = [p.to_dict() for p in fits[:args.top]]
            out["fitting_layouts_total"] = len(fits)
        print(json.dumps(out, indent=1))
        return 0
    print(f"{config.model.preset} {config.model.size}, seq {config.train.seq_length}, "
          f"global batch {config.train.global_batch_size}")
    print(report(plan, gpu_bytes))
    if gpu_bytes:
        from .memory import format_bytes

        print(f"\nlayouts of {world} ranks that fit {format_bytes(gpu_bytes)} (peak <= 90%): {len(fits)}"
              + (f", the first {args.top}:" if len(fits) > args.top else ":"))
        for candidate in fits[:args.top]:
            print(f"  {candidate.describe_layout():<95} peak {format_bytes(candidate.peak.total)}")
        if not fits:
            print("  none: more ranks, a shorter sequence or a smaller global batch")
    return 0
