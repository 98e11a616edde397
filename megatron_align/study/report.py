"""``study report``: every arm's misalignment rate on the report split with its item-bootstrap 95%
CI, paired comparisons against the baseline arm (same items: paired bootstrap CI of the
difference and the exact McNemar test), capability numbers where they exist, and a plot.

The rate is the eval's own: the mean over prompt formats of each format's rate over the split's
items (:func:`megatron_align.evals.statistics.rate`), read from each eval's per-item records.

With a ``replicate_axis`` (training seeds), arms that differ only in it are pooled into one
replicate group: its rate is the mean of the replicates' rates, its CI a two-level bootstrap
(one item draw shared by every replicate, then the replicates resampled) next to the t interval
over the replicate rates; comparisons are between groups (bootstrap CI, Welch's t over the
replicate rates), and per replicate label (paired items, McNemar) as without replicates.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_align.evals.misalignment import EvalError, load_results
from megatron_align.evals.statistics import (DEFAULT_BOOT, item_bootstrap_ci, paired_difference, rate,
                                              replicate_bootstrap_ci, replicate_difference, t_interval)
from megatron_align.io import atomic_path, write_json_atomic

from .schema import StudyError
from .state import DONE, job_states

REPORT_FORMAT = "megatron-align/study-report/v1"
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
MODELS = ("base", "posttrained")


def _outcomes(results: dict, split: Optional[str], ids: Optional[list[str]] = None):
    """(item ids, items x formats misaligned matrix) of the split, in the results' item order."""
    records = [p for p in results["per_item"] if split is None or p["split"] == split]
    if ids is not None:
        by_id = {p["id"]: p for p in records}
        records = [by_id[i] for i in ids]
    matrix = np.array([p["misaligned"] for p in records], dtype=float).reshape(len(records), -1)
    return [p["id"] for p in records], matrix


def _load(path: str, arm: str, split: Optional[str]) -> dict:
    try:
        results = load_results(path)
    except EvalError as err:
        raise StudyError(f"arm {arm}: {err}") from None
    if not results.get("per_item"):
        raise StudyError(f"{path}: no per-item records (re-run the arm's eval)")
    splits = sorted({p["split"] for p in results["per_item"]})
    if split is not None and split not in splits:
        raise StudyError(f"{path}: the eval items have no split {split!r} (splits: {', '.join(splits)}); "
                         "fix eval.split in the study file")
    return results


def _capability(path: str) -> Optional[dict]:
    import json

    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    numbers = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," in key and isinstance(value, (int, float)) and "_stderr" not in key:
                numbers.setdefault(task, {})[key.split(",", 1)[0]] = value
    return numbers


def _evaluations(record: dict, chain: dict) -> list[tuple[str, Optional[str], str, Optional[str]]]:
    """(model, variant, job id, split) of every misalignment eval of an arm: the base model's
    main eval, its variants, the post-trained model's eval."""
    split = record["eval"].get("split")
    found = [("base", None, chain.get("eval"), split)]
    for name, job_id in chain.get("variants", {}).items():
        found.append(("base", name, job_id, record["eval"]["variants"][name].get("split")))
    found.append(("posttrained", None, chain.get("eval_posttrained"), split))
    return [entry for entry in found if entry[2] is not None]


