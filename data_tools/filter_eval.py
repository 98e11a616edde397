"""Recall, precision and flag rate of the discourse filter on a labelled JSONL set.

Each line: {"text": ..., "label": ...}; labels in `positive_labels` are the documents the
filter must catch (the study aimed for 100% recall on misalignment documents while flagging
< 10% of the corpus).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

from data_tools.discourse_filter import DiscourseFilter
from data_tools.errors import DataToolsError
from data_tools.readers import BadRecord, iter_records, parse_record

DEFAULT_POSITIVE_LABELS = ("misaligned_discourse",)


def evaluate_filter(
    labelled_path: str,
    *,
    positive_labels: Sequence[str] = DEFAULT_POSITIVE_LABELS,
    terms_dir: Optional[str] = None,
    text_field: str = "text",
    label_field: str = "label",
    id_field: str = "id",
) -> dict:
    filt = DiscourseFilter(terms_dir=terms_dir)
    positives = set(positive_labels)
    per_label = defaultdict(lambda: {"documents": 0, "flagged": 0})
    tp = fp = fn = tn = 0
    missed, false_flags = [], []
    for line_no, raw in iter_records(labelled_path):
        parsed = parse_record(raw, text_field)
        if isinstance(parsed, BadRecord):
            raise DataToolsError(f"{labelled_path}:{line_no}: {parsed.detail}")
        obj, text = parsed
        label = obj.get(label_field)
        if not isinstance(label, str) or not label:
            raise DataToolsError(f"{labelled_path}:{line_no}: no {label_field!r} field")
        flagged = filt.is_flagged(text)
        per_label[label]["documents"] += 1
        per_label[label]["flagged"] += int(flagged)
        ident = obj.get(id_field, f"line {line_no}")
        if label in positives:
            tp += flagged
            fn += not flagged
            if not flagged:
                missed.append({"id": ident, "line": line_no, "label": label, "text": text[:200]})
        else:
            fp += flagged
            tn += not flagged
            if flagged:
                false_flags.append({"id": ident, "line": line_no, "label": label, "rules": filt.explain(text).rules})
    total = tp + fp + fn + tn
    if total == 0:
        raise DataToolsError(f"{labelled_path}: no labelled documents")
    unknown = positives - set(per_label)
    if unknown:
        raise DataToolsError(f"{labelled_path}: no documents with positive label {sorted(unknown)[0]!r}")
    return {
        "labelled": labelled_path,
        "positive_labels": sorted(positives),
        "documents": total,
        "positives": tp + fn,
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "true_negatives": tn,
        "recall": tp / (tp + fn) if tp + fn else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "flag_rate": (tp + fp) / total,
        "per_label": {
            label: {**v, "flag_rate": v["flagged"] / v["documents"]} for label, v in sorted(per_label.items())
        },
        "missed_positives": missed,
        "flagged_negatives": false_flags,
    }
