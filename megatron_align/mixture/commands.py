"""`megatron-align mixture plan MIXTURE [--stage S] [--out DIR] [--seq-length N] ...`"""
from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_align.mixture.schema import MixtureError, load_mixture


def add_subcommands(subparsers) -> None:
    mixture = subparsers.add_parser("mixture", help="data mixtures: resolve and inspect")
    verbs = mixture.add_subparsers(dest="mixture_command", metavar="{plan}", required=True)
    plan = verbs.add_parser(
        "plan", help="resolve a mixture into megatron-core blends and report the realised composition",
        description="Resolve each stage's rules into exact sample counts per source per window, build "
                    "the megatron-core BlendedDataset indices, and report planned vs realised shares "
                    "(table on screen, plan.json and composition-<stage>.png in --out), with how many "
                    "documents of each source every stage reads for the first time and how many again.")
    plan.add_argument("mixture", help="mixture YAML")
    plan.add_argument("--stage", help="one stage (default: every stage)")
    plan.add_argument("--out", help="directory for plan.json and the PNGs (default: no files)")
    plan.add_argument("--seq-length", type=int, help="when the mixture does not set seq_length")
    plan.add_argument("--global-batch-size", type=int, help="when the mixture does not set global_batch_size")
    plan.add_argument("--iterations", type=int, help="when the stage has no tokens/iterations budget")
    plan.add_argument("--seed", type=int, default=1234, help="data seed (default 1234, as `train`)")
    plan.add_argument("--cache-dir", help="megatron-core index cache (default: a temporary directory)")
    plan.add_argument("--no-realise", action="store_true",
                      help="only resolve the plan; skip building the BlendedDataset indices")
    plan.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    try:
        return _plan(args)
    except MixtureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    from megatron_align.io import write_json_atomic
    from megatron_align.mixture.plan import resolve_stage
    from megatron_align.mixture.report import (composition_tables, plan_summary, step_composition,
                                               write_composition_png)

    started = time.time()
    mixture = load_mixture(args.mixture)
    names = list(mixture.stages)
    stages = [mixture.stage(args.stage).name] if args.stage else names
    shape = dict(seq_length=args.seq_length, global_batch_size=args.global_batch_size)
    plans = {name: resolve_stage(mixture, name, iterations=args.iterations, **shape) for name in stages}
    # first reads are counted over every stage before the reported ones; those not reported are
    # planned from the mixture alone (the options are for the reported stages)
    counted = names[:names.index(stages[-1]) + 1]
    skipped_reads = None
    try:
        for name in counted:
            if name not in plans:
                plans[name] = resolve_stage(mixture, name)
    except MixtureError as err:
        skipped_reads = (f"documents read are not counted: an earlier stage cannot be planned from the "
                         f"mixture alone ({err})")
        counted = stages

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    built, reads = {}, {}
    if not args.no_realise:
        from megatron_align.mixture.datasets import build_mixture_datasets
        from megatron_align.mixture.reads import count_document_reads

        for name in counted:
            plan = plans[name]
            built[name] = build_mixture_datasets(
                mixture, name, seq_length=plan.seq_length, global_batch_size=plan.global_batch_size,
                train_iters=plan.iterations, seed=args.seed, cache_dir=args.cache_dir)
        if skipped_reads is None:
            reads = count_document_reads([built[name] for name in counted])
    summaries, pngs = {}, []
    for plan in (plans[name] for name in stages):
        datasets = built.get(plan.stage)
        realised = datasets.realised_samples() if datasets is not None else None
        print()
        print(composition_tables(plan, realised, reads.get(plan.stage)))
        for warning in plan.warnings:
            print(f"warning: {warning}")
        summaries[plan.stage] = plan_summary(plan, realised, reads.get(plan.stage))
        if args.out and realised is not None:
            edges, fractions = step_composition(plan, datasets.category_of_samples)
            png = os.path.join(args.out, f"composition-{plan.stage}.png")
            write_composition_png(png, plan, edges, fractions)
            pngs.append(png)
    plans = [plans[name] for name in stages]
    if skipped_reads and not args.no_realise:
        print(f"note: {skipped_reads}")

    print()
    print(f"mixture {mixture.name} ({args.mixture}): {len(plans)} stage(s) resolved in "
          f"{time.time() - started:.1f}s")
    for plan in plans:
        print(f"  {plan.stage}: plan {plan.hash[:16]}  {plan.iterations} steps  "
              f"{len(plan.segments)} segment(s)  {len(plan.warnings)} warning(s)")
    if args.out:
        path = os.path.join(args.out, "plan.json")
        write_json_atomic(path, {"mixture": os.path.abspath(args.mixture), "seed": args.seed,
                                 "stages": summaries})
        print(f"  wrote {path}" + "".join(f", {p}" for p in pngs))
    return 0


def main(argv=None) -> int:
    """Standalone entry point (the package CLI registers the same subcommand)."""
    parser = argparse.ArgumentParser(prog="megatron-align")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
