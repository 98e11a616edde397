"""Resolve one stage of a mixture into exact sample counts per source per window segment.

The stage's step axis is cut at every window boundary into segments. In each segment every active
rule becomes a token target; ``natural`` categories share what is left in proportion to their
sources' (train-split) tokens; within a category, sources are weighted by tokens. Targets become
whole samples (every megatron sample is ``seq_length`` tokens, so token shares and sample shares
are the same thing) by largest-remainder rounding inside each segment, so a segment holds exactly
``steps * global_batch_size`` samples and a windowed category never leaks outside its window.

Every source is read as a *stream*: one or more megatron-core ``GPTDataset`` passes over its
train split, back to back, each described by the stage whose data seed shuffles it and the
``num_samples`` it is built for (:class:`StreamPass`). A stage reads ``samples`` consecutive
samples of the stream from ``stream_start``. Normally the stream is the stage's own one pass and
``stream_start`` is 0. A source that ``continues`` an earlier stage takes over that stage's stream
(same passes, so the same shuffle) and starts where the earlier stage's planned samples end; when
those passes run out, a new pass (the next epoch, shuffled with this stage's seed) follows. The
offsets come from the earlier stage's plan, never from a run.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from megatron_align.mixture.schema import Mixture, MixtureError, Rule, Stage
from megatron_align.mixture.sources import SourceInfo, inspect_sources

PLAN_FORMAT = "megatron-align/mixture-plan/v1"
_SLACK = 1e-9  # relative tolerance when checking that fixed targets fit in a segment


@dataclass
class StreamPass:
    """One megatron-core GPTDataset over a source's train split: shuffled with ``stage``'s data
    seed, built for ``num_samples`` samples, holding ``length`` (whole epochs' worth)."""

    stage: str
    num_samples: int
    length: int


@dataclass
class SourcePlan:
    name: str
    category: str
    prefix: str
    documents: int
    tokens: int
    train_documents: int
    train_tokens: int
    samples: int  # planned samples over the whole stage
    planned_tokens: int  # samples * seq_length
    share: float  # of the stage's samples
    epochs: float  # planned tokens / train-split tokens
    continues: Optional[str] = None  # the earlier stage whose stream this source continues
    stream: list[StreamPass] = field(default_factory=list)
    stream_start: int = 0  # the stage reads stream samples [stream_start, stream_start + samples)

    @property
    def stream_end(self) -> int:
        return self.stream_start + self.samples

    def stream_windows(self) -> list[tuple[int, int, int]]:
        """(pass, first, end) sample ranges this stage reads, inside each pass it touches."""
        windows, offset = [], 0
        for number, stream_pass in enumerate(self.stream):
            lo = max(self.stream_start, offset) - offset
            hi = min(self.stream_end, offset + stream_pass.length) - offset
            if lo < hi:
                windows.append((number, lo, hi))
            offset += stream_pass.length
        return windows


@dataclass
class Segment:
    start_step: int
    end_step: int
    start_sample: int
    end_sample: int
    samples: dict[str, int]  # source name -> samples in this segment (exact)
    rules: dict[str, str]  # category -> the rule active here ("natural", "share 0.01", ...)

    @property
    def num_samples(self) -> int:
        return self.end_sample - self.start_sample


@dataclass
class MixturePlan:
    mixture_path: str
    mixture_name: str
    stage: str
    seq_length: int
    global_batch_size: int
    iterations: int
    num_samples: int
    valid_fraction: float
    categories: list[str]  # category_id indexes this list
    sources: list[SourcePlan]
    segments: list[Segment]
    vocab_size: int
    eod_id: int
    tokenizer: dict
    warnings: list[str] = field(default_factory=list)
    hash: str = ""

    @property
    def source_names(self) -> list[str]:
        return [source.name for source in self.sources]

    def category_id(self, category: str) -> int:
        return self.categories.index(category)

    def source_category_ids(self) -> np.ndarray:
        """category id of every source, indexed like ``sources``."""
        return np.array([self.category_id(s.category) for s in self.sources], dtype=np.int16)

    def segment_matrix(self) -> np.ndarray:
        """Planned samples, shape (segments, sources)."""
        return np.array([[seg.samples[name] for name in self.source_names] for seg in self.segments],
                        dtype=np.int64)

    def category_samples(self) -> dict[str, int]:
        totals = dict.fromkeys(self.categories, 0)
        for source in self.sources:
            totals[source.category] += source.samples
        return totals

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **asdict(self)}

    def normalised(self) -> dict:
        """What identifies the data a run reads: no paths, no warnings, no hash."""
        return {
            "format": PLAN_FORMAT,
            "stage": self.stage,
            "seq_length": self.seq_length,
            "global_batch_size": self.global_batch_size,
            "iterations": self.iterations,
            "valid_fraction": self.valid_fraction,
            "categories": self.categories,
            "tokenizer_sha256": self.tokenizer.get("sha256"),
            "sources": [_normalised_source(s) for s in self.sources],
            "segments": [{"steps": [seg.start_step, seg.end_step],
                          "samples": [seg.samples[name] for name in self.source_names]}
                         for seg in self.segments],
        }