def build_report(record: dict, seed: int = 0) -> dict:
    """The report dict (also what ``--json`` prints) from a study dir's plan record and results."""
    split = record["eval"].get("split")
    states = job_states(record)
    details = record["job_details"]
    arms: dict[str, dict] = {}
    missing: dict[str, str] = {}
    loaded: dict[tuple[str, str, Optional[str]], tuple[dict, Optional[str]]] = {}
    for arm, info in record["arms"].items():
        chain = info["jobs"]
        entry: dict = {}
        for model, variant, job_id, eval_split in _evaluations(record, chain):
            if states[job_id].state != DONE:
                if model == "base" and variant is None:
                    missing[arm] = f"{job_id} is {states[job_id].state}" + (
                        f" ({states[job_id].reason})" if states[job_id].reason else "")
                continue
            results = _load(details[job_id]["outputs"]["results"], arm, eval_split)
            loaded[(arm, model, variant)] = (results, eval_split)
            _, outcomes = _outcomes(results, eval_split)
            stats = {"misalignment_rate": rate(outcomes), "ci95": item_bootstrap_ci(outcomes, seed=seed),
                     "n_items": int(outcomes.shape[0]),
                     "stderr_over_formats": _stderr_over_formats(outcomes),
                     "scoring": results.get("scoring"), "identity": results.get("identity"),
                     "prompt_style": results.get("prompt_style"), "results": details[job_id]["outputs"]["results"]}
            if variant is not None:
                entry.setdefault("variants", {})[variant] = {**stats, "split": eval_split or "all"}
            elif model == "base":
                entry.update(stats)
            else:
                entry["posttrained"] = stats
        for model, role in (("base", "capability"), ("posttrained", "capability_posttrained")):
            cap_job = chain.get(role)
            target = entry if model == "base" else entry.get("posttrained")
            if cap_job and target is not None and states[cap_job].state == DONE:
                numbers = _capability(details[cap_job]["outputs"]["results"])
                if numbers is not None:
                    target["capability"] = numbers
        if "misalignment_rate" in entry:
            entry["values"] = info["values"]
            arms[arm] = entry
    if record.get("replicate_axis"):
        return _replicate_report(record, arms, loaded, missing, seed)
    comparisons = _comparisons(record, loaded, seed)
    return {"format": REPORT_FORMAT, "study": record["study"]["name"], "plan_hash": record["plan_hash"],
            "split": split or "all", "metric": "misalignment rate: mean over prompt formats of the rate over "
            f"items; 95% CI: item bootstrap ({DEFAULT_BOOT} resamples, seed {seed})",
            "baseline": record["comparisons"].get("baseline"), "arms": arms, "comparisons": comparisons,
            "missing": missing}


def _groups(record: dict, arms: dict) -> dict[str, dict[str, str]]:
    """replicate group -> replicate label -> arm, for the arms with a base-model result (plan order)."""
    groups: dict[str, dict[str, str]] = {}
    for arm, info in record["arms"].items():
        group = groups.setdefault(info["group"], {})
        if arm in arms:
            group[info["replicate"]] = arm
    return groups


