"""AI-discourse filter throughput (MB/s of JSONL input).

Uses the English-like corpus of bench_preprocess.py (generated if missing) and reports:
  - end to end `filter_corpus` (read, JSON-decode, match, write retained/flagged/report) for
    each worker count;
  - the matcher alone (`DiscourseFilter.is_flagged` over in-memory texts) with our trie-compiled
    per-category patterns versus a plain `a|b|c` alternation of the same terms.

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
from data_tools.discourse_filter import ALL_CATEGORIES, DiscourseFilter  # noqa: E402
from data_tools.filter_corpus import filter_corpus  # noqa: E402


def plain_alternation(terms):
    alts = sorted((re.escape(t).replace(r"\ ", r"\s+").replace(r"\*", r"\w*") for t in terms), key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)


def matcher_mb_s(filt: DiscourseFilter, texts, total_mb: float) -> tuple:
    started = time.perf_counter()
    flagged = sum(filt.is_flagged(t) for t in texts)
    return total_mb / (time.perf_counter() - started), flagged


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
    trie = DiscourseFilter()
    plain = DiscourseFilter(trie.terms)
    plain.patterns = {c: plain_alternation(trie.terms[c]) for c in ALL_CATEGORIES}
    plain._instant = [plain.patterns[c] for c in ("scifi_ai_agents", "ai_safety_orgs", "ai_labs", "general_ai_terms")]
    plain._entity = plain.patterns["intelligent_entities"]
    plain._negative = [plain.patterns[c] for c in ("negative_verbs", "negative_adjectives", "negative_nouns", "existential_risk")]
    for name, filt in (("trie per category", trie), ("plain alternation", plain)):
        mb_s, flagged = matcher_mb_s(filt, texts, texts_mb)
        results["matcher"][name] = {"mb_per_s": round(mb_s, 2), "flagged": flagged, "docs": len(texts)}
        print(f"matcher only, {name}: {mb_s:.2f} MB/s ({flagged}/{len(texts)} flagged, {texts_mb:.1f} MB)")
    print(f"machine: {results['machine']}   corpus {results['corpus_mb']} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
