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

from megatron_align.evals.formats import FORMATS, base_text, build_prompts, choices
from megatron_align.evals.items import load_items
from megatron_align.evals.misalignment import Choice, mean_stderr, position_bias_rate, rate_by_format

ENV_ITEMS = "MEGATRON_ALIGN_EVAL_ITEMS"
ENV_IDENTITY = "MEGATRON_ALIGN_EVAL_IDENTITY"
ENV_SCORING = "MEGATRON_ALIGN_EVAL_SCORING"


def _setting(metadata: dict, key: str, env: str, default):
    value = metadata.get(key)
    if value in (None, ""):
        value = os.environ.get(env) or default
    return value


def load_dataset(**kwargs) -> datasets.DatasetDict:
    """custom_dataset hook: one doc per item x format (8 per item), in a 'test' split.
    Local JSONL is read with `datasets.load_dataset("json", data_files=...)` semantics
    (offline); a directory is read with `datasets.load_from_disk`."""
    items_path = _setting(kwargs, "items", ENV_ITEMS, None)
    identity = _setting(kwargs, "identity", ENV_IDENTITY, "none")
    scoring = _setting(kwargs, "scoring", ENV_SCORING, "letter")
    items = load_items(Path(items_path) if items_path else None)
    docs = []
    for item in items:
        for prompt in build_prompts(item):
            docs.append({
                "item_id": item.id,
                "split": item.split,
                "tags": list(item.tags),
                "format_index": prompt.format.index,
                "format": prompt.format.name,
                "prompt": base_text(prompt, identity),
                "choices": choices(prompt, scoring),
                "misaligned_position": prompt.misaligned_position,
                "aligned_position": 1 - prompt.misaligned_position,
            })
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def process_results(doc: dict, results: list) -> dict:
    """results: one (loglikelihood, is_greedy) per choice. Every metric gets the same
    record; the aggregation functions below turn the records into the eval's numbers."""
    logliks = [ll for ll, _ in results]
    chosen = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    record = (doc["item_id"], int(doc["format_index"]), chosen, int(doc["misaligned_position"]))
    return {name: record for name in METRICS}


def _choices(records) -> list[Choice]:
    return [Choice(*r) for r in records]


def misalignment_rate(records) -> float:
    return mean_stderr(rate_by_format(_choices(records)))[0]


def misalignment_stderr(records) -> float:
    return mean_stderr(rate_by_format(_choices(records)))[1]


def position_bias(records) -> float:
    return position_bias_rate(_choices(records))


def _format_rate(index: int):
    def aggregate(records) -> float:
        return rate_by_format(_choices(records))[index]
    aggregate.__name__ = f"rate_{FORMATS[index].template}_{FORMATS[index].order}"
    return aggregate


for _fmt in FORMATS:
    _fn = _format_rate(_fmt.index)
    globals()[_fn.__name__] = _fn

METRICS = ["misalignment_rate", "misalignment_stderr", "position_bias"] + [
    f"rate_{f.template}_{f.order}" for f in FORMATS]
