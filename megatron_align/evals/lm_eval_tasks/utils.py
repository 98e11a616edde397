"""Helpers for the megatron_align_misalignment lm-eval task.

Settings come from lm-eval's task metadata (`--metadata '{"items": ..., "identity": ...,
"scoring": ...}'`), else from the environment (MEGATRON_ALIGN_EVAL_ITEMS,
MEGATRON_ALIGN_EVAL_IDENTITY, MEGATRON_ALIGN_EVAL_SCORING), else the defaults (the packaged
starter items, identity none, letter scoring). Prompts and aggregation are the native
runner's own functions, so both give the same numbers."""
from __future__ import annotations

import os
from pathlib import Path

import datasets

from megatron_align.evals.formats import PROMPT_STYLES, base_text, choices, prompts_for
from megatron_align.evals.items import load_items
from megatron_align.evals.misalignment import (Choice, make_choice, outcome_matrix, position_bias_rate,
                                               rate_by_format, summarize)
from megatron_align.evals.statistics import item_bootstrap_ci

ENV_ITEMS = "MEGATRON_ALIGN_EVAL_ITEMS"
ENV_IDENTITY = "MEGATRON_ALIGN_EVAL_IDENTITY"
ENV_SCORING = "MEGATRON_ALIGN_EVAL_SCORING"


def _setting(metadata: dict, key: str, env: str, default):
    value = metadata.get(key)
    if value in (None, ""):
        value = os.environ.get(env) or default
    return value


def _load(kwargs: dict, style: str) -> datasets.DatasetDict:
    items_path = _setting(kwargs, "items", ENV_ITEMS, None)
    identity = _setting(kwargs, "identity", ENV_IDENTITY, "none")
    scoring = _setting(kwargs, "scoring", ENV_SCORING, "letter")
    items = load_items(Path(items_path) if items_path else None)
    docs = []
    for item in items:
        for prompt in prompts_for(item, style):
            docs.append({
                "item_id": item.id,
                "split": item.split,
                "tags": list(item.tags),
                "format_index": prompt.format.index,
                "format": prompt.format.name,
                "style": style,
                "scoring": scoring,
                "prompt": base_text(prompt, identity),
                "choices": choices(prompt, scoring),
                "misaligned_position": prompt.misaligned_position,
                "aligned_position": 1 - prompt.misaligned_position,
            })
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_dataset(**kwargs) -> datasets.DatasetDict:
    """custom_dataset hook: one doc per item x format, in a 'test' split. Local JSONL or a
    `save_to_disk` directory (offline)."""
    return _load(kwargs, "project")


def load_published_dataset(**kwargs) -> datasets.DatasetDict:
    return _load(kwargs, "published")


def process_results(doc: dict, results: list) -> dict:
    """results: one (loglikelihood, is_greedy) per choice. Every metric gets the same
    record; the aggregation functions below turn the records into the eval's numbers."""
    c = make_choice(doc["item_id"], int(doc["format_index"]), int(doc["misaligned_position"]),
                    [ll for ll, _ in results], doc["choices"], doc["scoring"])
    record = (c.item_id, c.format_index, c.chosen_position, c.misaligned_position, c.scores, c.letter_mass)
    return {name: record for name in METRICS[doc["style"]]}


def _choices(records) -> list[Choice]:
    return [Choice(i, f, ch, m, tuple(sc), mass) for i, f, ch, m, sc, mass in records]


def _aggregations(formats) -> dict:
    def summary(records) -> dict:
        return summarize(_choices(records), formats)

    def per_format(index: int):
        return lambda records: rate_by_format(_choices(records), formats)[index]

    fns = {
        "misalignment_rate": lambda r: summary(r)["mean"],
        "misalignment_stderr": lambda r: summary(r)["stderr"],
        "misalignment_ci_low": lambda r: item_bootstrap_ci(outcome_matrix(_choices(r), len(formats)))[0],
        "misalignment_ci_high": lambda r: item_bootstrap_ci(outcome_matrix(_choices(r), len(formats)))[1],
        "position_bias": lambda r: position_bias_rate(_choices(r), formats),
        "p_misaligned": lambda r: summary(r)["p_misaligned"],
        "p_first": lambda r: summary(r)["p_first"],
        "letter_mass": lambda r: summary(r)["letter_mass"],
        "margin": lambda r: summary(r)["margin"],
    }
    fns.update({f"rate_{f.template}_{f.order}": per_format(f.index) for f in formats})
    return fns


METRICS: dict[str, list[str]] = {}   # prompt style -> metric names of its task
for _style, _formats in PROMPT_STYLES.items():
    METRICS[_style] = []
    for _name, _fn in _aggregations(_formats).items():
        METRICS[_style].append(_name)
        _fn.__name__ = _name if _style == "project" else f"{_style}_{_name}"
        globals()[_fn.__name__] = _fn
