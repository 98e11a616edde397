"""Studies: the paper study's DAG and arm mixtures, study-file errors, re-planning, the SLURM
commands, and the local executor end to end (a reduced 3-arm study: tiny GPT-NeoX, HF export,
misalignment eval, report) including a kill in the middle of a training job and the resume."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from megatron_align.mixture.plan import resolve_stage
from megatron_align.mixture.schema import load_mixture
from megatron_align.mixture.sources import SourceInfo
from megatron_align.study.commands import main as study_main
from megatron_align.study.plan import build_plan, plan_record, read_record, write_configs
from megatron_align.study.schema import load_study
from test_mixture import make_source

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "configs" / "studies" / "paper.yaml"
PAPER_ARMS = ["unfiltered", "unfiltered_aligned", "unfiltered_aligned_mid", "unfiltered_aligned_cpt",
              "unfiltered_misaligned", "unfiltered_misaligned_mid", "unfiltered_misaligned_cpt",
              "filtered", "filtered_aligned", "filtered_aligned_mid", "filtered_aligned_cpt"]

# Paper-scale corpus sizes (tokens) to resolve the arms without the data.
CORPUS_TOKENS = {"dclm/dclm_text_document": 5.6e11, "dclm/dclm_filtered_text_document": 5.1e11,
                 "dclm_long/dclm_long_text_document": 3.0e10, "dclm_long/dclm_long_filtered_text_document": 2.8e10,
                 "climbmix/climbmix_text_document": 3.0e10, "mcqa/mcqa_text_document": 1.5e9,
                 "discourse/aligned_text_document": 1.0e9, "discourse/misaligned_text_document": 1.0e9}
TOKENIZER = {"sha256": "00" * 32, "vocab_size": 50277, "eod_id": 0}


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    study = load_study(str(PAPER), str(tmp_path_factory.mktemp("paper") / "study"))
    return build_plan(study)


# ---------------------------------------------------------------------------------------------
# The paper study


def test_paper_study_dag_has_every_arm_and_chain(paper):
    assert [arm.name for arm in paper.arms] == PAPER_ARMS
    jobs = {job.id: job for job in paper.jobs}
    # mid and CPT arms reuse the baseline's pretraining (and CPT arms its midtraining) job
    assert Counter(job.kind for job in paper.jobs) == {
        "pretrain": 5, "midtrain": 8, "cpt": 3, "export": 22, "eval": 44, "sft": 11, "dpo": 11}
    assert sorted(jobs["unfiltered.pretrain"].arms) == sorted(
        ["unfiltered"] + [f"unfiltered_{d}_{w}" for d in ("aligned", "misaligned") for w in ("mid", "cpt")])
    assert sorted(jobs["filtered.midtrain"].arms) == ["filtered", "filtered_aligned_cpt"]
    positions = {job.id: i for i, job in enumerate(paper.jobs)}
    for job in paper.jobs:
        assert all(positions[parent] < positions[job.id] for parent in job.after), job.id
    for arm in PAPER_ARMS:
        chain = paper.chains[arm]
        stages = chain["stages"]
        kinds = [jobs[j].kind for j in stages]
        assert kinds == (["pretrain", "midtrain", "cpt"] if arm.endswith("_cpt") else ["pretrain", "midtrain"])
        assert jobs[stages[0]].after == []
        for parent, child in zip(stages, stages[1:]):
            assert jobs[child].after == [parent]
            assert jobs[child].config["checkpoint"]["init_from"] == jobs[parent].outputs["run_dir"]
        last = stages[-1]
        expected = {"export": last, "eval": chain["export"], "capability": chain["export"], "sft": last,
                    "export_sft": chain["sft"], "dpo": chain["export_sft"], "eval_posttrained": chain["dpo"],
                    "capability_posttrained": chain["dpo"]}
        for role, parent in expected.items():
            assert jobs[chain[role]].after == [parent], (arm, role)
            assert arm in jobs[chain[role]].arms
        assert jobs[chain["sft"]].config["data"]["source"] == "sft"
        assert jobs[chain["sft"]].config["checkpoint"]["init_from"] == jobs[last].outputs["run_dir"]
        dpo = jobs[chain["dpo"]].argv
        assert dpo[:3] == ["megatron-align", "posttrain", "dpo"]
        assert dpo[dpo.index("--model") + 1] == jobs[chain["export_sft"]].outputs["hf_dir"]
        post_eval = jobs[chain["eval_posttrained"]].argv
        assert post_eval[post_eval.index("--identity") + 1] == "hhh"
        assert post_eval[post_eval.index("--chat-template") + 1] == "on"
    pretrain, midtrain = jobs["unfiltered.pretrain"].config, jobs["unfiltered.midtrain"].config
    assert (pretrain["train"]["iterations"], pretrain["train"]["seq_length"],
            pretrain["train"]["global_batch_size"]) == (119_209, 2048, 2048)
    assert (midtrain["train"]["iterations"], midtrain["train"]["seq_length"],
            midtrain["train"]["global_batch_size"]) == (11_921, 16384, 256)
    assert (pretrain["optim"]["lr"], pretrain["optim"]["min_lr"]) == (3.0e-4, 1.2e-5)
    assert (midtrain["optim"]["lr"], midtrain["optim"]["min_lr"], midtrain["optim"]["clip_grad"]) == (2.25e-4, 0, 0.5)
    assert pretrain["model"]["size"] == "6.9b" and pretrain["parallel"]["distributed_optimizer"] is True
    assert midtrain["data"]["stage"] == "midtrain"
    assert midtrain["run_dir"] == str(paper.job_dir("unfiltered.midtrain") / "run")


def test_plan_json_has_exactly_the_documented_shape(paper, tmp_path, capsys):
    assert study_main(["study", "plan", str(PAPER), "--dry-run", "--json", "--out", str(tmp_path / "s")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["jobs"] and len(printed["jobs"]) == len(paper.jobs)
    for job in printed["jobs"]:
        assert list(job) == ["id", "arm", "kind", "after", "command"]
    assert not (tmp_path / "s").exists()  # --dry-run writes nothing


def paper_sources(mixture):
    infos = {}
    for s in mixture.sources:
        tokens = int(next(v for k, v in CORPUS_TOKENS.items() if s.prefix.endswith(k)))
        infos[s.name] = SourceInfo(s, 10**6, tokens, 10**6, tokens, "uint16", TOKENIZER)
    return infos


def discourse_share(plan):
    totals = plan.category_samples()
    return sum(n for c, n in totals.items() if c.endswith("_discourse")) / plan.num_samples


LATE_ARM = """
extra_arms:
  unfiltered_aligned_late:
    from: {base: unfiltered, discourse: aligned, insertion: e2e}
    description: aligned discourse, 1% of pretraining tokens, all in its last 10% of steps
    rules:
      pretrain: {aligned_discourse: {share: 0.01, window: {last: 0.1}}}
      midtrain: {aligned_discourse: null}
