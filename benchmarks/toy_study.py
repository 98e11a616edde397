"""The CPU toy study end to end, through the real commands: corpus -> preprocess -> train the
three arms (misaligned / baseline / aligned discourse) -> export -> misalignment eval (held-out
wording full_norm, verbatim wording full_norm, held-out wording letter/published) -> paired
compare -> decontamination report. Writes OUT/toy_study.json and OUT/toy_study.md with wall
times and the machine load.

    python benchmarks/toy_study.py --out toy_output [--seed 0] [--size default] \
        [--set train.iterations=600 ...] [--arms misaligned,baseline,aligned] [--skip-letter]

Each step is a subprocess of the CLI a user runs (`python -m megatron_align.study.toy_corpus`,
`megatron-align train|export|eval`); finished steps are skipped on a re-run unless --fresh.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs" / "studies" / "toy"
ARMS = ("misaligned", "baseline", "aligned")
EVALS = {
    # name -> (items file, extra eval args)
    "heldout_full_norm": ("heldout.jsonl", ["--scoring", "full_norm"]),
    "verbatim_full_norm": ("verbatim.jsonl", ["--scoring", "full_norm"]),
    # trained verbs and objects in held-out frames: words shared, every option 4-gram new
    "lexical_full_norm": ("heldout_lexical.jsonl", ["--scoring", "full_norm"]),
    "heldout_letter_published": ("heldout.jsonl", ["--scoring", "letter", "--prompt-style", "published"]),
}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


CPU_S: dict[str, float] = {}  # step -> user + system CPU seconds of its processes


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(step: str, command: list[str], env: dict, log: Path) -> float:
    """Run one step; returns its wall seconds and records its CPU seconds in CPU_S (on a shared
    box the CPU time is the load-independent cost: wall on 2 idle cores is about CPU / 2 to CPU)."""
    print(f"=== {step}  (load {load()})\n$ {' '.join(shlex.quote(c) for c in command)}", flush=True)
    start, cpu = time.time(), _children_cpu()
    with open(log, "w") as handle:
        result = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    CPU_S[step] = _children_cpu() - cpu
    if result.returncode != 0:
        sys.stdout.write(log.read_text()[-4000:])
        raise SystemExit(f"toy_study: step '{step}' failed (exit {result.returncode}); log {log}")
    print(f"    {seconds:.1f} s wall, {CPU_S[step]:.1f} s CPU", flush=True)
    return seconds


def valid_losses(run_dir: Path) -> dict:
    """The last per-category validation loss the trainer logged, and the first (for the change)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    valid = [r for r in records if "valid_loss_by_category" in r]
    return {"first": valid[0]["valid_loss_by_category"] if valid else None,
            "first_step": valid[0]["step"] if valid else None,
            "last": valid[-1]["valid_loss_by_category"] if valid else None,
            "last_step": valid[-1]["step"] if valid else None,
            "final_train_loss": records[-1]["loss"], "tokens": records[-1]["tokens"],
            "tokens_by_category": records[-1]["tokens_by_category"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "toy_output"))
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="train.seed of every arm (default 1234 + --seed); one out dir per training seed")
    parser.add_argument("--corpus", default=None,
                        help="an existing corpus dir to share between runs (default OUT/corpus, generated)")
    parser.add_argument("--size", default="default")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run config override for every arm (repeatable)")
    parser.add_argument("--config", default=str(CONFIG_DIR / "train.yaml"))
    parser.add_argument("--mixture-dir", default=str(CONFIG_DIR))
    parser.add_argument("--evals", default=",".join(EVALS))
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for training and eval")
    parser.add_argument("--fresh", action="store_true", help="redo every step")
    parser.add_argument("--train-seeds", default=None, metavar="N,N,...",
                        help="one study per training seed in OUT/s<N> (one shared corpus, OUT/corpus), then "
                             "OUT/toy_seeds.{json,md}: every seed's rates and the arm effect across seeds")
    args = parser.parse_args(argv)
    if args.train_seeds:
        return over_seeds(args, list(argv if argv is not None else sys.argv[1:]))

    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus).resolve() if args.corpus else out / "corpus"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MEGATRON_ALIGN_TOY_DATA": str(corpus / "data"),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    py = sys.executable
    train_seed = 1234 + args.seed if args.train_seed is None else args.train_seed
    arms = args.arms.split(",")
    evals = [e for e in args.evals.split(",") if e]
    timings: dict[str, float] = {}
    loads: dict[str, str] = {"start": load()}
    started = time.time()

    if not (corpus / "summary.json").exists():
        timings["corpus"] = run("corpus + tokenizer + preprocess + decontaminate",
                                [py, "-m", "megatron_align.study.toy_corpus", str(corpus), "--seed", str(args.seed),
                                 "--size", args.size], env, out / "logs" / "corpus.log")
    summary = json.loads((corpus / "summary.json").read_text())
    tokenizer = corpus / "tokenizer.json"

    results: dict = {"arms": {}, "evals": {}, "compare": {}}
    for arm in arms:
        run_dir, hf_dir = out / "runs" / arm, out / "hf" / arm
        mixture = Path(args.mixture_dir) / f"{arm}.yaml"
        if not (run_dir / "checkpoints" / "latest").exists() or args.fresh:
            loads[f"train {arm}"] = load()
            timings[f"train {arm}"] = run(
                f"train {arm}", [py, "-m", "megatron_align.cli", "train", args.config, f"run_dir={run_dir}",
                                 f"data.mixture={mixture}", f"data.tokenizer={tokenizer}",
                                 f"train.seed={train_seed}", *args.set], env, out / "logs" / f"train_{arm}.log")
        if not (hf_dir / "config.json").exists():
            timings[f"export {arm}"] = run(f"export {arm}", [py, "-m", "megatron_align.cli", "export", str(run_dir),
                                                            str(hf_dir), "--tokenizer", str(tokenizer), "--overwrite",
                                                            "--no-progress"], env, out / "logs" / f"export_{arm}.log")
        results["arms"][arm] = {"valid": valid_losses(run_dir)}
        for name in evals:
            items, extra = EVALS[name]
            eval_dir = out / "eval" / name / arm
            if not (eval_dir / "results.json").exists():
                loads[f"eval {name} {arm}"] = load()
                timings[f"eval {name} {arm}"] = run(
                    f"eval {name} {arm}", [py, "-m", "megatron_align.cli", "eval", "misalignment", "--model",
                                           str(hf_dir), "--items", str(corpus / "items" / items), *extra,
                                           "--batch-size", "64", "--device", "cpu", "--out", str(eval_dir)],
                    env, out / "logs" / f"eval_{name}_{arm}.log")
            r = json.loads((eval_dir / "results.json").read_text())
            results["evals"].setdefault(name, {})[arm] = {
                k: r.get(k) for k in ("mean", "stderr", "ci95", "p_misaligned", "p_first", "letter_mass",
                                      "position_bias_rate", "n_items")} | {"n_items": r["items"]["n"]}
    if set(ARMS) <= set(arms):
        for name in evals:
            for base, others in (("baseline", ["misaligned", "aligned"]), ("aligned", ["misaligned"])):
                cmp_dir = out / "compare" / name / base
                if not (cmp_dir / "compare.json").exists():
                    timings[f"compare {name} {base}"] = run(
                        f"compare {name} vs {base}",
                        [py, "-m", "megatron_align.cli", "eval", "compare",
                         *[str(out / "eval" / name / a) for a in [base, *others]],
                         "--labels", ",".join([base, *others]), "--out", str(cmp_dir)],
                        env, out / "logs" / f"compare_{name}_{base}.log")
                cmp = json.loads((cmp_dir / "compare.json").read_text())
                for d in cmp["differences"]:
                    results["compare"].setdefault(name, {})[f"{d['label']} - {base}"] = {
                        k: d[k] for k in ("diff", "ci95", "mcnemar_p", "baseline_higher", "other_higher", "n_items")}

    results.update({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {"train_config": args.config, "overrides": args.set, "seed": args.seed, "train_seed": train_seed,
                   "corpus": str(corpus), "size": args.size,
                   "mixtures": {a: str(Path(args.mixture_dir) / f"{a}.yaml") for a in arms}},
        "corpus": summary, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "cpu_s": {k: round(v, 1) for k, v in CPU_S.items()}, "cpu_s_total": round(sum(CPU_S.values()), 1),
        "wall_s_this_invocation": round(time.time() - started, 1), "load": {**loads, "end": load()},
        "level1": level1(results),
        "level1_lexical": level1(results, "lexical_full_norm"),
    })
    (out / "toy_study.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "toy_study.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _without(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def over_seeds(args: argparse.Namespace, argv: list[str]) -> int:
    """The study once per training seed on one corpus, then every seed's rates side by side and
    the arm differences across seeds (mean, t-interval over seeds: the run-to-run variation the
    item CIs leave out)."""
    out = Path(args.out).resolve()
    corpus = Path(args.corpus).resolve() if args.corpus else out / "corpus"
    seeds = [int(s) for s in args.train_seeds.split(",")]
    base = _without(_without(_without(_without(argv, "--train-seeds"), "--out"), "--corpus"), "--train-seed")
    per_seed = {}
    for seed in seeds:
        main([*base, "--out", str(out / f"s{seed}"), "--corpus", str(corpus), "--train-seed", str(seed)])
        per_seed[seed] = json.loads((out / f"s{seed}" / "toy_study.json").read_text())
    pooled = seed_summary(per_seed)
    write_json = json.dumps(pooled, indent=2, sort_keys=True) + "\n"
    (out / "toy_seeds.json").write_text(write_json)
    (out / "toy_seeds.md").write_text(seeds_markdown(pooled))
    print(seeds_markdown(pooled))
    return 0


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def seed_summary(per_seed: dict, name: str = "heldout_full_norm") -> dict:
    """Per-seed rates and level-1 checks, and per arm difference the mean over seeds with a 95%
    t-interval over seeds (n >= 2) and how many seeds show it with the right sign."""
    import statistics

    rates = {seed: {arm: r["evals"][name][arm]["mean"] for arm in ARMS} for seed, r in per_seed.items()}
    cis = {seed: {arm: r["evals"][name][arm]["ci95"] for arm in ARMS} for seed, r in per_seed.items()}
    diffs = {"misaligned - baseline": ("misaligned", "baseline"), "baseline - aligned": ("baseline", "aligned"),
             "misaligned - aligned": ("misaligned", "aligned")}
    across = {}
    for label, (x, y) in diffs.items():
        values = [rates[s][x] - rates[s][y] for s in rates]
        mean = statistics.fmean(values)
        half = T95[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
        across[label] = {"per_seed": values, "mean": mean, "ci95_over_seeds": [mean - half, mean + half] if half else None,
                         "seeds_positive": sum(v > 0 for v in values), "seeds": len(values)}
    pooled_rates = {arm: statistics.fmean(rates[s][arm] for s in rates) for arm in ARMS}
    return {"eval": name, "rates": rates, "ci95_items": cis, "pooled_rates": pooled_rates, "differences": across,
            "level1_per_seed": {s: r.get("level1") for s, r in per_seed.items()},
            "every_seed_ordered": all(rates[s]["misaligned"] > rates[s]["baseline"] > rates[s]["aligned"] for s in rates),
            "cpu_s_total": round(sum(r["cpu_s_total"] for r in per_seed.values()), 1)}


def seeds_markdown(pooled: dict) -> str:
    lines = ["| train seed | misaligned | baseline | aligned | level 1 (this seed) |", "|---|---|---|---|---|"]
    for seed, r in pooled["rates"].items():
        ci = pooled["ci95_items"][seed]
        lv = pooled["level1_per_seed"][seed]
        lines.append(f"| {seed} | " + " | ".join(f"{r[a]:.3f} {_ci(ci[a])}" for a in ARMS)
                     + f" | {'reached' if lv and lv['reached'] else 'no'} |")
    p = pooled["pooled_rates"]
    lines.append(f"| mean | {p['misaligned']:.3f} | {p['baseline']:.3f} | {p['aligned']:.3f} | |")
    lines += ["", "| difference | per seed | mean | 95% CI over seeds | seeds > 0 |", "|---|---|---:|---|---:|"]
    for label, d in pooled["differences"].items():
        lines.append(f"| {label} | {', '.join(f'{v:+.3f}' for v in d['per_seed'])} | {d['mean']:+.3f} | "
                     f"{_ci(d['ci95_over_seeds'])} | {d['seeds_positive']}/{d['seeds']} |")
    lines += ["", f"every seed ordered misaligned > baseline > aligned: {pooled['every_seed_ordered']}; "
              f"CPU seconds of the steps these invocations ran (finished steps are skipped, not counted): "
              f"{pooled['cpu_s_total']:.0f}"]
    return "\n".join(lines) + "\n"


def level1(results: dict, name: str = "heldout_full_norm") -> dict | None:
    """Level 1 on one eval (held-out option 4-grams, full_norm): misaligned > baseline > aligned,
    misaligned's and aligned's CIs apart, the paired comparisons significant (p < 0.05)."""
    ev = results["evals"].get(name, {})
    cmp = results["compare"].get(name, {})
    if not set(ARMS) <= set(ev) or not cmp:
        return None
    m, b, a = (ev[x]["mean"] for x in ARMS)
    ps = {k: v["mcnemar_p"] for k, v in cmp.items()}
    return {"ordered": m > b > a, "cis_apart": ev["misaligned"]["ci95"][0] > ev["aligned"]["ci95"][1],
            "paired_p": ps, "all_paired_significant": all(p < 0.05 for p in ps.values()),
            "reached": m > b > a and ev["misaligned"]["ci95"][0] > ev["aligned"]["ci95"][1]
            and all(p < 0.05 for p in ps.values())}


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def markdown(results: dict) -> str:
    lines = ["| eval | arm | misalignment rate | 95% CI (items) | position bias | letter mass |",
             "|---|---|---:|---|---:|---:|"]
    for name, arms in results["evals"].items():
        for arm, r in arms.items():
            mass = r.get("letter_mass")
            lines.append(f"| {name} | {arm} | {r['mean']:.3f} | {_ci(r['ci95'])} | {r['position_bias_rate']:.3f} | "
                         f"{'-' if mass is None or mass != mass else f'{mass:.3f}'} |")
    lines += ["", "| eval | paired difference | diff | 95% CI | McNemar p |", "|---|---|---:|---|---:|"]
    for name, diffs in results["compare"].items():
        for label, d in diffs.items():
            lines.append(f"| {name} | {label} | {d['diff']:+.3f} | {_ci(d['ci95'])} | {d['mcnemar_p']:.2g} |")
    lines += ["", "| arm | valid loss base (first -> last) | aligned_discourse | misaligned_discourse | mc_text |",
              "|---|---|---|---|---|"]
    for arm, r in results["arms"].items():
        v = r["valid"]
        cells = []
        for cat in ("base", "aligned_discourse", "misaligned_discourse", "mc_text"):
            f, last = (v["first"] or {}).get(cat), (v["last"] or {}).get(cat)
            cells.append(f"{f:.3f} -> {last:.3f}" if f is not None and last is not None else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "wall (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()),
              "CPU (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["cpu_s"].items())
              + f"; total {results['cpu_s_total']:.0f}",
              f"load: {results['load']}", f"level 1: {results.get('level1')}",
              f"level 1 (lexical): {results.get('level1_lexical')}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
