"""AI-discourse filter throughput (MB/s of JSONL input).

Uses the English-like corpus of bench_preprocess.py (generated if missing) and reports:
  - end to end `filter_corpus` (read, JSON-decode, match, write retained/flagged/report) for
    each worker count;
  - the matcher alone over in-memory texts: ours (`DiscourseFilter.is_flagged`: one scan of the
    lower-cased text with the union trie of all terms, categories resolved at each hit) versus
    the straightforward design, one re.IGNORECASE search per category, with trie-compiled or
    plain `a|b|c` alternations. All three must flag exactly the same documents.

    python benchmarks/bench_filter.py --mb 60 --workers 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from bench_preprocess import make_corpus  # noqa: E402
from data_tools.discourse_filter import (  # noqa: E402
    ALL_CATEGORIES, ENTITY_CATEGORY, INSTANT_CATEGORIES, NEGATIVE_CATEGORIES, DiscourseFilter, compile_category,
)
from data_tools.filter_corpus import filter_corpus  # noqa: E402


def plain_alternation(terms):
    alts = sorted((re.escape(t).replace(r"\ ", r"\s+").replace(r"\*", r"\w*") for t in terms), key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)


class PerCategorySearch:
    """The straightforward matcher: one case-insensitive search per category."""

    def __init__(self, patterns):
        self.instant = [patterns[c] for c in INSTANT_CATEGORIES]
        self.entity = patterns[ENTITY_CATEGORY]
        self.negative = [patterns[c] for c in NEGATIVE_CATEGORIES]

    def is_flagged(self, text):
        if any(p.search(text) for p in self.instant):
            return True
        return bool(self.entity.search(text)) and any(p.search(text) for p in self.negative)


def matcher_mb_s(filt, texts, total_mb: float) -> tuple:
    started = time.perf_counter()
    flags = [filt.is_flagged(t) for t in texts]
    return total_mb / (time.perf_counter() - started), flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/bench-data-tools")
    parser.add_argument("--mb", type=float, default=60.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--matcher-docs", type=int, default=5000, help="documents for the matcher-only comparison")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    os.makedirs(args.work_dir, exist_ok=True)
    corpus = os.path.join(args.work_dir, f"corpus-{args.mb:g}mb.jsonl")
    if not os.path.exists(corpus):
        make_corpus(corpus, args.mb)
    size_mb = os.path.getsize(corpus) / 1e6
    results = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "corpus_mb": round(size_mb, 1), "end_to_end": {}, "matcher": {}}

    for workers in args.workers:
        out = os.path.join(args.work_dir, f"filter-out-w{workers}")
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        started = time.perf_counter()
        report = filter_corpus([corpus], out, workers=workers, progress=False)
        elapsed = time.perf_counter() - started
        results["end_to_end"][f"workers={workers}"] = {
            "seconds": round(elapsed, 2), "mb_per_s": round(size_mb / elapsed, 2), "documents": report["documents"],
            "flag_rate": round(report["flag_rate"], 4), "load_before": round(load, 1)}
        print(f"filter_corpus workers={workers}: {elapsed:.1f}s  {size_mb / elapsed:.2f} MB/s  "
              f"flag rate {100 * report['flag_rate']:.2f}%  (1-min load before: {load:.1f})")

    texts = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) >= args.matcher_docs:
                break
    texts_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    ours = DiscourseFilter()
    matchers = {
        "ours: union trie on lower-cased text": ours,
        "per-category trie, IGNORECASE": PerCategorySearch({c: compile_category(ours.terms[c]) for c in ALL_CATEGORIES}),
        "per-category plain alternation, IGNORECASE": PerCategorySearch({c: plain_alternation(ours.terms[c]) for c in ALL_CATEGORIES}),
    }
    reference = None
    for name, filt in matchers.items():
        mb_s, flags = matcher_mb_s(filt, texts, texts_mb)
        reference = flags if reference is None else reference
        assert flags == reference, f"{name} disagrees with ours"
        results["matcher"][name] = {"mb_per_s": round(mb_s, 2), "flagged": sum(flags), "docs": len(texts)}
        print(f"matcher only, {name}: {mb_s:.2f} MB/s ({sum(flags)}/{len(texts)} flagged, {texts_mb:.1f} MB)")
    print(f"machine: {results['machine']}   corpus {results['corpus_mb']} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