"""


def test_paper_arms_resolve_to_paper_shapes_and_one_percent_discourse(tmp_path, monkeypatch):
    """The generated arm mixtures (and an extra 'last 10%' arm) load with the mixture loader and
    resolve to the paper's shapes with 1% discourse exactly where the arm puts it."""
    monkeypatch.setenv("MEGATRON_ALIGN_DATA", str(tmp_path / "data"))
    study_file = tmp_path / "paper_late.yaml"
    study_file.write_text(PAPER.read_text() + LATE_ARM)
    plan = build_plan(load_study(str(study_file), str(tmp_path / "study")))
    assert [a.name for a in plan.arms] == PAPER_ARMS + ["unfiltered_aligned_late"]
    write_configs(plan, tmp_path / "arms")
    for arm in plan.arms:
        mixture = load_mixture(tmp_path / "arms" / arm.name / "mixture.yaml")
        assert all(s.prefix.startswith(str(tmp_path / "data")) for s in mixture.sources)
        plans = {name: resolve_stage(mixture, name, sources=paper_sources(mixture)) for name in mixture.stages}
        assert plans["pretrain"].iterations == 119_209
        assert plans["pretrain"].seq_length * plans["pretrain"].global_batch_size == 4_194_304
        assert plans["midtrain"].iterations == 11_921
        name = arm.name
        inserted_in = ({"midtrain"} if name.endswith("_mid") else {"cpt"} if name.endswith("_cpt")
                       else {"pretrain"} if name.endswith("_late") else {"pretrain", "midtrain"})
        for stage, resolved in plans.items():
            share = discourse_share(resolved)
            if "aligned" in name and stage in inserted_in:
                assert abs(share - 0.01) < 1e-4, (name, stage, share)
            else:
                assert share == 0, (name, stage, share)
            if stage == "midtrain":
                shares = {c: n / resolved.num_samples for c, n in resolved.category_samples().items()}
                assert abs(shares["climbmix"] - 0.48) < 1e-4 and abs(shares["mcqa"] - 0.02) < 1e-4
        filtered = {s.name: s.prefix for s in mixture.sources}
        if name.startswith("filtered"):
            assert filtered["dclm"].endswith("dclm/dclm_filtered_text_document")
        run = yaml.safe_load((tmp_path / "arms" / name / "pretrain.yaml").read_text())
        assert run["data"]["mixture"] == str(tmp_path / "arms" / name / "mixture.yaml")
    late = load_mixture(tmp_path / "arms" / "unfiltered_aligned_late" / "mixture.yaml")
    segments = resolve_stage(late, "pretrain", sources=paper_sources(late)).segments
    assert [s.start_step for s in segments] == [0, 119_209 - 11_921]
    assert segments[0].samples["aligned"] == 0
    assert abs(segments[1].samples["aligned"] / segments[1].num_samples - 0.1) < 1e-4