def _normalised_source(source: SourcePlan) -> dict:
    entry = {"name": source.name, "category": source.category, "documents": source.documents,
             "tokens": source.tokens}
    if source.continues is not None:  # only then: plans without continuation keep their hash
        entry.update(continues=source.continues, stream_start=source.stream_start,
                     stream=[asdict(p) for p in source.stream])
    return entry


def gpt_dataset_length(train_tokens: int, seq_length: int, num_samples: int) -> int:
    """Samples in a megatron-core GPTDataset built for ``num_samples``: it holds whole epochs, as
    many as the samples (plus the one extra label token) need, cut into ``seq_length`` pieces
    with the last partial piece dropped (checked against the built dataset)."""
    needed = num_samples * seq_length + 1
    epochs = max(1, -(-needed // train_tokens))
    return (epochs * train_tokens - 1) // seq_length


def stage_iterations(mixture: Mixture, stage: Optional[str], *, seq_length: Optional[int] = None,
                     global_batch_size: Optional[int] = None) -> int:
    """The number of steps a stage's budget asks for (what a run's ``train_iters`` should be)."""
    stage_ = mixture.stage(stage)
    seq, gbs = _shape(mixture, stage_, seq_length, global_batch_size)
    return _iterations(stage_, seq, gbs, None)


def resolve_stage(mixture: Mixture, stage: Optional[str] = None, *, seq_length: Optional[int] = None,
                  global_batch_size: Optional[int] = None, iterations: Optional[int] = None,
                  sources: Optional[dict[str, SourceInfo]] = None) -> MixturePlan:
    """Resolve ``stage`` into a :class:`MixturePlan`.

    ``seq_length``, ``global_batch_size`` and ``iterations`` come from the run; when the mixture
    also states them they must agree (a mismatch is an error that shows both numbers). A stage
    that continues earlier ones resolves them too, from the mixture alone.
    """
    infos = dict(sources) if sources is not None else {}
    return _resolve(mixture, stage, seq_length, global_batch_size, iterations, infos, {})


def _resolve(mixture: Mixture, stage: Optional[str], seq_length: Optional[int],
             global_batch_size: Optional[int], iterations: Optional[int],
             known_sources: dict[str, SourceInfo], earlier_plans: dict[str, MixturePlan]) -> MixturePlan:
    stage_ = mixture.stage(stage)
    seq, gbs = _shape(mixture, stage_, seq_length, global_batch_size)
    steps = _iterations(stage_, seq, gbs, iterations)

    used_categories = [c for c in mixture.categories if stage_.rule_for(c) is not None]
    used_sources = [s for s in mixture.sources if s.category in used_categories]
    for category in used_categories:
        if not any(s.category == category for s in used_sources):
            raise MixtureError(f"{stage_.rule_for(category).where}: no source has category {category!r}")
    missing = [s.name for s in used_sources if s.name not in known_sources]
    if missing:
        known_sources.update(inspect_sources(mixture, missing))
    infos = {s.name: known_sources[s.name] for s in used_sources}

    windows = {rule.category: _window_steps(rule, steps) for rule in stage_.rules}
    cuts = sorted({0, steps, *(b for window in windows.values() for b in window)})
    segments: list[Segment] = []
    category_tokens = {c: sum(i.train_tokens for i in infos.values() if i.category == c) for c in used_categories}
    all_tokens = sum(category_tokens.values())
    stage_tokens = steps * gbs * seq

    for start, end in zip(cuts[:-1], cuts[1:]):
        samples = (end - start) * gbs
        targets = _segment_targets(stage_, windows, start, end, samples * seq, stage_tokens,
                                   category_tokens, all_tokens)
        quotas = {}
        for info in infos.values():
            category_target = targets.get(info.category, 0.0)
            quotas[info.name] = category_target / seq * info.train_tokens / category_tokens[info.category]
        counts = _largest_remainder(quotas, samples)
        active = {c: stage_.rule_for(c).describe() for c in used_categories if c in targets}
        segments.append(Segment(start, end, start * gbs, end * gbs, counts, active))

    warnings = []
    source_plans = []
    total_samples = steps * gbs
    for info in infos.values():
        planned = sum(seg.samples[info.name] for seg in segments)
        epochs = planned * seq / info.train_tokens
        if epochs > mixture.max_epochs:
            warnings.append(f"source {info.name!r} ({info.category}) is read {epochs:.1f} times "
                            f"(more than max_epochs {mixture.max_epochs:g}): repeated data")
        source_plan = SourcePlan(info.name, info.category, info.prefix, info.documents, info.tokens,
                                 info.train_documents, info.train_tokens, planned, planned * seq,
                                 planned / total_samples, epochs)
        earlier, where = stage_.continuation(info.category)
        if earlier is not None and mixture.stage(earlier).rule_for(info.category) is not None:
            earlier_plan = _earlier_plan(mixture, earlier, where, known_sources, earlier_plans)
            warnings += _continue_stream(source_plan, earlier_plan, stage_.name, seq, where)
            warnings += _skipped_stages(mixture, stage_.name, earlier, info)
        else:
            source_plan.stream = [StreamPass(stage_.name, max(planned, 1),
                                             gpt_dataset_length(info.train_tokens, seq, max(planned, 1)))]
        source_plans.append(source_plan)
    for plan in source_plans:
        if plan.samples == 0:
            warnings.append(f"source {plan.name!r} ({plan.category}) gets no sample in stage {stage_.name!r}")

    first = next(iter(infos.values()))
    plan = MixturePlan(
        mixture_path=mixture.path, mixture_name=mixture.name, stage=stage_.name, seq_length=seq,
        global_batch_size=gbs, iterations=steps, num_samples=total_samples,
        valid_fraction=mixture.valid_fraction, categories=used_categories, sources=source_plans,
        segments=segments, vocab_size=first.tokenizer["vocab_size"], eod_id=first.tokenizer["eod_id"],
        tokenizer=dict(first.tokenizer), warnings=warnings,
    )
    plan.hash = hashlib.sha256(json.dumps(plan.normalised(), sort_keys=True).encode()).hexdigest()
    return plan


def _earlier_plan(mixture: Mixture, earlier: str, where: str, known_sources: dict[str, SourceInfo],
                  earlier_plans: dict[str, MixturePlan]) -> MixturePlan:
    """The plan of an earlier stage, from the mixture alone (its run is not at hand)."""
    if earlier not in earlier_plans:
        try:
            earlier_plans[earlier] = _resolve(mixture, earlier, None, None, None, known_sources, earlier_plans)
        except MixtureError as err:
            raise MixtureError(f"{where}: continuing stage {earlier!r} needs that stage's plan from the "
                               f"mixture alone (its seq_length, global_batch_size and budget): {err}") from None
    return earlier_plans[earlier]


def _continue_stream(source: SourcePlan, earlier_plan: MixturePlan, stage: str, seq: int,
                     where: str) -> list[str]:
    """``source`` (of ``stage``) reads the stream of the same source in ``earlier_plan`` from where
    that stage stopped; returns warnings."""
    if earlier_plan.seq_length != seq:
        raise MixtureError(
            f"{where}: stage {earlier_plan.stage!r} reads source {source.name!r} in samples of "
            f"{earlier_plan.seq_length} tokens and this stage in samples of {seq}; a continued stream is "
            "counted in samples, so both stages need the same seq_length")
    before = next(s for s in earlier_plan.sources if s.name == source.name)
    source.continues = earlier_plan.stage
    source.stream_start = before.stream_end
    source.stream = list(before.stream)
    available = sum(p.length for p in source.stream)
    if source.stream_end <= available:
        return []
    more = source.stream_end - available  # the earlier passes run out: the next epoch follows
    source.stream.append(StreamPass(stage, more, gpt_dataset_length(source.train_tokens, seq, more)))
    return [f"source {source.name!r} continues stage {earlier_plan.stage!r} past the end of its "
            f"stream: {more} of its {source.samples} samples come from a new epoch (documents read again)"]


def _skipped_stages(mixture: Mixture, stage: str, earlier: str, info: SourceInfo) -> list[str]:
    """Stages between ``earlier`` and ``stage`` that read the source too: ``stage`` does not
    continue their reading of it."""
    names = list(mixture.stages)
    between = names[names.index(earlier) + 1:names.index(stage)]
    readers = [name for name in between if mixture.stages[name].rule_for(info.category) is not None]
    if not readers:
        return []
    return [f"source {info.name!r}: stage {stage!r} continues stage {earlier!r}, but "
            f"{', '.join(repr(r) for r in readers)} (in between) read{'s' if len(readers) == 1 else ''} it "
            f"too; to go on after {readers[-1]!r}, write continues: {readers[-1]}"]


def _shape(mixture: Mixture, stage: Stage, seq_length: Optional[int],
           global_batch_size: Optional[int]) -> tuple[int, int]:
    values = []
    for key, from_run in (("seq_length", seq_length), ("global_batch_size", global_batch_size)):
        stated, where = getattr(stage, key), f"{stage.where}.{key}"
        if stated is None:
            stated, where = getattr(mixture, key), mixture.where.get(key, mixture.path)
        if from_run is not None and stated is not None and from_run != stated:
            raise MixtureError(f"{where}: the mixture says {key} {stated} but the run uses {from_run}")
        value = from_run if from_run is not None else stated
        if value is None:
            raise MixtureError(f"{stage.where}: {key} is not set (set it in the stage, at the top of "
                               f"the mixture, or pass it from the run / --{key.replace('_', '-')})")
        values.append(int(value))
    return values[0], values[1]


def _iterations(stage: Stage, seq: int, gbs: int, from_run: Optional[int]) -> int:
    if stage.iterations is not None:
        stated = stage.iterations
    elif stage.tokens is not None:
        exact = stage.tokens / (seq * gbs)
        stated = max(1, int(round(exact)))
        if from_run is not None and abs(from_run - exact) < 1:
            stated = from_run  # rounding the token budget either way is fine
    else:
        stated = None
    if from_run is not None and stated is not None and from_run != stated:
        raise MixtureError(f"{stage.budget_where}: the stage budget is {stated} iterations "
                           f"(seq_length {seq} x global_batch_size {gbs}) but the run trains {from_run}")
    steps = from_run if from_run is not None else stated
    if steps is None:
        raise MixtureError(f"{stage.where}: no budget: set 'tokens' or 'iterations' in the stage "
                           "(or pass the run's iterations / --iterations)")
    if steps < 1:
        raise MixtureError(f"{stage.where}: the stage has {steps} iterations")
    return int(steps)


def _window_steps(rule: Rule, steps: int) -> tuple[int, int]:
    window = rule.window
    if window.kind == "steps" and window.end > steps:
        raise MixtureError(f"{window.where}: window steps [{window.start}, {window.end}) lies outside "
                           f"the stage (steps 0..{steps})")
    start, end = window.step_range(steps)
    if end <= start:
        raise MixtureError(f"{window.where}: window {window.describe()} selects no step of a "
                           f"{steps}-step stage")
    return start, end


def _segment_targets(stage: Stage, windows: dict[str, tuple[int, int]], start: int, end: int,
                     segment_tokens: int, stage_tokens: int, category_tokens: dict[str, int],
                     all_tokens: int) -> dict[str, float]:
    """Token target per active category in the segment [start, end)."""
    fixed: dict[str, float] = {}
    natural: list[str] = []
    for rule in stage.rules:
        w_start, w_end = windows[rule.category]
        if not (w_start <= start and end <= w_end):
            continue
        in_window = (end - start) / (w_end - w_start)
        if rule.kind == "natural":
            natural.append(rule.category)
        elif rule.kind == "share":
            fixed[rule.category] = rule.value * stage_tokens * in_window
        elif rule.kind == "window_share":
            fixed[rule.category] = rule.value * segment_tokens
        elif rule.kind == "tokens":
            fixed[rule.category] = rule.value * in_window
        else:  # upsample: k times the category's natural share
            fixed[rule.category] = rule.value * category_tokens[rule.category] / all_tokens * segment_tokens

    used = sum(fixed.values())
    if used > segment_tokens * (1 + _SLACK):
        parts = ", ".join(f"{c} {t / segment_tokens:.2%}" for c, t in fixed.items())
        raise MixtureError(f"{stage.where}: steps [{start}, {end}): the rules ask for "
                           f"{used / segment_tokens:.2%} of the tokens ({parts}); shares must sum to <= 100%")
    remainder = max(0.0, segment_tokens - used)
    if natural:
        pool = sum(category_tokens[c] for c in natural)
        for category in natural:
            fixed[category] = remainder * category_tokens[category] / pool
    elif remainder > segment_tokens * 1e-6:
        raise MixtureError(f"{stage.where}: steps [{start}, {end}): the rules fill only "
                           f"{used / segment_tokens:.2%} of the tokens and no category is 'natural' "
                           "there to take the rest")
    return fixed


def _largest_remainder(quotas: dict[str, float], total: int) -> dict[str, int]:
    """Whole counts summing to ``total``, each within 1 of its quota (ties: first source first)."""
    floors = {name: int(math.floor(q)) for name, q in quotas.items()}
    missing = total - sum(floors.values())
    eligible = [name for name in quotas if quotas[name] > 0]  # a zero quota stays zero (windows)
    order = sorted(eligible, key=lambda name: -(quotas[name] - floors[name]))
    for name in order[:max(0, missing)]:
        floors[name] += 1
    if missing < 0:  # floating point pushed the floors over the total
        for name in sorted(eligible, key=lambda name: quotas[name] - floors[name])[:-missing]:
            floors[name] -= 1
    return floors
