"""The composition report: planned vs realised tables, plan.json and a stacked-composition PNG.

Realised numbers are passed in as arrays counted from megatron-core's BlendedDataset indices
(``MixtureDatasets.realised_samples`` / ``category_of_samples``), so this module needs no dataset.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Optional

import numpy as np

from megatron_align.io import atomic_path
from megatron_align.mixture.plan import MixturePlan, SourcePlan
from megatron_align.mixture.reads import DocumentReads


def _tokens(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def composition_tables(plan: MixturePlan, realised: Optional[np.ndarray] = None,
                       reads: Optional[dict[str, DocumentReads]] = None) -> str:
    """Per-source and per-category tables; ``realised`` is samples per (segment, source),
    ``reads`` the documents each source's samples read (first time / resumed / repeats)."""
    total = plan.num_samples
    realised_per_source = realised.sum(axis=0) if realised is not None else None
    rows = []
    for i, source in enumerate(plan.sources):
        row = [source.name, source.category, _tokens(source.train_tokens), _tokens(source.planned_tokens),
               f"{source.share:.3%}", f"{source.epochs:.2f}"]
        if realised is not None:
            row.append(f"{realised_per_source[i] / total:.3%}")
        if reads is not None:
            counted = reads[source.name]
            row += [str(counted.documents), str(counted.first_seen), str(counted.resumed), str(counted.repeats)]
        rows.append(row)
    header = ["source", "category", "train tokens", "planned", "share", "epochs"]
    if realised is not None:
        header.append("realised")
    if reads is not None:
        header += ["docs read", "first time", "resumed", "repeats"]
    out = [f"stage {plan.stage}: {plan.iterations} steps x {plan.global_batch_size} samples x "
           f"{plan.seq_length} tokens = {_tokens(plan.num_samples * plan.seq_length)} tokens "
           f"({len(plan.segments)} segment{'s' if len(plan.segments) != 1 else ''})",
           _table(header, rows)]
    out += [continuation_line(plan.stage, s) for s in plan.sources if s.continues is not None]
    out += [""]

    rows = []
    planned_categories = plan.category_samples()
    for c, category in enumerate(plan.categories):
        members = [i for i, s in enumerate(plan.sources) if s.category == category]
        row = [category, str(len(members)), _tokens(planned_categories[category] * plan.seq_length),
               f"{planned_categories[category] / total:.3%}"]
        if realised is not None:
            row.append(f"{realised_per_source[members].sum() / total:.3%}")
        rows.append(row)
    header = ["category", "sources", "planned", "share"] + (["realised"] if realised is not None else [])
    out += [_table(header, rows), ""]

    rows = []
    for s, segment in enumerate(plan.segments):
        shares = []
        for category in plan.categories:
            members = [i for i, src in enumerate(plan.sources) if src.category == category]
            counts = realised[s, members].sum() if realised is not None else \
                sum(segment.samples[plan.sources[i].name] for i in members)
            shares.append(f"{counts / segment.num_samples:.3%}")
        rows.append([f"[{segment.start_step}, {segment.end_step})", *shares])
    out += [_table(["steps", *plan.categories], rows)]
    return "\n".join(out)


def continuation_line(stage: str, source: SourcePlan) -> str:
    """Where the samples of a source that continues an earlier stage come from, in one line."""
    text = (f"{source.name}: continues stage {source.continues}'s stream at sample {source.stream_start:,} "
            f"(reads stream samples [{source.stream_start:,}, {source.stream_end:,}))")
    if len(source.stream) > 1 and source.stream[-1].stage == stage:  # a pass this stage added
        earlier = sum(p.length for p in source.stream[:-1])
        text += (f"; the earlier passes end at {earlier:,}, so the last "
                 f"{source.stream_end - max(earlier, source.stream_start):,} come from a new epoch")
    return text


def plan_summary(plan: MixturePlan, realised: Optional[np.ndarray] = None,
                 reads: Optional[dict[str, DocumentReads]] = None) -> dict:
    """plan.json content for one stage: the plan plus the realised counts and document reads."""
    summary = plan.to_dict()
    if reads is not None:
        summary["documents_read"] = {name: asdict(counted) for name, counted in reads.items()}
    if realised is not None:
        summary["realised"] = {
            "samples_per_segment_per_source": realised.tolist(),
            "share_per_source": {s.name: float(realised[:, i].sum() / plan.num_samples)
                                 for i, s in enumerate(plan.sources)},
            "share_per_category": {
                c: float(sum(realised[:, i].sum() for i, s in enumerate(plan.sources) if s.category == c)
                         / plan.num_samples) for c in plan.categories},
            "max_abs_share_error": float(np.abs(realised - plan.segment_matrix()).sum(axis=0).max()
                                         / plan.num_samples),
        }
    return summary


def step_composition(plan: MixturePlan, category_of_samples: Callable[[int, int], np.ndarray],
                     bins: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(bin start steps, fraction of each category per bin) read from the realised index."""
    edges = np.unique(np.linspace(0, plan.iterations, min(bins, plan.iterations) + 1).round().astype(np.int64))
    fractions = np.zeros((len(edges) - 1, len(plan.categories)))
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        ids = category_of_samples(int(lo) * plan.global_batch_size, int(hi) * plan.global_batch_size)
        fractions[b] = np.bincount(ids, minlength=len(plan.categories)) / max(len(ids), 1)
    return edges, fractions


def write_composition_png(path: str, plan: MixturePlan, edges: np.ndarray, fractions: np.ndarray) -> None:
    """Stacked composition over the stage's steps (top), and each category's share on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.repeat(edges, 2)[1:-1]
    y = np.repeat(fractions, 2, axis=0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1.3]})
    top.stackplot(x, y.T, labels=plan.categories, alpha=0.85)
    top.set_ylim(0, 1)
    top.set_ylabel("share of samples")
    top.set_title(f"{plan.mixture_name} / {plan.stage}: realised composition (plan {plan.hash[:12]})")
    top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    for c, category in enumerate(plan.categories):
        share = np.where(y[:, c] > 0, y[:, c], np.nan)
        bottom.plot(x, share, label=category)
    bottom.set_yscale("log")
    bottom.set_ylabel("share (log)")
    bottom.set_xlabel("step")
    for segment in plan.segments[1:]:
        for axis in (top, bottom):
            axis.axvline(segment.start_step, color="k", lw=0.6, ls="--")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
