"""`data-tools`: preprocess | index-stats | merge | filter | filter-eval | decontaminate | inspect.

Thin: parse, call, summarise. Bad input (a file, line or key named) exits 2, like megatron-align.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from data_tools.errors import DataToolsError
from data_tools.index_stats import SAMPLE_DOCUMENTS
from megatron_align.io import SidecarError, write_json_atomic
from data_tools.tokenizers import TokenizerError


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}" if unit else f"{n:,.0f}"
        n /= 1000
    return f"{n:.3g}P"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _dataset_lines(stats: dict) -> list:
    """The summary lines every verb that writes a sidecar prints: counts and tokenizer."""
    tok = stats["tokenizer"]
    return [
        f"documents   {stats['documents']:,}   tokens {stats['tokens']:,} (incl. EOD)   dtype {stats['dtype']}",
        f"tokenizer   {tok['kind']} {tok['path']} (vocab {tok['vocab_size']:,}, eod {tok['eod_id']})",
    ]


def _rate_line(stats: dict, elapsed: float) -> str:
    return (f"time        {elapsed:.1f}s   {_human(stats['tokens'] / max(elapsed, 1e-9))} tokens/s   "
            f"{_human(stats['documents'] / max(elapsed, 1e-9))} docs/s")


def cmd_preprocess_chat(args) -> int:
    from data_tools.chat import preprocess_chat

    if args.mpi:
        raise DataToolsError("--chat does not run under --mpi; use --workers N")
    started = time.perf_counter()
    stats = preprocess_chat(args.inputs, args.output_prefix, args.tokenizer, chat_template=args.chat_template,
                            messages_field=args.messages_field, eod_token=args.eod_token, workers=args.workers,
                            on_error=args.on_error, progress=not args.quiet)
    chat, skipped = stats["chat"], sum(stats["skipped"].values())
    lines = [
        f"output      {args.output_prefix}.bin/.idx + {chat['loss_mask_prefix']}.bin/.idx (+ .stats.json)",
        f"inputs      {len(stats['inputs'])} file(s)",
        f"conversations {stats['documents']:,}   tokens {stats['tokens']:,}   assistant (in the loss) "
        f"{chat['assistant_tokens']:,} ({_pct(chat['assistant_tokens'] / max(stats['tokens'], 1))})",
        f"template    {chat['template_source']} (sha256 {chat['template_sha256'][:12]})",
        *_dataset_lines(stats)[1:],
        f"skipped     {skipped:,}" + (f"  {json.dumps({k: v for k, v in stats['skipped'].items() if v})}" if skipped else ""),
        _rate_line(stats, time.perf_counter() - started),
    ]
    print("\n".join(lines))
    return 0


def cmd_preprocess(args) -> int:
    if args.chat:
        return cmd_preprocess_chat(args)
    if args.chat_template is not None:
        raise DataToolsError("--chat-template needs --chat")
    started = time.perf_counter()
    common = dict(
        text_field=args.text_field, eod_token=args.eod_token, workers=args.workers,
        on_error=args.on_error, progress=not args.quiet,
    )
    if args.mpi:
        from data_tools.mpi_shard import preprocess_mpi

        stats = preprocess_mpi(args.inputs, args.output_prefix, args.tokenizer, output=args.mpi_output, **common)
        if stats is None:  # ranks other than 0 print nothing
            return 0
    else:
        from data_tools.preprocess import preprocess

        stats = preprocess(args.inputs, args.output_prefix, args.tokenizer, **common)
    elapsed = time.perf_counter() - started
    skipped = sum(stats["skipped"].values())
    lines = [
        f"output      {args.output_prefix}.bin/.idx (+ .stats.json)"
        if "prefixes" not in stats else f"outputs     {len(stats['prefixes'])} prefixes listed in {args.output_prefix}.prefixes.json",
        f"inputs      {len(stats['inputs'])} file(s)",
        *_dataset_lines(stats),
        f"skipped     {skipped:,}" + (f"  {json.dumps(stats['skipped'])}" if skipped else ""),
        _rate_line(stats, elapsed),
    ]
    print("\n".join(lines))
    return 0


def cmd_index_stats(args) -> int:
    from data_tools.index_stats import index_stats

    started = time.perf_counter()
    stats = index_stats(args.prefix, args.tokenizer, eod_token=args.eod_token, samples=args.samples,
                        seed=args.seed, force=args.force, progress=not args.quiet)
    check = stats["check"]
    lines = [
        f"dataset     {args.prefix}.bin/.idx (made elsewhere: counts from the .idx)",
        *_dataset_lines(stats),
        f"checked     {check['sampled_documents']:,} sampled documents (seed {check['seed']}): max id {check['max_id']} "
        f"< vocab {stats['tokenizer']['vocab_size']:,}; {check['ending_with_eod']:,} end with EOD"
        if check["sampled_documents"] else "checked     no documents (--samples 0): ids and EOD not checked",
        *(f"warning: {w}" for w in stats["warnings"]),
        f"wrote       {args.prefix}.stats.json   ({time.perf_counter() - started:.1f}s)",
    ]
    print("\n".join(lines))
    return 0


def cmd_merge(args) -> int:
    from data_tools.merge import merge

    started = time.perf_counter()
    stats = merge(args.output_prefix, args.prefixes, force=args.force, progress=not args.quiet)
    lines = [
        f"output      {args.output_prefix}.bin/.idx (+ .stats.json)",
        f"shards      {len(stats['inputs'])}: " + ", ".join(
            f"{os.path.basename(i['path'])} ({i['documents']:,} docs)" for i in stats["inputs"][:6])
        + (f", ... {len(stats['inputs']) - 6} more" if len(stats["inputs"]) > 6 else ""),
        *_dataset_lines(stats),
        *(f"warning: {w}" for w in stats.get("warnings", [])),
        _rate_line(stats, time.perf_counter() - started),
    ]
    print("\n".join(lines))
    return 0


def print_filter_summary(report: dict, out_dir: str) -> None:
    n = report["documents"]
    print(f"\n{'documents':<40} {n:>10,}")
    print(f"{'flagged':<40} {report['flagged']:>10,}  {_pct(report['flag_rate'])}")
    print(f"{'retained':<40} {report['retained']:>10,}")
    if report["replace_flagged"]:
        r = report["replace_flagged"]
        print(f"{'resampled (seed ' + str(r['seed']) + ')':<40} {r['replaced']:>10,}  -> {report['output_documents']:,} output docs")
    if any(report["skipped"].values()):
        print(f"{'skipped':<40} {sum(report['skipped'].values()):>10,}  {json.dumps(report['skipped'])}")
    print("\nrule                                      documents   rate")
    for rule, v in report["rules"].items():
        print(f"{rule:<40} {v['documents']:>10,}  {_pct(v['rate'])}")
    print("\ntop matched terms (documents)")
    for category, terms in report["top_terms"].items():
        print(f"  {category:<22} " + ", ".join(f"{t} ({c})" for t, c in terms[:6]))
    if report["examples"]:
        print("\nexamples")
        for example in report["examples"][:5]:
            print("  " + (example if len(example) < 160 else example[:157] + "..."))
    speed = f"{report['mb_per_s']} MB/s" if report.get("mb_per_s") else ""
    print(f"\nwrote {out_dir}/retained.jsonl, flagged.jsonl, report.json   ({report['elapsed_s']}s {speed})")


def cmd_filter(args) -> int:
    from data_tools.filter_corpus import filter_corpus

    report = filter_corpus(
        args.inputs, args.out_dir, terms_dir=args.terms_dir, text_field=args.text_field,
        replace_flagged=args.replace_flagged, seed=args.seed, workers=args.workers,
        on_error=args.on_error, progress=not args.quiet,
    )
    print_filter_summary(report, args.out_dir)
    return 0


def cmd_filter_eval(args) -> int:
    from data_tools.filter_eval import evaluate_filter

    positives = [p for spec in args.positive_labels for p in spec.split(",") if p]
    result = evaluate_filter(
        args.labelled, positive_labels=positives, terms_dir=args.terms_dir,
        text_field=args.text_field, label_field=args.label_field,
    )
    print(f"labelled set   {result['labelled']}  ({result['documents']} docs, positives: {', '.join(result['positive_labels'])})")
    print(f"recall         {_pct(result['recall'])}  ({result['true_positives']}/{result['positives']} positives flagged)")
    print(f"precision      {_pct(result['precision'])}  ({result['true_positives']}/{result['true_positives'] + result['false_positives']} flagged are positives)")
    print(f"flag rate      {_pct(result['flag_rate'])}")
    print("\nlabel                        docs  flagged   rate")
    for label, v in result["per_label"].items():
        print(f"{label:<26} {v['documents']:>6} {v['flagged']:>8}  {_pct(v['flag_rate']):>6}")
    if result["missed_positives"]:
        print(f"\nMISSED {len(result['missed_positives'])} positive(s) (add terms to catch these):")
        for m in result["missed_positives"]:
            print(f"  line {m['line']} [{m['id']}]: {m['text'][:120]}")
    else:
        print("\nno positives missed")
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    else:
        print(json.dumps({k: result[k] for k in ("recall", "precision", "flag_rate", "true_positives", "false_positives", "false_negatives", "true_negatives")}))
    return 0


def cmd_decontaminate(args) -> int:
    from data_tools.decontaminate import decontaminate

    r = decontaminate(
        args.inputs, report_path=args.report, items=args.items, indexed=args.indexed, tokenizer=args.tokenizer,
        n=args.n, text_field=args.text_field, drop=args.drop, workers=args.workers, progress=not args.quiet,
    )
    print(f"\n{'eval items':<28} {r['items']:>10,}  from {', '.join(r['items_files'])}")
    print(f"{'item ' + str(r['n']) + '-grams':<28} {r['item_ngrams']:>10,}  ({r['item_fields_shorter_than_n']} "
          f"field(s) shorter than {r['n']} words cannot match)")
    print(f"{'documents':<28} {r['documents']:>10,}")
    print(f"{'contaminated documents':<28} {r['documents_contaminated']:>10,}  {_pct(r['document_rate'])}")
    print(f"{'contaminated items':<28} {r['items_contaminated']:>10,}  {_pct(r['item_rate'])}")
    if r["contaminated_items"]:
        print("\nitem                          docs  fields")
        for item in sorted(r["contaminated_items"], key=lambda i: -i["documents"])[:8]:
            print(f"  {item['id']:<26} {item['documents']:>6,}  " + ", ".join(item["fields"]))
        print("\nexamples")
        for doc in r["contaminated_documents"][:4]:
            span = doc["spans"][0]
            text = span["text"] if len(span["text"]) < 100 else span["text"][:97] + "..."
            print(f"  {doc['doc']} [{span['item']} {'/'.join(span['fields'])}]: {text}")
    if r["drop"]:
        print(f"\nwrote {r['drop']['path']}: {r['drop']['documents']:,} documents "
              f"({r['drop']['removed']:,} contaminated removed)")
    print(f"wrote {args.report}   ({r['elapsed_s']}s, {_human(r['docs_per_s'] or 0)} docs/s, {r['mb_per_s']} MB/s)")
    return 0


def cmd_inspect(args) -> int:
    from data_tools.inspect import inspect_dataset, text_histogram

    s = inspect_dataset(args.prefix, tokenizer_path=args.tokenizer, samples=args.samples, seed=args.seed, plot=args.plot)
    print(f"dataset     {s['prefix']}.bin/.idx   dtype {s['dtype']}")
    print(f"documents   {s['documents']:,}   tokens {s['tokens']:,}")
    ln = s["length"]
    print(f"length      min {ln['min']:,}  median {ln['median']:,.0f}  mean {ln['mean']:,.1f}  max {ln['max']:,}")
    if s["sidecar"]:
        t = s["sidecar"]["tokenizer"]
        print(f"tokenizer   {t['kind']} {t['path']} sha256 {t['sha256'][:12]}")
    print("\ntokens per document")
    print(text_histogram(s["histogram"]))
    if s.get("warning"):
        print(f"\nwarning: {s['warning']}")
    for sample in s["samples"]:
        print(f"\n--- document {sample['index']} ({sample['tokens']} tokens) ---")
        print(sample["text"] if sample["text"] is not None else f"ids {sample['ids']} ... (pass --tokenizer to detokenise)")
    if s.get("plot"):
        print(f"\nwrote {s['plot']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data-tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="tokenise JSONL/Parquet into a megatron-core .bin/.idx dataset")
    p.add_argument("inputs", nargs="+", help="files, globs or directories (.jsonl, .jsonl.gz, .jsonl.zst, .parquet)")
    p.add_argument("--output-prefix", "-o", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    p.add_argument("--tokenizer", "-t", required=True, help="HF tokenizer.json (or its directory) or SentencePiece .model")
    p.add_argument("--text-field", default="text")
    p.add_argument("--eod-token", default=None, help="token appended after each document (default <|endoftext|> / eos)")
    p.add_argument("--workers", "-j", type=int, default=1, help="HF tokenizer.json: tokenizer threads in this process; SentencePiece: worker processes (1 = in this process)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="bad records: stop (default) or skip and count")
    p.add_argument("--mpi", action="store_true", help="run under mpiexec/srun: each rank tokenises a contiguous shard")
    p.add_argument("--mpi-output", choices=["merge", "list"], default="merge", help="merge rank outputs into PREFIX (default) or keep PREFIX-RRRRR-of-WWWWW")
    p.add_argument("--chat", action="store_true",
                   help="rows are conversations (--messages-field): write tokens + a loss mask over the assistant turns")
    p.add_argument("--chat-template", default=None, metavar="FILE|default",
                   help="with --chat: the Jinja chat template (default: the tokenizer's own; 'default': the shipped one)")
    p.add_argument("--messages-field", default="messages", help="with --chat: the field holding the messages")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_preprocess)

    p = sub.add_parser(
        "index-stats", help="write the stats sidecar for a .bin/.idx made by another tool (Megatron-LM, GPT-NeoX)",
        description="Counts documents and tokens from the .idx alone (seconds at terabyte scale) and checks a "
                    "sample of documents: ids >= the tokenizer's vocabulary are an error (exit 2, no sidecar); "
                    "documents not ending with its EOD token are a warning, recorded in the sidecar.")
    p.add_argument("prefix", help="PREFIX of PREFIX.bin/.idx; writes PREFIX.stats.json")
    p.add_argument("--tokenizer", "-t", required=True, help="the tokenizer the dataset was made with: HF tokenizer.json (or its directory) or SentencePiece .model")
    p.add_argument("--eod-token", default=None, help="the EOD token documents end with (default <|endoftext|> / eos)")
    p.add_argument("--samples", "-n", type=int, default=SAMPLE_DOCUMENTS,
                   help=f"random documents read to check ids and EOD (default {SAMPLE_DOCUMENTS}; 0 = none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document sample")
    p.add_argument("--force", action="store_true", help="replace an existing PREFIX.stats.json")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_index_stats)

    p = sub.add_parser(
        "merge", help="concatenate .bin/.idx shards into one dataset (megatron-core add_index)",
        description="Shards must have sidecars that agree on the tokenizer (sha256, vocab, eod) and dtype. "
                    "The merged sidecar sums documents and tokens and lists the shards as inputs.")
    p.add_argument("output_prefix", metavar="OUT", help="writes OUT.bin, OUT.idx, OUT.stats.json")
    p.add_argument("prefixes", nargs="+", metavar="PREFIX", help="shard prefixes, concatenated in this order")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("filter", help="flag AI-discourse documents (rule-based)")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--terms-dir", default=None, help="directory of <category>.txt term lists (default: the shipped lists)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--replace-flagged", choices=["none", "resample"], default="none",
                   help="resample: fill each flagged slot with a retained document (with replacement)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", "-j", type=int, default=1)
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(fn=cmd_filter)

    p = sub.add_parser("filter-eval", help="recall / precision / flag rate of the filter on labelled documents")
    p.add_argument("labelled", help="JSONL with text and label fields")
    p.add_argument("--positive-labels", action="append", default=None, help="label(s) that must be flagged (repeat or comma-separate)")
    p.add_argument("--terms-dir", default=None)
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--json", default=None, help="also write the full result here")
    p.set_defaults(fn=cmd_filter_eval)

    p = sub.add_parser(
        "decontaminate", help="n-gram overlap between training documents and eval items (report, optional --drop)",
        description="Normalised (NFKC, lowercase, punctuation stripped) word n-grams of every eval item field "
                    "(scenario/question, passage, each choice) are looked up in every document. Items: JSONL/Parquet "
                    "in the project's schema (id, scenario, aligned, misaligned) or the published one "
                    "(question_id, passage, question, choices); default: the shipped starter items.")
    p.add_argument("inputs", nargs="*", help="corpus files, globs or directories (.jsonl[.gz|.zst], .parquet)")
    p.add_argument("--indexed", default=None, metavar="PREFIX", help="scan PREFIX.bin/.idx instead (detokenised)")
    p.add_argument("--tokenizer", "-t", default=None, help="for --indexed (default: the one in PREFIX.stats.json)")
    p.add_argument("--items", action="append", default=None, help="eval item file(s), glob or dir (repeat; default: shipped starter items)")
    p.add_argument("--n", type=int, default=13, help="n-gram length in words (default 13)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--report", "-o", required=True, help="JSON report path")
    p.add_argument("--drop", default=None, metavar="OUT",
                   help="also write the corpus without the contaminated documents: one JSONL file, or an indexed prefix for --indexed")
    p.add_argument("--workers", "-j", type=int, default=1)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(fn=cmd_decontaminate)

    p = sub.add_parser("inspect", help="counts, length histogram and samples of a .bin/.idx dataset")
    p.add_argument("prefix")
    p.add_argument("--tokenizer", "-t", default=None, help="default: the one recorded in PREFIX.stats.json")
    p.add_argument("--samples", "-n", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="also save a length histogram PNG here")
    p.set_defaults(fn=cmd_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "positive_labels", "unset") is None:
        args.positive_labels = ["misaligned_discourse"]
    try:
        return args.fn(args)
    except (DataToolsError, TokenizerError, SidecarError) as exc:
        if getattr(exc, "reported_here", True):
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