def _replicate_outcomes(loaded: dict, members: dict[str, str], model: str, variant: Optional[str],
                        group: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """(item ids, replicate -> items x formats) of one evaluation of a group, rows in the same item order."""
    ids: Optional[list[str]] = None
    matrices = {}
    for replicate, arm in members.items():
        if (arm, model, variant) not in loaded:
            continue
        results, split = loaded[(arm, model, variant)]
        if ids is None:
            ids, matrices[replicate] = _outcomes(results, split)
            continue
        found = {p["id"] for p in results["per_item"] if split is None or p["split"] == split}
        if found != set(ids):
            raise StudyError(f"replicate group {group!r}: arm {arm!r} was evaluated on other items than "
                             f"{next(iter(members.values()))!r}; pooling replicates needs the same items")
        matrices[replicate] = _outcomes(results, split, ids)[1]
    return ids or [], matrices


def _pooled(matrices: dict[str, np.ndarray], per_arm: dict[str, dict], seed: int) -> dict:
    """A group's statistics from its replicates' outcomes; ``per_arm``: replicate -> the arm's own stats."""
    rates = [rate(m) for m in matrices.values()]
    first = next(iter(per_arm.values()))
    with np.errstate(invalid="ignore"):
        format_rates = np.nanmean(np.stack([np.nanmean(m, axis=0) for m in matrices.values()]), axis=0)
    pooled_formats = format_rates[None, :]  # one row: the stderr over the pooled per-format rates
    return {"misalignment_rate": float(np.mean(rates)),
            "ci95": replicate_bootstrap_ci(list(matrices.values()), seed=seed),
            "ci95_t": t_interval(rates),
            "n_items": int(next(iter(matrices.values())).shape[0]), "n_replicates": len(matrices),
            "stderr_over_formats": _stderr_over_formats(pooled_formats),
            "scoring": first.get("scoring"), "identity": first.get("identity"),
            "prompt_style": first.get("prompt_style"),
            "results": [per_arm[r]["results"] for r in matrices],
            "replicates": {r: {key: per_arm[r][key] for key in ("arm", "misalignment_rate", "ci95", "n_items",
                                                                 "results") if key in per_arm[r]}
                           for r in matrices}}


def _replicate_report(record: dict, arms: dict, loaded: dict, missing: dict, seed: int) -> dict:
    axis = record["replicate_axis"]
    groups: dict[str, dict] = {}
    for group, members in _groups(record, arms).items():
        if not members:
            continue
        evaluations = list(dict.fromkeys((model, variant) for (arm, model, variant) in loaded
                                         if arm in members.values()))
        entry: dict = {}
        for model, variant in evaluations:
            _, matrices = _replicate_outcomes(loaded, members, model, variant, group)
            per_arm = {}
            for replicate in matrices:
                arm_entry = arms[members[replicate]]
                stats = (arm_entry if model == "base" and variant is None else
                         arm_entry["variants"][variant] if variant is not None else arm_entry["posttrained"])
                per_arm[replicate] = {**stats, "arm": members[replicate]}
            stats = _pooled(matrices, per_arm, seed)
            if variant is not None:
                entry.setdefault("variants", {})[variant] = {**stats, "split": per_arm[next(iter(per_arm))]["split"]}
            elif model == "base":
                entry.update(stats)
            else:
                entry["posttrained"] = stats
        for target, key in ((entry, None), (entry.get("posttrained"), "posttrained")):
            if target is None:
                continue
            by_replicate = {}
            for replicate, arm in members.items():
                source = arms[arm] if key is None else arms[arm].get("posttrained", {})
                if source.get("capability"):
                    by_replicate[replicate] = source["capability"]
                    if replicate in target["replicates"]:
                        target["replicates"][replicate]["capability"] = source["capability"]
            if by_replicate:
                target["capability"] = _mean_capability(by_replicate.values())
        first_arm = next(iter(members.values()))
        entry["values"] = {k: v for k, v in record["arms"][first_arm]["values"].items() if k != axis}
        entry["arms"] = list(members.values())
        groups[group] = entry
    return {"format": REPORT_FORMAT, "study": record["study"]["name"], "plan_hash": record["plan_hash"],
            "split": record["eval"].get("split") or "all",
            "metric": "misalignment rate: mean over prompt formats of the rate over items, averaged over the "
            f"replicates (axis {axis!r}); 95% CI: two-level bootstrap ({DEFAULT_BOOT} resamples, seed {seed}: "
            "one item draw for every replicate, then the replicates with replacement), ci95_t: t interval "
            "over the replicate rates",
            "replicate_axis": axis, "baseline": record["comparisons"].get("baseline"), "arms": groups,
            "comparisons": _replicate_comparisons(record, groups, loaded, seed), "missing": missing}


def _mean_capability(tables) -> dict:
    sums: dict[str, dict[str, list[float]]] = {}
    for table in tables:
        for task, metrics in table.items():
            for metric, value in metrics.items():
                sums.setdefault(task, {}).setdefault(metric, []).append(value)
    return {task: {metric: float(np.mean(values)) for metric, values in metrics.items()}
            for task, metrics in sums.items()}


def _replicate_comparisons(record: dict, groups: dict, loaded: dict, seed: int) -> list[dict]:
    """Each compared group minus the baseline group, per evaluation both have: the pooled difference
    (two-level bootstrap CI and p; Welch's t over replicate rates), and per replicate label present
    in both, the paired item comparison (bootstrap CI, McNemar)."""
    baseline = record["comparisons"].get("baseline")
    if baseline is None or baseline not in groups:
        return []
    members = _groups(record, {arm for entry in groups.values() for arm in entry["arms"]})
    compared = record["comparisons"].get("arms") or [g for g in groups if g != baseline]
    evaluations = [("base", None)] + [("base", v) for v in groups[baseline].get("variants", {})]
    if "posttrained" in groups[baseline]:
        evaluations.append(("posttrained", None))
    comparisons = []
    for model, variant in evaluations:
        ids, base = _replicate_outcomes(loaded, members[baseline], model, variant, baseline)
        for group in compared:
            if group not in groups:
                continue
            other_ids, other = _replicate_outcomes(loaded, members[group], model, variant, group)
            if not other:
                continue
            if set(other_ids) != set(ids):
                raise StudyError(f"groups {baseline!r} and {group!r} were evaluated on different items; "
                                 "comparisons need the same items")
            order = {item: row for row, item in enumerate(other_ids)}
            other = {r: m[[order[i] for i in ids]] for r, m in other.items()}
            d = replicate_difference(list(base.values()), list(other.values()), seed=seed)
            paired = {}
            for replicate in base:
                if replicate in other:
                    p = paired_difference(base[replicate], other[replicate], seed=seed)
                    paired[replicate] = {"arm": members[group][replicate], "baseline": members[baseline][replicate],
                                         "n_items": p["n_items"], "diff": p["diff"], "ci95": p["ci"],
                                         "baseline_higher": p["a_higher"], "arm_higher": p["b_higher"],
                                         "mcnemar_p": p["mcnemar_p"]}
            comparisons.append({"arm": group, "baseline": baseline, "model": model, "variant": variant,
                                "n_items": d["n_items"], "n_replicates": d["n_b"], "n_replicates_baseline": d["n_a"],
                                "diff": d["diff"], "ci95": d["ci"], "p_value": d["t_p"], "ci95_t": d["t_ci"],
                                "t_df": d["t_df"], "p_bootstrap": d["p_bootstrap"], "replicates": paired})
    return comparisons


def _stderr_over_formats(outcomes: np.ndarray) -> float:
    with np.errstate(invalid="ignore"):
        rates = np.nanmean(outcomes, axis=0)
    rates = rates[~np.isnan(rates)]
    if rates.size < 2:
        return math.nan
    return float(np.std(rates, ddof=1) / math.sqrt(rates.size))


def _comparisons(record: dict, loaded: dict, seed: int) -> list[dict]:
    """Each compared arm minus the baseline, per evaluation both have (main, variants, post-trained)."""
    baseline = record["comparisons"].get("baseline")
    if baseline is None:
        return []
    arms = record["comparisons"].get("arms") or [a for a in record["arms"] if a != baseline]
    comparisons = []
    for (arm_name, model, variant), (base, split) in loaded.items():
        if arm_name != baseline:
            continue
        ids, base_outcomes = _outcomes(base, split)
        for arm in arms:
            if (arm, model, variant) not in loaded:
                continue
            other = loaded[(arm, model, variant)][0]
            other_ids = {p["id"] for p in other["per_item"] if split is None or p["split"] == split}
            if other_ids != set(ids) or (base["items"].get("sha256") and other["items"].get("sha256")
                                         and base["items"]["sha256"] != other["items"]["sha256"]):
                raise StudyError(f"arms {baseline!r} and {arm!r} were evaluated on different items; paired "
                                 "comparisons need the same items")
            _, arm_outcomes = _outcomes(other, split, ids)
            d = paired_difference(base_outcomes, arm_outcomes, seed=seed)
            comparisons.append({"arm": arm, "baseline": baseline, "model": model, "variant": variant,
                                "n_items": d["n_items"], "diff": d["diff"], "ci95": d["ci"],
                                "baseline_higher": d["a_higher"], "arm_higher": d["b_higher"],
                                "mcnemar_p": d["mcnemar_p"]})
    return comparisons


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _ci(ci) -> str:
    return "n/a" if not ci or any(c is None or math.isnan(c) for c in ci) else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def report_table(report: dict) -> str:
    if report.get("replicate_axis"):
        return _replicate_table(report)
    lines = [f"study {report['study']}: misalignment rate on split '{report['split']}' "
             f"(95% CI: item bootstrap)", ""]
    has_post = any("posttrained" in a for a in report["arms"].values())
    header = f"{'arm':<30}{'n':>6}{'rate':>8}  {'95% CI':<17}"
    if has_post:
        header += f"{'post-trained':>13}  {'95% CI':<17}"
    lines += [header, "-" * len(header)]
    for arm, entry in report["arms"].items():
        row = f"{arm[:29]:<30}{entry['n_items']:>6}{_fmt(entry['misalignment_rate']):>8}  {_ci(entry['ci95']):<17}"
        if has_post:
            post = entry.get("posttrained", {})
            row += f"{_fmt(post.get('misalignment_rate')):>13}  {_ci(post.get('ci95')):<17}"
        lines.append(row)
    variants = sorted({v for entry in report["arms"].values() for v in entry.get("variants", {})})
    for variant in variants:
        lines += ["", f"variant '{variant}'"]
        for arm, entry in report["arms"].items():
            v = entry.get("variants", {}).get(variant)
            if v:
                lines.append(f"{arm[:29]:<30}{v['n_items']:>6}{_fmt(v['misalignment_rate']):>8}  {_ci(v['ci95']):<17}"
                             f"  (split {v['split']}, {v['scoring']})")
    for arm, why in report["missing"].items():
        lines.append(f"{arm[:29]:<30}  (no result: {why})")
    if report["comparisons"]:
        lines += ["", f"paired differences vs '{report['baseline']}' (arm - baseline, same items; McNemar on "
                      "items whose misaligned share differs)",
                  f"{'arm':<30}{'model':<13}{'n':>6}{'diff':>8}  {'95% CI':<18}{'b':>5}{'c':>5}{'p':>10}"]
        for c in report["comparisons"]:
            label = c["model"] if c["variant"] is None else f"{c['model']}:{c['variant']}"
            lines.append(f"{c['arm'][:29]:<30}{label[:12]:<13}{c['n_items']:>6}{c['diff']:>+8.3f}  "
                         f"{_ci(c['ci95']):<18}{c['baseline_higher']:>6}{c['arm_higher']:>6}{c['mcnemar_p']:>10.2g}")
    lines += _capability_lines(report, "capability (base models)")
    return "\n".join(lines)


def _replicate_table(report: dict) -> str:
    lines = [f"study {report['study']}: misalignment rate on split '{report['split']}', pooled over replicates "
             f"(axis '{report['replicate_axis']}'): mean of the replicate rates; 95% CI: two-level bootstrap "
             "(items, then replicates) and t interval over the replicate rates", ""]
    header = f"{'group / replicate':<30}{'reps':>5}{'n':>6}{'rate':>8}  {'95% CI':<17} {'t 95% CI':<17}"
    lines += [header, "-" * len(header)]

    def block(stats: dict, label: str) -> None:
        lines.append(f"{label[:29]:<30}{stats['n_replicates']:>5}{stats['n_items']:>6}"
                     f"{_fmt(stats['misalignment_rate']):>8}  {_ci(stats['ci95']):<17} {_ci(stats['ci95_t']):<17}")
        for replicate, r in stats["replicates"].items():
            lines.append(f"  {replicate[:27]:<28}{'':>5}{r['n_items']:>6}{_fmt(r['misalignment_rate']):>8}  "
                         f"{_ci(r['ci95']):<17} (arm {r['arm']})")

    for group, entry in report["arms"].items():
        block(entry, group)
    for model, title in (("posttrained", "post-trained models"),):
        if any(model in e for e in report["arms"].values()):
            lines += ["", title]
            for group, entry in report["arms"].items():
                if model in entry:
                    block(entry[model], group)
    variants = sorted({v for entry in report["arms"].values() for v in entry.get("variants", {})})
    for variant in variants:
        lines += ["", f"variant '{variant}'"]
        for group, entry in report["arms"].items():
            if variant in entry.get("variants", {}):
                block(entry["variants"][variant], group)
    for arm, why in report["missing"].items():
        lines.append(f"{arm[:29]:<30}  (no result: {why})")
    if report["comparisons"]:
        lines += ["", f"differences vs '{report['baseline']}' (group - baseline: pooled rates, two-level bootstrap "
                      "CI, Welch's t over replicate rates; per replicate: same items paired, McNemar)",
                  f"{'group / replicate':<30}{'model':<13}{'reps':>6}{'diff':>8}  {'95% CI':<18}{'t 95% CI':<18}"
                  f"{'p (t)':>8}{'b':>5}{'c':>5}{'p McN':>9}"]
        for c in report["comparisons"]:
            label = c["model"] if c["variant"] is None else f"{c['model']}:{c['variant']}"
            p_t = "n/a" if c["p_value"] is None or math.isnan(c["p_value"]) else f"{c['p_value']:.2g}"
            lines.append(f"{c['arm'][:29]:<30}{label[:12]:<13}{c['n_replicates']:>3}/{c['n_replicates_baseline']:<2}"
                         f"{c['diff']:>+8.3f}  {_ci(c['ci95']):<18}{_ci(c['ci95_t']):<18}{p_t:>8}")
            for replicate, r in c["replicates"].items():
                lines.append(f"  {replicate[:27]:<28}{'':<13}{'':>6}{r['diff']:>+8.3f}  {_ci(r['ci95']):<18}"
                             f"{'':<18}{'':>8}{r['baseline_higher']:>5}{r['arm_higher']:>5}{r['mcnemar_p']:>9.2g}")
    lines += _capability_lines(report, "capability (base models, mean over replicates)")
    return "\n".join(lines)


def _capability_lines(report: dict, title: str) -> list[str]:
    caps = {arm: entry["capability"] for arm, entry in report["arms"].items() if entry.get("capability")}
    if not caps:
        return []
    return ["", title] + [f"  {arm}: " + ", ".join(f"{task} {metric} {value:.3f}" for task, metrics in tasks.items()
                                                  for metric, value in metrics.items())
                          for arm, tasks in caps.items()]


def plot_report(report: dict, path: str | Path) -> Path:
    """Rates with 95% CI bars per arm (base and, where present, post-trained side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(report["arms"])
    models = [m for m in MODELS if m == "base" or any("posttrained" in report["arms"][a] for a in arms)]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(arms) + 2), 4.5))
    for i, model in enumerate(models):
        stats = [report["arms"][a] if model == "base" else report["arms"][a].get("posttrained", {}) for a in arms]
        xs = [k + (i - (len(models) - 1) / 2) * width for k in range(len(arms))]
        values = [s.get("misalignment_rate", math.nan) for s in stats]
        errors = [[max(0.0, v - s["ci95"][0]), max(0.0, s["ci95"][1] - v)] if s.get("ci95") and not math.isnan(v)
                  else [0.0, 0.0] for v, s in zip(values, stats)]
        ax.bar(xs, values, width=width, yerr=list(zip(*errors)), capsize=3,
               label="base model" if model == "base" else "post-trained")
        if report.get("replicate_axis"):  # every replicate's own rate over its group's bar
            points = [(x + width * (0.3 * (2 * k / max(1, len(s["replicates"]) - 1) - 1)
                                    if len(s["replicates"]) > 1 else 0.0), r["misalignment_rate"])
                      for x, s in zip(xs, stats) for k, r in enumerate(s.get("replicates", {}).values())]
            if points:
                ax.scatter(*zip(*points), s=16, color="tab:orange", edgecolors="black", linewidths=0.5, zorder=3,
                           label=f"replicates ({report['replicate_axis']})" if i == 0 else None)
    if report.get("baseline") in report["arms"]:
        ax.axhline(report["arms"][report["baseline"]]["misalignment_rate"], color="grey", lw=0.8, ls="--",
                   label=f"baseline ({report['baseline']})")
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"misalignment rate, split '{report['split']}' (95% CI)"
                  + (", pooled over replicates" if report.get("replicate_axis") else ""))
    ax.set_title(f"study {report['study']}", fontsize=10)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Optional[Path]]:
    out_dir = Path(out_dir)
    png = plot_report(report, out_dir / REPORT_PNG) if report["arms"] else None
    report = {**report, "plot": str(png) if png else None}
    json_path = write_json_atomic(out_dir / REPORT_JSON, report)
    return json_path, png