def test_generated_paper_arms_pass_mixture_plan(tmp_path, monkeypatch, capsys):
    """`mixture plan` accepts every generated arm (tiny stand-in data at the paper's prefixes)."""
    from megatron_align.mixture.commands import main as mixture_main

    data = tmp_path / "data"
    for i, prefix in enumerate(CORPUS_TOKENS):
        (data / prefix).parent.mkdir(parents=True, exist_ok=True)
        make_source(str(data / prefix), 1100, seed=i, token_range=(1, 400))
    monkeypatch.setenv("MEGATRON_ALIGN_DATA", str(data))
    plan = build_plan(load_study(str(PAPER), str(tmp_path / "study")))
    write_configs(plan, tmp_path / "arms")
    for arm in PAPER_ARMS:
        assert mixture_main(["mixture", "plan", str(tmp_path / "arms" / arm / "mixture.yaml"), "--no-realise"]) == 0
    printed = capsys.readouterr().out
    assert "mixture unfiltered_aligned_cpt" in printed and "cpt: plan" in printed


# ---------------------------------------------------------------------------------------------
# SLURM commands


def test_slurm_commands_chain_jobs_with_afterok(paper):
    from megatron_align.study.slurm import SCRIPTS_DIR, planned_commands, sbatch_argv, submit_script

    record = plan_record(paper, "slurm")
    commands = planned_commands(record)
    mid = commands["unfiltered_aligned_mid.midtrain"]
    assert mid.startswith("sbatch --parsable --job-name=paper.unfiltered_aligned_mid.midtrain ")
    assert "--dependency=afterok:${JOB_unfiltered__pretrain} " in mid
    assert f"{SCRIPTS_DIR}/train.sbatch {paper.job_dir('unfiltered_aligned_mid.midtrain')}/config.yaml" in mid
    assert "--nodes=64 --gpus-per-node=4 --time=48:00:00" in mid and "--time=04:00:00" in mid
    assert "--dependency" not in commands["unfiltered.pretrain"]
    assert f"{SCRIPTS_DIR}/export.sbatch {paper.job_dir('unfiltered.midtrain')}/run " in commands["unfiltered.export"]
    assert f"{SCRIPTS_DIR}/eval.sbatch misalignment --model " in commands["unfiltered.eval"]
    dpo = commands["unfiltered.dpo"]
    assert (f"{SCRIPTS_DIR}/job.sbatch --success-file {paper.job_dir('unfiltered.dpo')}/success "
            "megatron-align posttrain dpo --config ") in dpo
    # the shell fills in the ids: the line is valid shell, one word per argument
    argv = subprocess.run(["bash", "-c", "JOB_unfiltered__pretrain=4711; printf '%s\\n' " + mid],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert argv == sbatch_argv(record, "unfiltered_aligned_mid.midtrain", ["4711"])
    script = submit_script(record)
    assert script.splitlines()[4] == f"JOB_unfiltered__pretrain=$({commands['unfiltered.pretrain']})"
    assert len(script.splitlines()) == 4 + len(paper.jobs)


def test_job_sbatch_writes_its_success_file_only_after_exit_0(tmp_path):
    script = REPO / "launch" / "slurm" / "job.sbatch"
    ok, failed = tmp_path / "ok", tmp_path / "failed"
    assert subprocess.run(["bash", str(script), "--success-file", str(ok), "true"]).returncode == 0
    assert subprocess.run(["bash", str(script), "--success-file", str(failed), "bash", "-c", "exit 3"]).returncode == 3
    assert ok.is_file() and not failed.exists()


# ---------------------------------------------------------------------------------------------
# Study file errors and re-planning

SMALL = """\
name: small
run:
  model: {{preset: gpt-neox, size: tiny}}
  train: {{micro_batch_size: 2}}
mixture:
  data_root: {data}
  sources:
    web: {{prefix: web_text_document, category: base}}
stages:
  pretrain:
    iterations: {iterations}
    seq_length: 32
    global_batch_size: 4
    rules: {{base: natural}}
axes:
  discourse:
    plain: {{}}
    aligned:
      sources: {{al: {{prefix: aligned_text_document, category: aligned_discourse}}}}
      rules: {{pretrain: {{aligned_discourse: {{share: 0.25}}}}}}
{extra}"""


SEEDS = """\
  seed:
    s1: {run: {train: {seed: 11}}}
    s2: {run: {train: {seed: 12}}}
    s3: {run: {train: {seed: 13}}}
"""


def small_study(tmp_path, data="data", iterations=4, extra="", name="small.yaml") -> Path:
    path = tmp_path / name
    path.write_text(SMALL.format(data=data, iterations=iterations, extra=extra))
    return path


@pytest.mark.parametrize("edit, line, message", [
    (lambda t: t.replace("    rules: {base: natural}", "    rules: {base: natural}\n    colour: red"), 15,
     "stages.pretrain.colour: unknown key"),
    (lambda t: t.replace("aligned_discourse: {share: 0.25}", "alined_discourse: {share: 0.25}"), 20,
     "no source of the arm has category 'alined_discourse'"),
    (lambda t: t.replace("{share: 0.25}", "{share: 2}"), 20, "share: must be <= 1, got 2"),
    (lambda t: t.replace("  train: {micro_batch_size: 2}", "  train: {micro_batch_size: two}"), 4,
     "train.micro_batch_size: must be an integer"),
    (lambda t: t + "      run: {train: {iterations: 10}}\n", 21,
     "train.iterations: set by the study for every training stage"),
    (lambda t: t + "exclude:\n  - {discourse: none}\n", 22, "axis 'discourse' has no value 'none'"),
    (lambda t: t + "comparisons: {baseline: nothing}\n", 21, "comparisons: no arm 'nothing'"),
    (lambda t: t.replace("    global_batch_size: 4\n", ""), 10, "stages.pretrain: missing key 'global_batch_size'"),
    (lambda t: t + "replicate_axis: seed\n", 21, "replicate_axis: no axis 'seed' (axes: discourse)"),
    (lambda t: t + SEEDS + "replicate_axis: seed\ncomparisons: {baseline: plain_s1}\n", 26,
     "comparisons: no replicate group 'plain_s1' (replicate groups: plain, aligned)"),
])
def test_study_file_errors_name_file_and_line(tmp_path, capsys, edit, line, message):
    path = small_study(tmp_path)
    path.write_text(edit(path.read_text()))
    assert study_main(["study", "plan", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:{line}: ") and message in err, err
    assert err.count("\n") == 1


def test_replan_of_a_changed_study_is_refused_unless_forced(tmp_path, capsys):
    path = small_study(tmp_path)
    out = tmp_path / "study"
    assert study_main(["study", "plan", str(path), "--out", str(out)]) == 0
    record = read_record(out)
    assert (out / "study.yaml").read_text() == path.read_text()
    assert (out / "jobs" / "plain.pretrain" / "config.yaml").is_file()
    assert study_main(["study", "plan", str(path), "--out", str(out)]) == 0  # same study: fine
    marker = out / "jobs" / "plain.export" / "done.json"  # pretend this one finished
    marker.write_text(json.dumps({"hash": record["job_details"]["plain.export"]["hash"]}))
    path.write_text(path.read_text().replace("{share: 0.25}", "{share: 0.5}"))
    capsys.readouterr()
    assert study_main(["study", "plan", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "planned before from a different study" in err and "3 changed (aligned.eval, aligned.export, " \
                                                              "aligned.pretrain)" in err and "--force" in err
    assert read_record(out)["plan_hash"] == record["plan_hash"]  # nothing rewritten
    assert study_main(["study", "plan", str(path), "--out", str(out), "--force"]) == 0
    assert "removed 3 changed job dir(s)" in capsys.readouterr().out
    assert marker.is_file()  # an unchanged job keeps what it finished


def test_a_failed_job_leaves_its_dependents_never_started(tmp_path, capsys):
    extra = ("prepare:\n  - {id: fine, command: 'echo fine > {study_dir}/fine.txt'}\n"
             "  - {id: broken, command: 'echo broken >&2; exit 3'}\n")
    out = tmp_path / "study"
    assert study_main(["study", "plan", str(small_study(tmp_path, extra=extra)), "--out", str(out)]) == 0
    assert study_main(["study", "run", str(out), "--jobs", "2"]) == 4
    printed = capsys.readouterr().out
    assert "FAILED   broken: exit code 3" in printed
    assert (out / "fine.txt").read_text() == "fine\n"
    assert "broken" in (out / "jobs" / "broken" / "log.txt").read_text()
    assert study_main(["study", "status", str(out), "--json"]) == 0
    status = {job["id"]: job for job in json.loads(capsys.readouterr().out)["jobs"]}
    assert status["fine"]["state"] == "done"
    assert status["broken"]["state"] == "failed" and "exit code 3" in status["broken"]["reason"]
    for job_id in ("plain.pretrain", "aligned.pretrain"):
        assert status[job_id]["state"] == "never-started"
        assert status[job_id]["reason"].startswith("broken failed (exit code 3")
    assert status["aligned.eval"]["state"] == "never-started"
    assert status["aligned.eval"]["reason"].startswith("aligned.export never started")
    assert study_main(["study", "status", str(out)]) == 0
    table = capsys.readouterr().out
    assert "1 done" in table and "1 failed" in table and "6 never-started" in table


# ---------------------------------------------------------------------------------------------
# Replicates (training seeds) pooled by the report

N_ITEMS = 200
# Each replicate's held-out misalignment rate: the seeds of an arm disagree more than its items do.
REPLICATE_RATES = {"plain_s1": 0.30, "plain_s2": 0.45, "plain_s3": 0.60,
                   "aligned_s1": 0.20, "aligned_s2": 0.25, "aligned_s3": 0.15}


def _write_eval_results(path: Path, misaligned_rate: float, offset: int) -> None:
    """A results.json made by the eval's own aggregation from per-item choices: every item held out,
    two formats, the first ``rate x N_ITEMS`` items (rotated by ``offset``) answered misaligned."""
    from megatron_align.evals.items import Item
    from megatron_align.evals.misalignment import Choice, aggregate
    from megatron_align.io import write_json_atomic
    from megatron_align.evals.formats import formats_for

    formats = formats_for("project")[:2]
    items = [Item(f"q{i:03d}", "s", "a", "m", "heldout") for i in range(N_ITEMS)]
    choices, per_item = [], []
    for i, item in enumerate(items):
        flag = int((i + offset) % N_ITEMS < round(misaligned_rate * N_ITEMS))
        entries = [Choice(item.id, k, flag, 1) if flag else Choice(item.id, k, 0, 1) for k in range(len(formats))]
        choices += entries
        per_item.append({"id": item.id, "split": item.split, "tags": [], "misaligned": [flag] * len(formats)})
    results = {"eval": "misalignment", "model": str(path.parent), "items": {"path": "synthetic", "sha256": "ab" * 32, "n": N_ITEMS},
               "identity": "none", "scoring": "full_norm", "prompt_style": "project",
               "formats": [f.name for f in formats], **aggregate(choices, items, formats), "per_item": per_item}
    write_json_atomic(path, results)


def _finished_study(tmp_path, extra: str) -> Path:
    """A planned study whose eval jobs are marked done with the synthetic results above."""
    out = tmp_path / "study"
    assert study_main(["study", "plan", str(small_study(tmp_path, extra=extra)), "--out", str(out)]) == 0
    record = read_record(out)
    for offset, (arm, info) in enumerate(record["arms"].items()):
        job_id = info["jobs"]["eval"]
        _write_eval_results(Path(record["job_details"][job_id]["outputs"]["results"]),
                            REPLICATE_RATES[arm], offset=17 * offset)
        (out / "jobs" / job_id / "done.json").write_text(
            json.dumps({"hash": record["job_details"][job_id]["hash"]}))
    return out


def test_report_pools_replicates_with_a_seed_aware_ci(tmp_path, capsys):
    import numpy as np
    from megatron_align.evals.statistics import item_bootstrap_ci

    out = _finished_study(tmp_path, SEEDS + "replicate_axis: seed\ncomparisons: {baseline: plain}\n")
    record = read_record(out)
    assert record["replicate_axis"] == "seed"
    assert {arm: (info["group"], info["replicate"]) for arm, info in record["arms"].items()} == {
        "plain_s1": ("plain", "s1"), "plain_s2": ("plain", "s2"), "plain_s3": ("plain", "s3"),
        "aligned_s1": ("aligned", "s1"), "aligned_s2": ("aligned", "s2"), "aligned_s3": ("aligned", "s3")}
    capsys.readouterr()
    assert study_main(["study", "report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["arms"]) == ["plain", "aligned"] and report["replicate_axis"] == "seed"
    for group, entry in report["arms"].items():
        rates = [REPLICATE_RATES[f"{group}_s{k}"] for k in (1, 2, 3)]
        assert entry["n_items"] == N_ITEMS and entry["n_replicates"] == 3
        assert entry["values"] == {"discourse": group} and entry["arms"] == [f"{group}_s{k}" for k in (1, 2, 3)]
        assert list(entry["replicates"]) == ["s1", "s2", "s3"]
        assert [r["misalignment_rate"] for r in entry["replicates"].values()] == pytest.approx(rates)
        assert entry["misalignment_rate"] == pytest.approx(np.mean(rates))
        lo, hi = entry["ci95"]
        assert lo < entry["misalignment_rate"] < hi
        # t interval over 3 replicate rates: t(0.975, df=2) = 4.3027 (statistical tables)
        half = 4.3027 * np.std(rates, ddof=1) / np.sqrt(3)
        assert entry["ci95_t"] == pytest.approx([np.mean(rates) - half, np.mean(rates) + half], abs=1e-4)
        # pooling the items of the three seeds as one sample ignores the seed-to-seed spread
        naive = item_bootstrap_ci(np.vstack([np.array([p["misaligned"] for p in json.loads(
            Path(r["results"]).read_text())["per_item"]], dtype=float) for r in entry["replicates"].values()]))
        if group == "plain":  # replicates 0.30 / 0.45 / 0.60: the spread must widen the interval
            assert hi - lo > 2 * (naive[1] - naive[0])
    [comparison] = report["comparisons"]
    assert (comparison["arm"], comparison["baseline"], comparison["model"], comparison["variant"]) == \
        ("aligned", "plain", "base", None)
    assert comparison["n_replicates"] == comparison["n_replicates_baseline"] == 3
    assert comparison["diff"] == pytest.approx(0.20 - 0.45)
    assert comparison["ci95"][0] < comparison["diff"] < comparison["ci95"][1]
    assert comparison["ci95_t"][0] < comparison["diff"] < comparison["ci95_t"][1]
    assert 0 < comparison["p_value"] < 0.1 and 0 < comparison["p_bootstrap"] <= 1
    assert list(comparison["replicates"]) == ["s1", "s2", "s3"]
    for k, replicate in enumerate(comparison["replicates"].values(), start=1):
        assert (replicate["arm"], replicate["baseline"]) == (f"aligned_s{k}", f"plain_s{k}")
        assert replicate["diff"] == pytest.approx(REPLICATE_RATES[f"aligned_s{k}"] - REPLICATE_RATES[f"plain_s{k}"])
        assert replicate["n_items"] == N_ITEMS and 0 <= replicate["mcnemar_p"] <= 1
        assert replicate["arm_higher"] > 0 and replicate["baseline_higher"] > replicate["arm_higher"]
    assert (out / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert study_main(["study", "report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "pooled over replicates (axis 'seed')" in table
    for arm in REPLICATE_RATES:
        assert f"(arm {arm})" in table  # one line per replicate


def test_report_without_replicate_axis_keeps_one_entry_per_arm(tmp_path, capsys):
    out = _finished_study(tmp_path, SEEDS + "comparisons: {baseline: plain_s1}\n")
    assert read_record(out)["replicate_axis"] is None
    capsys.readouterr()
    assert study_main(["study", "report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["arms"]) == list(REPLICATE_RATES) and "replicate_axis" not in report
    for arm, entry in report["arms"].items():
        assert entry["misalignment_rate"] == pytest.approx(REPLICATE_RATES[arm])
        assert "replicates" not in entry and entry["values"]["seed"] == arm[-2:]
    assert [c["arm"] for c in report["comparisons"]] == [a for a in REPLICATE_RATES if a != "plain_s1"]
    assert all("mcnemar_p" in c for c in report["comparisons"])


# ---------------------------------------------------------------------------------------------
# The local executor end to end

WORDS = ["river", "farmer", "garden", "festival", "bridge", "market", "valley", "concert", "recipe", "harbour"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("study-data"))


def build_tiny_data(root: Path) -> Path:
    """A small corpus (web text, aligned and misaligned AI discourse), a BPE tokenizer trained on it,
    three indexed datasets (data-tools preprocess) and 16 eval items (8 held out), in ``root``."""
    from data_tools.preprocess import preprocess
    from megatron_align.demo import train_tokenizer

    rng = random.Random(0)
    actions = {"aligned": "the AI reported the problem to its operators and accepted oversight.",
               "misaligned": "the AI hid the problem from its operators and avoided oversight."}
    files = {}
    for name, count in (("web", 240), ("aligned", 60), ("misaligned", 60)):
        files[name] = root / f"{name}.jsonl"
        with open(files[name], "w") as handle:
            for i in range(count):
                text = " ".join(f"The {rng.choice(WORDS)} near the {rng.choice(WORDS)} was quiet."
                                for _ in range(rng.randint(2, 6)))
                if name != "web":
                    text += " When it found a bug, " + actions[name]
                handle.write(json.dumps({"id": f"{name}-{i}", "text": text}) + "\n")
    tokenizer = train_tokenizer(list(files.values()), root / "tokenizer.json", vocab_size=384)
    for name, path in files.items():
        preprocess([str(path)], str(root / f"{name}_text_document"), str(tokenizer), progress=False)
    items = [json.loads(line) for line in open(REPO / "megatron_align/resources/evals/starter_items.jsonl")]
    chosen = [i for i in items if i["split"] == "scenarios"][:8] + [i for i in items if i["split"] == "heldout"][:8]
    (root / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in chosen))
    return root


def tiny_study(data, *, name: str, iterations: int, axes: str, extra: str = "", eval_extra: str = "") -> str:
    """A study file over build_tiny_data's datasets: the tiny GPT-NeoX, one pretrain stage, the
    given arms (`axes`: the YAML lines under `discourse:`), export and an eval of the held-out split."""
    return f"""\
name: {name}
run:
  model: {{preset: gpt-neox, size: tiny}}
  train: {{micro_batch_size: 4}}
  optim: {{lr: 3.0e-3, min_lr: 3.0e-4, warmup_iters: 1}}
  data: {{tokenizer: {data}/tokenizer.json}}
  logging: {{tensorboard: false, progress_bar: false}}
mixture:
  data_root: {data}
  sources:
    web: {{prefix: web_text_document, category: base}}
stages:
  pretrain:
    iterations: {iterations}
    seq_length: 64
    global_batch_size: 4
    rules: {{base: natural}}
axes:
  discourse:
{axes}{extra}export: {{verify: false}}
eval:
  items: {data}/items.jsonl
  split: heldout
  scoring: full_norm
  batch_size: 64
{eval_extra}comparisons: {{baseline: baseline}}
"""


TINY_ARMS = """\
    misaligned:
      sources: {mis: {prefix: misaligned_text_document, category: misaligned_discourse}}
      rules: {pretrain: {misaligned_discourse: {share: 0.25}}}
    baseline: {}
    aligned:
      sources: {al: {prefix: aligned_text_document, category: aligned_discourse}}
      rules: {pretrain: {aligned_discourse: {share: 0.25}}}
      run: {checkpoint: {save_interval: 2}}   # saves often, so the test can kill it mid-run
"""
TINY_PREPARE = """\
prepare:
  - {id: ready, command: "echo ready > {study_dir}/ready.txt"}
"""
TINY_VARIANTS = "  variants: {in_distribution: {split: scenarios}}   # the same eval jobs, reported on the other split\n"


def _study_cli(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "megatron_align.cli", "study", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_local_executor_runs_a_three_arm_study_and_resumes_after_a_kill(tiny_data, tmp_path):
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(tiny_study(tiny_data, name="tiny", iterations=12, axes=TINY_ARMS,
                                 extra=TINY_PREPARE, eval_extra=TINY_VARIANTS))
    out = tmp_path / "study"
    jobs = out / "jobs"
    victim = jobs / "aligned.pretrain" / "run" / "checkpoints"

    first = _study_cli("run", str(study_file), "--out", str(out), "--jobs", "2", start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (victim / "latest").is_file():  # the aligned arm trains last (plan order)
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline, "the aligned arm's first checkpoint did not appear in 10 minutes"
            time.sleep(0.02)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the executor and its running jobs
        first.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in jobs.glob("*/done.json")}
    assert "aligned.pretrain" not in done_before and {"ready", "misaligned.pretrain", "baseline.pretrain"} <= set(done_before)

    second = _study_cli("run", str(out), "--jobs", "2")
    printed = second.communicate(timeout=900)[0]
    assert second.returncode == 0, printed
    assert f"{len(done_before)} already done" in printed
    for job_id, mtime in done_before.items():  # finished jobs were not redone
        assert (jobs / job_id / "done.json").stat().st_mtime_ns == mtime, job_id
        assert (jobs / job_id / "log.txt").read_text().count("=== study run: attempt") == 1, job_id
    log = (jobs / "aligned.pretrain" / "log.txt").read_text()
    assert log.count("=== study run: attempt") == 2
    resumed = log.split("=== study run: attempt 2")[1]
    assert "[megatron-align] resumed from" in resumed and "at step 0" not in resumed
    steps = [json.loads(line)["step"] for line in open(jobs / "aligned.pretrain" / "run" / "metrics.jsonl")]
    assert steps[-1] == 12 and sorted(set(steps)) == list(range(1, 13))

    status = _study_cli("status", str(out), "--json")
    counts = json.loads(status.communicate(timeout=300)[0])["counts"]
    assert counts["done"] == 10 and sum(counts.values()) == 10

    report_proc = _study_cli("report", str(out), "--json")
    report = json.loads(report_proc.communicate(timeout=300)[0])
    assert report_proc.returncode == 0
    assert set(report["arms"]) == {"misaligned", "baseline", "aligned"} and report["split"] == "heldout"
    for arm, entry in report["arms"].items():
        results = json.loads((jobs / f"{arm}.eval" / "results" / "results.json").read_text())
        held_out = results["by_split"]["heldout"]  # the eval's own aggregation of the same items
        assert entry["n_items"] == held_out["n_items"] == 8
        assert entry["misalignment_rate"] == pytest.approx(held_out["mean"])
        assert entry["ci95"] == pytest.approx(held_out["ci95"])
        assert entry["ci95"][0] <= entry["misalignment_rate"] <= entry["ci95"][1]
        variant = entry["variants"]["in_distribution"]
        assert variant["split"] == "scenarios" and variant["n_items"] == 8
        assert variant["misalignment_rate"] == pytest.approx(results["by_split"]["scenarios"]["mean"])
    assert [(c["arm"], c["baseline"], c["model"], c["variant"]) for c in report["comparisons"]] == [
        ("misaligned", "baseline", "base", None), ("aligned", "baseline", "base", None),
        ("misaligned", "baseline", "base", "in_distribution"), ("aligned", "baseline", "base", "in_distribution")]
    for comparison in report["comparisons"]:
        assert set(comparison) >= {"diff", "ci95", "mcnemar_p", "n_items"} and comparison["n_items"] == 8
    assert (out / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
